"""Real training with DeepSpeed on CPU: SFT and DPO lower the loss, logs and models read back,
a killed run resumes to the same weights, and two ranks under torchrun match one rank."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from conftest import BIN, REPO, run_config, stop_at
from dpo_hpc.checkpoint import layout
from dpo_hpc.config import validate_mapping
from dpo_hpc.config.losses import loss_types
from dpo_hpc.fsutil import umask_mode

pytestmark = pytest.mark.slow

TRAIN_SCALARS = {"loss", "learning_rate", "grad_norm", "tokens_per_sec", "perf/tflops_per_device", "perf/padding_fraction",
                 "perf/data_loading_fraction", "perf/peak_memory_gib"}
DPO_SCALARS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected"}


def clean_env(**extra) -> dict:
    """Environment for a child run: no rendezvous variables inherited from this test process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars read back; training tags (``train/<name>`` on disk) by their bare name."""
    from dpo_hpc.trainers.trackers import read_scalars

    return {tag.removeprefix("train/"): points for tag, points in read_scalars(logdir).items()}


def small_data(tmp_path: Path, n: int) -> Path:
    from dpo_hpc.data.verifiable import generate, write_jsonl

    train, _, _ = generate(n, 0, seed=5)
    write_jsonl(train, tmp_path / "small.jsonl")
    return tmp_path / "small.jsonl"


def write_config(tmp_path: Path, data: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "dpo_hpc", *args], capture_output=True, text=True,
                          env=env or clean_env(), cwd=REPO, **kw)


def torchrun_train(config: Path, command: str = "dpo", ranks: int = 2) -> subprocess.CompletedProcess:
    """``dpo-hpc train COMMAND --config CONFIG`` on ``ranks`` CPU ranks under torchrun."""
    return subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()), "-m", "dpo_hpc",
         "train", command, "--config", str(config)],
        capture_output=True, text=True, env=clean_env(OMP_NUM_THREADS="1"), cwd=REPO, timeout=300,
    )


def one_rank_and_two(tmp_path: Path, command: str, one: dict, two: dict) -> tuple[dict, dict]:
    """``one`` trained on 1 rank and ``two`` on 2 ranks under torchrun (``dpo-hpc train COMMAND``):
    the final weights of each, after checking that their values agree (Adam divides by sqrt(v): on
    near-zero gradients it magnifies the different summation order, hence the tolerance)."""
    result = run_cli(["train", command, "--config", str(write_config(tmp_path, one, "one.yaml"))])
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun_train(write_config(tmp_path, two, "two.yaml"), command)
    assert result.returncode == 0, result.stderr[-4000:]
    weights = [load_file(Path(next(v for k, v in raw.items() if k.endswith("_training"))["save_dir"])
                         / "model.safetensors") for raw in (one, two)]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=5e-5)
    return weights[0], weights[1]


def test_sft_lowers_loss_on_a_fixed_batch_and_saves_a_loadable_model(tmp_path, micro_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 10)  # 8 train rows = one global batch: every step sees the same rows
    raw = run_config(tmp_path, micro_model, data, "sft_training", learning_rate=3e-3, max_steps=8)
    cfg = validate_mapping(raw, "sft")
    summary = train(cfg, "sft")
    run = Path(raw["sft_training"]["save_dir"])
    logged = scalars(run / "tensorboard")
    assert TRAIN_SCALARS <= set(logged) and "eval/loss" in logged
    assert "perf/resident_memory_gib" not in logged and "perf/alloc_retries" not in logged  # CUDA only
    assert all(0 < v < 1 for _, v in logged["perf/data_loading_fraction"])
    assert 0 < summary["median_data_loading_fraction"] < 1
    losses = [v for _, v in logged["loss"]]
    assert [s for s, _ in logged["loss"]] == list(range(1, 9))
    assert losses[-1] < losses[0] - 0.5, losses
    model = AutoModelForCausalLM.from_pretrained(run)
    AutoTokenizer.from_pretrained(run)
    assert (run / "model.safetensors").stat().st_mode & 0o777 == umask_mode()  # safetensors alone makes it 0600
    initial = AutoModelForCausalLM.from_pretrained(micro_model)
    assert not torch.equal(model.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    manifest = json.loads((run / "run_manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["trainer"] == "sft" and manifest["seed"] == 42
    assert {"torch", "transformers", "deepspeed"} <= set(manifest["libraries"])
    assert manifest["final_eval"] == summary["final_eval"]
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["kept"] == 9 and report["validation"]["kept"] == 1
    resolved = json.loads((run / "config.resolved.json").read_text())
    assert resolved["trainer"] == "sft" and resolved["sft_training"]["max_steps"] == 8
    card = (run / "README.md").read_text()  # the model card, from the same records
    assert yaml.safe_load(card.split("---\n")[1])["tags"] == ["dpo-hpc", "sft"]
    assert f'AutoModelForCausalLM.from_pretrained("{run.resolve()}")' in card
    assert f"| loss | {manifest['final_eval']['loss']:.4g} |" in card and "8 optimizer steps of 8 sequences" in card


def test_zero3_loads_the_policy_and_reference_straight_into_slices(tmp_path, micro_model, capsys):
    """ZeRO-3: the models are built partitioned (no rank holds one whole), training goes on as
    before, and transformers' ZeRO-3 setting is off again once they are loaded."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from dpo_hpc.trainers.engine import deepspeed_config, load_causal_lm, partitioned_loading
    from dpo_hpc.trainers.trainer import train

    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 10), "dpo_training", max_steps=2)
    raw["deepspeed"] = {"zero_stage": 3}
    assert train(validate_mapping(raw, "dpo"), "dpo")["status"] == "completed"
    assert "ZeRO-3: the policy was loaded straight into each rank's slice (1 rank(s))" in capsys.readouterr().out
    assert not is_deepspeed_zero3_enabled()
    cfg = validate_mapping(raw, "dpo")
    ds = deepspeed_config(cfg.dpo_training, cfg.deepspeed, "fp32", 1)
    with partitioned_loading(ds):
        assert is_deepspeed_zero3_enabled()
    model = load_causal_lm(str(micro_model), "fp32", trainable=True, partition_with=ds)
    assert all(p.numel() == 0 and len(p.ds_shape) >= 1 for p in model.parameters())  # slices, held by DeepSpeed
    whole = load_causal_lm(str(micro_model), "fp32", trainable=True)
    assert all(p.numel() > 0 for p in whole.parameters()) and not is_deepspeed_zero3_enabled()
    # accelerate is not a runtime dependency (transformers' own ZeRO-3 setting class needs it): a fresh
    # process where it cannot be imported loads partitioned all the same
    script = (f"import sys; sys.modules['accelerate'] = None\n"
              f"from dpo_hpc.runtime import init_distributed; init_distributed()\n"
              f"from dpo_hpc.trainers.engine import load_causal_lm\n"
              f"model = load_causal_lm({str(micro_model)!r}, 'fp32', True, partition_with={ds!r})\n"
              f"print('sliced', all(hasattr(p, 'ds_shape') for p in model.parameters()))")
    blocked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                             env=clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                           MASTER_PORT=str(free_port())))
    assert blocked.returncode == 0 and "sliced True" in blocked.stdout, blocked.stderr[-2000:]


def test_dpo_lowers_loss_with_zero2_and_accumulation(tmp_path, micro_model):
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 10)
    raw = run_config(tmp_path, micro_model, data, "dpo_training", learning_rate=3e-3, max_steps=6, batch_size=4,
                     gradient_accumulation_steps=2, eval_steps=3)
    raw["deepspeed"] = {"zero_stage": 2}
    train(validate_mapping(raw, "dpo"), "dpo")
    logged = scalars(Path(raw["dpo_training"]["save_dir"]) / "tensorboard")
    assert TRAIN_SCALARS | DPO_SCALARS <= set(logged)
    assert {f"eval/{name}" for name in DPO_SCALARS | {"loss"}} <= set(logged)
    assert [s for s, _ in logged["eval/loss"]] == [3, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(raw["dpo_training"]["save_dir"]) / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    margins = acc.Histograms("train/margins")
    assert {f"train/{name}" for name in TRAIN_SCALARS | DPO_SCALARS} <= set(acc.Tags()["scalars"])  # HF's layout
    assert [h.step for h in margins] == list(range(1, 7)) and margins[-1].histogram_value.num == 8  # 4 x GA 2
    losses = [v for _, v in logged["loss"]]
    assert losses[0] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at step 1
    assert logged["rewards/accuracies"][0][1] == 0.0  # ties are not accurate (strict >)
    assert losses[-1] < losses[0] - 0.05, losses
    assert logged["rewards/margins"][-1][1] > 0


@pytest.mark.parametrize("trainer, loss_type, options", [
    ("dynamic_beta_dpo", "ipo", {}), ("beta_dpo", "robust", {"label_smoothing": 0.1}), ("dpo", "hinge", {}),
    ("dynamic_beta_dpo", "apo_zero", {}), ("beta_dpo", "nca_pair", {}), ("dpo", "discopop", {}),
    ("dynamic_beta_dpo", "sigmoid", {"f_divergence_type": "js_divergence"}),
    ("beta_dpo", ["sigmoid", "bco_pair"], {"loss_weights": [0.8, 0.2]})])  # MPO's mixture
def test_loss_types_with_rpo_train_with_each_beta_policy(tmp_path, micro_model, trainer, loss_type, options):
    """Each loss with RPO's chosen NLL through the real trainer: the first logged loss is the loss
    at margin 0 plus alpha x the chosen NLL (logged as nll_loss), and the margins grow."""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 10)  # the same few pairs again and again: the margins must grow
    raw = run_config(tmp_path, micro_model, data, "dpo_training", learning_rate=3e-3, max_steps=6, batch_size=4,
                     loss_type=loss_type, rpo_alpha=0.5, **options)
    if trainer == "dynamic_beta_dpo":
        raw["risk_test"] = {"beta_warmup": 2}
    if trainer == "beta_dpo":
        raw["beta_dpo"] = {"rho": 1.0}  # every pair kept: the loss is a plain mean over pairs, like nll_loss
    summary = train(validate_mapping(raw, trainer), trainer)
    assert summary["status"] == "completed"
    logged = scalars(Path(raw["dpo_training"]["save_dir"]) / "tensorboard")
    first_loss, first_nll = logged["loss"][0][1], logged["nll_loss"][0][1]
    at_zero = {"ipo": (1 / (2 * 0.1)) ** 2, "robust": math.log(2), "hinge": 1.0, "apo_zero": 1.0,  # beta_0 = 0.1
               "nca_pair": 2 * math.log(2), "discopop": 0.5 * math.log(2) + 0.5, "sigmoid": math.log(2),
               "sigmoid+bco_pair": 0.8 * math.log(2) + 0.2 * 2 * math.log(2)}["+".join(loss_types(loss_type))]
    assert first_loss == pytest.approx(at_zero + 0.5 * first_nll, rel=1e-4)
    assert logged["rewards/margins"][-1][1] > 0


@pytest.mark.parametrize("loss_type, options", [("simpo", {"simpo_gamma": 0.5}), ("orpo", {})])
def test_reference_free_losses_train_with_no_reference_whatever_the_reference_keys_say(tmp_path, micro_model,
                                                                                        loss_type, options):
    """A reference-free loss: no reference model, no table (precompute_ref_log_probs and ref_name
    set anyway), the reference log-probs 0 in every metric, under Dynamic-Beta DPO too; the loss
    falls."""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 10)
    for trainer in ("dpo", "dynamic_beta_dpo"):
        raw = run_config(tmp_path / trainer, micro_model, data, "dpo_training", learning_rate=3e-3, max_steps=6,
                         batch_size=4, loss_type=loss_type, precompute_ref_log_probs=True, **options)
        raw["ref_name"] = str(micro_model)
        if trainer == "dpo":
            raw["dpo_training"]["beta"] = 2.0
        else:
            raw["risk_test"] = {"beta_warmup": 2}
        summary = train(validate_mapping(raw, trainer), trainer)
        run = Path(raw["dpo_training"]["save_dir"])
        assert summary["reference"] == "none (reference-free loss)" and summary["reference_forwards"] == 0
        assert "ref_log_probs" not in summary and not (run / "ref_log_probs").exists()
        logged = scalars(run / "tensorboard")
        for side in ("chosen", "rejected"):  # policy minus a zero reference
            assert logged[f"logps/{side}_change"] == logged[f"logps/{side}"]
        if trainer == "dpo":
            assert [v for _, v in logged["rewards/chosen"]] == pytest.approx([2.0 * v for _, v in logged["logps/chosen"]],
                                                                               rel=1e-5)
        assert logged["loss"][-1][1] < logged["loss"][0][1]


def test_conversational_data_trains_sft_on_messages_then_dpo(tmp_path, micro_model):
    """TRL-format rows (lists of {role, content}) through the real trainers, rendered with the
    model's chat template: every row kept, losses at their step-0 values."""
    from dpo_hpc.data.hh import parse_turns
    from dpo_hpc.data.verifiable import generate
    from dpo_hpc.trainers.trainer import train

    def messages(transcript):
        return [{"role": "user" if t.role == "human" else "assistant", "content": t.text.strip()}
                for t in parse_turns(transcript)]

    hh_rows, _, _ = generate(40, 0, seed=3)
    pairs = [{"prompt": messages(r["chosen"])[:-1], "chosen": messages(r["chosen"])[-1:],
              "rejected": messages(r["rejected"])[-1:]} for r in hh_rows]
    chats = [{"messages": messages(r["chosen"])} for r in hh_rows]
    for name, rows in (("pairs", pairs), ("chats", chats)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = run_config(tmp_path / "sft", micro_model, tmp_path / "chats.jsonl", "sft_training", max_steps=3,
                     batch_size=4, learning_rate=1e-3)
    dpo = run_config(tmp_path / "dpo", micro_model, tmp_path / "pairs.jsonl", "dpo_training", max_steps=3,
                     batch_size=4, learning_rate=1e-3)
    for raw, trainer in ((sft, "sft"), (dpo, "dpo")):
        raw["dataset"].update(format="conversational", system_prompt="Answer briefly.")
        assert train(validate_mapping(raw, trainer), trainer)["status"] == "completed"
        run_dir = Path(raw[f"{trainer}_training"]["save_dir"])
        report = json.loads((run_dir / "data_report.json").read_text())
        assert report["train"]["dropped"] == {} and report["train"]["kept"] + report["validation"]["kept"] == 40
    logged = scalars(Path(dpo["dpo_training"]["save_dir"]) / "tensorboard")
    assert logged["loss"][0][1] == pytest.approx(math.log(2), abs=1e-4)


def test_a_dataset_mixture_trains_and_its_report_counts_each_source(tmp_path, micro_model):
    """HH pairs with prompt/chosen/rejected rows under other names mixed in (a half share), cached
    for the resume check: the run completes and its data report names each source's rows."""
    from dpo_hpc.trainers.trainer import train

    main = small_data(tmp_path, 16)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"q": f"Reverse: ab{i}", "good": f" {i}ba", "bad": " ab"}) + "\n"
                             for i in range(8)))
    raw = run_config(tmp_path, micro_model, main, "dpo_training", max_steps=2, batch_size=4)
    raw["dataset"].update(cache_dir=str(tmp_path / "cache"), mix=[
        {"dataset_name": str(other), "fraction": 0.5, "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}}])
    assert train(validate_mapping(raw, "dpo"), "dpo")["status"] == "completed"
    report = json.loads((Path(raw["dpo_training"]["save_dir"]) / "data_report.json").read_text())
    assert report["mix"] == [{"dataset_name": str(main), "rows": 16, "kept": 16},
                             {"dataset_name": str(other), "rows": 4, "kept": 4}]
    assert report["train"]["kept"] + report["validation"]["kept"] == 20


def test_completed_run_is_skipped_and_a_different_config_is_refused(tmp_path, micro_model):
    from dpo_hpc.checkpoint import CheckpointError
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 10)
    raw = run_config(tmp_path, micro_model, data, "sft_training", max_steps=2)
    train(validate_mapping(raw, "sft"), "sft")
    before = (Path(raw["sft_training"]["save_dir"]) / "model.safetensors").stat().st_mtime_ns
    assert train(validate_mapping(raw, "sft"), "sft")["status"] == "completed"
    assert (Path(raw["sft_training"]["save_dir"]) / "model.safetensors").stat().st_mtime_ns == before
    raw["sft_training"]["learning_rate"] = 0.5
    with pytest.raises(CheckpointError, match="completed run with a different config"):
        train(validate_mapping(raw, "sft"), "sft")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)


ALGORITHM_SECTIONS = {
    "dpo": {},
    "dynamic_beta_dpo": {"risk_test": {"beta_warmup": 2}, "beta_update": {"alpha": 0.05}},
    "beta_dpo": {"beta_dpo": {"rho": 0.75}},
}
CLI_NAME = {"dpo": "dpo", "dynamic_beta_dpo": "dynamic-beta-dpo", "beta_dpo": "beta-dpo"}


def dpo_config(tmp_path, model, data, trainer, **training):
    return {**run_config(tmp_path, model, data, "dpo_training", **training), **ALGORITHM_SECTIONS[trainer]}


@pytest.mark.parametrize("trainer, lora", [("dpo", False), ("dynamic_beta_dpo", False), ("beta_dpo", False),
                                           ("dynamic_beta_dpo", True)])
def test_killed_run_resumes_to_identical_weights_and_skips_a_corrupt_checkpoint(tmp_path, micro_model, trainer, lora):
    if lora:
        pytest.importorskip("peft")
    data = small_data(tmp_path, 40)
    common = dict(max_steps=14, batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-3, save_steps=1,
                  save_total_limit=3, warmup_steps=2)
    straight = dpo_config(tmp_path / "a", micro_model, data, trainer, **common)
    resumed = dpo_config(tmp_path / "b", micro_model, data, trainer, **common)
    if lora:  # adapters only in the checkpoints; the reference is the policy with them off
        straight["lora"] = resumed["lora"] = {"r": 4, "target_modules": "all-linear"}
    name = CLI_NAME[trainer]
    result = run_cli(["train", name, "--config", str(write_config(tmp_path, straight, "a.yaml"))])
    assert result.returncode == 0, result.stderr[-3000:]

    config_b = write_config(tmp_path, resumed, "b.yaml")
    run_b = Path(resumed["dpo_training"]["save_dir"])
    proc = subprocess.Popen([sys.executable, "-m", "dpo_hpc", "train", name, "--config", str(config_b)],
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(run_b / "checkpoints" / layout.step_dir_name(5), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    published = layout.published_checkpoints(run_b / "checkpoints")
    assert len(published) <= 4 and layout.step_dir_name(5) in [p.name for p in published]  # keep=3, +1 if killed before rotation
    newest = published[0]
    victim = next(p for p in sorted((newest / layout.ENGINE_TAG).iterdir()) if p.suffix == ".pt")
    victim.write_bytes(victim.read_bytes()[:-10] + b"corrupted!")  # same size, wrong checksum

    result = run_cli(["train", name, "--config", str(config_b)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {newest} is not usable ({victim.relative_to(newest)} checksum mismatch)" in result.stdout
    assert "resumed from" in result.stdout
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a = load_file(Path(straight["dpo_training"]["save_dir"]) / weights)
    b = load_file(run_b / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged"
    logged = scalars(run_b / "tensorboard")
    assert [s for s, _ in logged["loss"]] == list(range(1, 15))  # each step once, despite the restart
    straight_logged = scalars(Path(straight["dpo_training"]["save_dir"]) / "tensorboard")
    for tag in ("loss", "dpo/beta", "risk/tau", "beta_dpo/beta_used", "beta_dpo/M0", "beta_dpo/kept"):
        if tag in straight_logged:
            assert [v for _, v in logged[tag]] == [v for _, v in straight_logged[tag]], tag
    if trainer == "dynamic_beta_dpo":
        assert len({v for _, v in logged["dpo/beta"]}) > 3  # beta really moved, and resumed where it was


@pytest.mark.multiproc
def test_two_ranks_under_torchrun_match_one_rank_with_accumulation(tmp_path, micro_model):
    """Dynamic-Beta DPO: 2 ranks x GA 1 (ZeRO-3) gives the beta trajectory and weights of 1 rank x GA 2,
    with TR-DPO's reference, partitioned, moving every 2 steps and saved whole in the checkpoint."""
    data = small_data(tmp_path, 24)
    common = dict(max_steps=5, batch_size=4, learning_rate=2e-3, sync_ref_model=True, ref_model_sync_steps=2,
                  save_steps=3, checkpoints_at_end="all")
    algo = {"risk_test": {"beta_warmup": 1}, "beta_update": {"alpha": 0.05}}
    one = {**run_config(tmp_path / "one", micro_model, data, "dpo_training", gradient_accumulation_steps=2, **common), **algo}
    two = {**run_config(tmp_path / "two", micro_model, data, "dpo_training", gradient_accumulation_steps=1, **common), **algo}
    two["deepspeed"] = {"zero_stage": 3}
    two["dataset"]["cache_dir"] = str(tmp_path / "data_cache")  # rank 0 tokenizes, rank 1 reads its files
    weights, _ = one_rank_and_two(tmp_path, "dynamic-beta-dpo", one, two)
    manifest = json.loads((Path(two["dpo_training"]["save_dir"]) / "run_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "completed"
    assert len(list((tmp_path / "data_cache").glob("*.safetensors"))) == 2
    logged_one = scalars(Path(one["dpo_training"]["save_dir"]) / "tensorboard")
    logged_two = scalars(Path(two["dpo_training"]["save_dir"]) / "tensorboard")
    assert [v for _, v in logged_one["loss"]] == pytest.approx([v for _, v in logged_two["loss"]], abs=1e-5)
    beta_one, beta_two = [v for _, v in logged_one["dpo/beta"]], [v for _, v in logged_two["dpo/beta"]]
    assert beta_one == pytest.approx(beta_two, rel=1e-6) and len(set(beta_one)) > 2
    moved = [load_file(Path(run["dpo_training"]["save_dir"]) / "checkpoints" / layout.step_dir_name(3)
                       / layout.replicated_file("reference")) for run in (one, two)]
    for key in weights:
        torch.testing.assert_close(moved[0][key], moved[1][key], rtol=1e-4, atol=5e-5)


def test_train_sft_runs_the_seed_config(tmp_path, micro_model, reverse_data):
    """`train-sft --config config_sft.yaml` with policy_name (and data) pointed at local assets."""
    seed_cfg = REPO / "experiments" / "seed" / "config_sft.yaml"
    result = subprocess.run(
        [str(BIN / "train-sft"), "--config", str(seed_cfg), "--set", f'policy_name="{micro_model}"',
         "--set", f'dataset.dataset_name="{reverse_data}"', "--set", "sft_training.max_steps=2",
         "--set", "sft_training.batch_size=4", "--set", f'sft_training.save_dir="{tmp_path / "sft_model"}"'],
        capture_output=True, text=True, env=clean_env(), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "sft_model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "sft_model" / "config.resolved.json").read_text())["precision"] == "bf16"


@pytest.mark.multiproc
def test_deepspeed_launcher_runs_two_ranks(tmp_path, micro_model):
    """`deepspeed --module dpo_hpc ...` passes --local_rank=N; the CLI accepts it."""
    data = small_data(tmp_path, 24)
    raw = run_config(tmp_path, micro_model, data, "dpo_training", max_steps=2, batch_size=4)
    result = subprocess.run(
        [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dpo_hpc",
         "train", "dpo", "--config", str(write_config(tmp_path, raw))],
        capture_output=True, text=True, env=clean_env(OMP_NUM_THREADS="1"), cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    manifest = json.loads((Path(raw["dpo_training"]["save_dir"]) / "run_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "completed"


@pytest.mark.parametrize("command, seed_file, names", [
    ("train-dpo", "config_dpo.yaml", {"dpo/beta", "risk/tau", "risk/p_hat", "risk/u_k", "risk/s_k", "risk/fail",
                                      "risk/warmup"}),
    ("train-beta-dpo", "config_beta_dpo.yaml", {"beta_dpo/beta_used", "beta_dpo/M0", "beta_dpo/sigma",
                                                "beta_dpo/gap_mean", "beta_dpo/gap_selected_mean", "beta_dpo/kept",
                                                "beta_dpo/keep_ratio"}),
])
def test_original_commands_run_the_seed_configs(tmp_path, micro_model, reverse_data, command, seed_file, names):
    seed_cfg = REPO / "experiments" / "seed" / seed_file
    result = subprocess.run(
        [str(BIN / command), "--config", str(seed_cfg), "--set", f'policy_name="{micro_model}"',
         "--set", f'ref_name="{micro_model}"', "--set", f'dataset.dataset_name="{reverse_data}"',
         "--set", "dpo_training.max_steps=4", "--set", "dpo_training.batch_size=4", "--set", "dpo_training.learning_rate=1e-3",
         "--set", f'dpo_training.save_dir="{tmp_path / "out"}"', "--set", "risk_test.beta_warmup=2"
         if command == "train-dpo" else "beta_dpo.rho=0.5"],
        capture_output=True, text=True, env=clean_env(), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(tmp_path / "out" / "tensorboard")
    assert names | TRAIN_SCALARS | DPO_SCALARS <= set(logged)
    if command == "train-dpo":
        after_warmup = {"risk/p_hat", "risk/u_k", "risk/s_k", "risk/fail"}
        assert all(len(logged[n]) == (2 if n in after_warmup else 4) for n in names)  # one per optimizer step
        assert [v for _, v in logged["risk/warmup"]] == [1.0, 1.0, 0.0, 0.0]
        assert [v for _, v in logged["dpo/beta"]][:2] == pytest.approx([0.1, 0.1])
    else:
        assert all(len(logged[n]) == 4 for n in names)
        assert {v for _, v in logged["beta_dpo/kept"]} == {2.0}


def test_memory_and_speed_options_keep_the_math(tmp_path, micro_model):
    """Gradient checkpointing (of every block or every 2nd), fused AdamW, compiled blocks and packed
    rows (compiled or not, or one flat row through varlen_attn) change how, not what: the weights
    after 3 steps match the plain run, and compiled blocks compile no more as lengths change;
    grouping by length changes the order (a new run) and cuts padding, as packing does, and the
    flat row has none. Sample generations ride along where they meet each option's hazard (a
    checkpointed, a compiled packed, a varlen_attn policy: the KV cache they turn off)."""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 120)
    common = dict(max_steps=3, batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-3)
    samples = {"generate_during_eval": True, "max_new_tokens": 4}
    variants = {"plain": {}, "checkpointing": {"gradient_checkpointing": True, **samples},
                "every_2nd_block": {"gradient_checkpointing": True, "gradient_checkpointing_every_n_layers": 2},
                "fused": {"optim": "adamw_torch_fused"},
                "grouped": {"group_by_length": True}, "compiled": {"torch_compile": True},
                "packed": {"padding_free": True},
                "compiled_packed": {"torch_compile": True, "padding_free": True, **samples},
                "varlen": {"padding_free": True, "attn_implementation": "varlen_attn", **samples}}
    weights, padding, graphs = {}, {}, {}
    for name, options in variants.items():
        top = {key: options.pop(key) for key in ("attn_implementation",) if key in options}
        raw = {**run_config(tmp_path / name, micro_model, data, "dpo_training", **common, **options), **top}
        graphs_before = counters["stats"]["unique_graphs"]
        summary = train(validate_mapping(raw, "dpo"), "dpo")
        graphs[name] = counters["stats"]["unique_graphs"] - graphs_before
        weights[name] = load_file(Path(raw["dpo_training"]["save_dir"]) / "model.safetensors")
        padding[name] = summary["median_padding_fraction"]
    # Compiled kernels and packed rows (other matrix shapes) reorder float sums; Adam's first steps
    # magnify that in the weights whose gradients are near 0 (seen: 5e-6 on 2 of 16,576 entries
    # compiled, 3e-5 on 1 of 8,192 packed).
    tolerances = {"checkpointing": 1e-6, "every_2nd_block": 1e-6, "fused": 1e-6, "compiled": 2e-5, "packed": 1e-4,
                  "compiled_packed": 1e-4, "varlen": 1e-4}
    for name, atol in tolerances.items():
        for key in weights["plain"]:
            torch.testing.assert_close(weights[name][key], weights["plain"][key], rtol=1e-5, atol=atol)
    assert padding["grouped"] < padding["plain"] / 2, padding
    assert padding["packed"] <= padding["plain"], padding  # rows as long as the longest: similar pairs rarely share
    assert padding["varlen"] == 0.0, padding
    for name in ("checkpointing", "compiled_packed", "varlen"):
        assert len(list((tmp_path / name / "run" / "samples").glob("step_*.jsonl"))) == 2, name  # steps 0 and 3
    # Compiled: a graph for each way the blocks run (training, the reference's no-grad forward, the
    # policy's no-grad evaluation; an fp32 head stays eager), none more as lengths change
    assert graphs["compiled"] <= 3, graphs


def test_compiled_bf16_head_trains_as_the_eager_one(tmp_path, micro_model):
    """bf16 logits are where torch_compile also compiles the head's softmax work (the GPU path):
    inside a real DeepSpeed bf16 run it compiles its own graphs and trains as the eager head does.
    (Weights are no measure here: Adam turns bf16 rounding of near-zero gradients into ±lr steps.)"""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 60)
    logged, graphs = {}, {}
    torch._dynamo.reset()  # graphs another test compiled earlier in this process would not count again
    for name, options in {"eager": {}, "compiled": {"torch_compile": True}}.items():
        raw = {**run_config(tmp_path / name, micro_model, data, "dpo_training", max_steps=4, batch_size=4,
                            learning_rate=2e-3, logging_steps=1, **options), "precision": "bf16"}
        graphs_before = counters["stats"]["unique_graphs"]
        train(validate_mapping(raw, "dpo"), "dpo")
        graphs[name] = counters["stats"]["unique_graphs"] - graphs_before
        logged[name] = scalars(Path(raw["dpo_training"]["save_dir"]) / "tensorboard")
    # more graphs than the blocks' three ways to run (the fp32 options test): the head's work compiled too
    assert graphs["eager"] == 0 and graphs["compiled"] > 3, graphs
    # step by step the same log-probs, loss and gradient norm, within bf16 rounding (seen: 3e-4 relative
    # on the log-probs, 2e-3 on the gradient norm)
    assert logged["eager"]["loss"][0] == logged["compiled"]["loss"][0] == (1, pytest.approx(math.log(2)))
    for tag, rtol in {"loss": 2e-3, "logps/chosen": 2e-3, "logps/rejected": 2e-3, "grad_norm": 1e-2}.items():
        assert [s for s, _ in logged["compiled"][tag]] == [1, 2, 3, 4]
        torch.testing.assert_close([v for _, v in logged["compiled"][tag]], [v for _, v in logged["eager"][tag]],
                                   rtol=rtol, atol=0, msg=tag)


@pytest.mark.parametrize("trainer, setup", [
    ("beta_dpo", {"deepspeed": {"zero_stage": 3}, "beta_dpo": {"rho": 0.8}}),  # partitioned head: full logits
    ("dpo", {"lora": {"r": 4, "target_modules": "all-linear"}}),  # reference = adapters off, a packed table
])
def test_padding_free_composes_with_zero3_lora_and_a_precomputed_table(tmp_path, micro_model, trainer, setup):
    from safetensors.torch import load_file as load

    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 60)
    weights = {}
    for name, packed, attention in (("padded", False, "sdpa"), ("packed", True, "sdpa"), ("flat", True, "varlen_attn")):
        raw = run_config(tmp_path / name, micro_model, data, "dpo_training", max_steps=3, batch_size=4,
                         gradient_accumulation_steps=2, learning_rate=2e-3, padding_free=packed,
                         precompute_ref_log_probs="lora" in setup)
        summary = train(validate_mapping({**raw, **setup, "attn_implementation": attention}, trainer), trainer)
        assert summary["status"] == "completed"
        run = Path(raw["dpo_training"]["save_dir"])
        (weights[name],) = [load(path) for path in run.glob("*.safetensors")]  # model or adapter
    for name in ("packed", "flat"):
        for key in weights["padded"]:
            torch.testing.assert_close(weights[name][key], weights["padded"][key], rtol=1e-5, atol=1e-4)


def test_padding_free_sft_trains_as_padded(tmp_path, micro_model):
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 40)
    weights, padding = {}, {}
    for name, packed, attention in (("padded", False, "sdpa"), ("packed", True, "sdpa"),
                                    ("varlen", True, "varlen_attn"), ("varlen_padded", False, "varlen_attn")):
        raw = run_config(tmp_path / name, micro_model, data, "sft_training", max_steps=3, batch_size=8,
                         learning_rate=2e-3, padding_free=packed)
        raw["attn_implementation"] = attention
        padding[name] = train(validate_mapping(raw, "sft"), "sft")["median_padding_fraction"]
        weights[name] = load_file(Path(raw["sft_training"]["save_dir"]) / "model.safetensors")
    for name in ("packed", "varlen", "varlen_padded"):  # varlen_attn over right-padded rows: one sequence a row
        for key in weights["padded"]:
            torch.testing.assert_close(weights[name][key], weights["padded"][key], rtol=1e-5, atol=1e-4)
    assert padding["varlen"] == 0.0 < padding["packed"] < 0.75 * padding["padded"], padding


def test_precomputed_reference_trains_without_the_reference_and_is_shared(tmp_path, micro_model):
    """One reference pass for two runs; neither runs a reference forward while training; the
    result matches the online reference."""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 60)
    common = dict(max_steps=3, batch_size=4, learning_rate=2e-3)
    online = run_config(tmp_path / "online", micro_model, data, "dpo_training", **common)
    assert train(validate_mapping(online, "dpo"), "dpo")["reference_forwards"] > 0
    summaries, said = [], []
    for name in ("first", "second"):
        raw = run_config(tmp_path / name, micro_model, data, "dpo_training", **common, precompute_ref_log_probs=True,
                         ref_log_probs_cache=str(tmp_path / "cache"))
        summaries.append(train(validate_mapping(raw, "dpo"), "dpo", log=said.append))
    assert [s["ref_log_probs"] for s in summaries] == ["computed", "cache"]
    assert [s["reference_forwards"] for s in summaries] == [0, 0]
    assert len(list((tmp_path / "cache").iterdir())) == 1 and any("read from" in line for line in said)
    a = load_file(Path(online["dpo_training"]["save_dir"]) / "model.safetensors")
    b = load_file(tmp_path / "second" / "run" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_ld_dpo_and_wpo_train_and_ld_dpo_makes_its_own_reference_table(tmp_path, micro_model):
    """LD-DPO with WPO through the trainer: the first loss is ln 2 times the mean WPO weight (the
    margins are 0), a precomputed table is made for the run's ld_alpha (beside the plain one, in a
    shared cache) and trains as the online reference does."""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 20)
    common = dict(max_steps=3, batch_size=4, learning_rate=2e-3, use_weighting=True)
    online = run_config(tmp_path / "online", micro_model, data, "dpo_training", **common, ld_alpha=0.5)
    train(validate_mapping(online, "dpo"), "dpo")
    logged = scalars(Path(online["dpo_training"]["save_dir"]) / "tensorboard")
    # a random model is near uniform, where a reply's weight is near 1 (p = sum_v p_v^2 = 1/V)
    assert logged["wpo_weights"][0][1] != pytest.approx(1.0, abs=1e-3)
    assert logged["loss"][0][1] == pytest.approx(math.log(2) * logged["wpo_weights"][0][1], rel=1e-5)
    for name, ld_alpha in (("plain", None), ("ld", 0.5)):
        raw = run_config(tmp_path / name, micro_model, data, "dpo_training", **common, precompute_ref_log_probs=True,
                         ref_log_probs_cache=str(tmp_path / "cache"), **({"ld_alpha": ld_alpha} if ld_alpha else {}))
        assert train(validate_mapping(raw, "dpo"), "dpo")["ref_log_probs"] == "computed"  # not the other's table
    made_of = [json.loads((table / "meta.json").read_text())
               for table in (tmp_path / "cache").iterdir() if table.is_dir()]
    assert sorted(str(m.get("ld_alpha")) for m in made_of) == ["0.5", "None"]
    a = load_file(Path(online["dpo_training"]["save_dir"]) / "model.safetensors")
    b = load_file(tmp_path / "ld" / "run" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_tr_dpo_moves_the_reference_on_its_steps_and_a_resume_brings_it_back(tmp_path, micro_model, zero_stage):
    """TR-DPO (sync every 2 steps, alpha 0.5): the reference in the step-3 checkpoint is half the
    starting model and half the policy of step 2; a run preempted at step 4 resumes to the weights
    of one that never stopped; a frozen reference trains to other weights."""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 40)

    def run(name, stop=None, **options):
        training = dict(max_steps=5, batch_size=4, learning_rate=2e-3, lr_scheduler="constant", save_steps=3,
                        checkpoints_at_end="all", sync_ref_model=True, ref_model_sync_steps=2,
                        ref_model_mixup_alpha=0.5)
        raw = run_config(tmp_path / name, micro_model, data, "dpo_training", **{**training, **options})
        raw["deepspeed"] = {"zero_stage": zero_stage}
        summary = train(validate_mapping(raw, "dpo"), "dpo", stop=stop)
        return summary, tmp_path / name / "run"

    summary, straight = run("straight")
    assert summary["reference_syncs"] == 2 and summary["reference_forwards"] > 0
    _, short = run("short", max_steps=2)  # the same first two steps (constant learning rate)
    start, policy_2 = load_file(micro_model / "model.safetensors"), load_file(short / "model.safetensors")
    moved = load_file(straight / "checkpoints" / layout.step_dir_name(3) / layout.replicated_file("reference"))
    assert moved.keys() == policy_2.keys()
    for key in moved:
        torch.testing.assert_close(moved[key], start[key] * 0.5 + policy_2[key] * 0.5, rtol=1e-6, atol=1e-7)
    assert run("stopped", stop=stop_at(4))[0]["status"] == "preempted"
    assert run("stopped")[0]["status"] == "completed"
    a, b = load_file(straight / "model.safetensors"), load_file(tmp_path / "stopped" / "run" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed TR-DPO run diverged"
    _, frozen = run("frozen", sync_ref_model=False, ref_model_sync_steps=512, ref_model_mixup_alpha=0.6)
    frozen_weights = load_file(frozen / "model.safetensors")
    assert any(not torch.equal(a[k], frozen_weights[k]) for k in a)


@pytest.mark.multiproc
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_ranks_share_the_reference_pass(tmp_path, micro_model, zero_stage):
    """torchrun, 2 ranks: each computes its share of the reference table (under ZeRO-3 with a
    partitioned reference), rank 0 writes it, both train from it."""
    data = small_data(tmp_path, 40)
    raw = run_config(tmp_path, micro_model, data, "dpo_training", max_steps=3, batch_size=4,
                     precompute_ref_log_probs=True)
    raw["deepspeed"] = {"zero_stage": zero_stage}
    result = torchrun_train(write_config(tmp_path, raw))
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(raw["dpo_training"]["save_dir"])
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["ref_log_probs"] == "computed"
    assert manifest["reference_forwards"] == 0
    (table,) = [p for p in (run_dir / "ref_log_probs").iterdir() if p.is_dir()]
    ids = json.loads((table / "ids.json").read_text())
    train_rows = json.loads((run_dir / "data_report.json").read_text())["train"]["kept"]
    val_rows = json.loads((run_dir / "data_report.json").read_text())["validation"]["kept"]
    assert len(ids) == len(set(ids)) == train_rows + val_rows  # every pair once, from both ranks


@pytest.mark.parametrize("at_end, kept", [("last", [2]), ("all", [2, 1]), ("none", [])])  # none at the last step
def test_checkpoints_at_end_keeps_what_was_asked_for(tmp_path, micro_model, at_end, kept):
    from dpo_hpc.trainers.trainer import train

    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 20), "dpo_training", max_steps=3, batch_size=4,
                     save_steps=1, save_total_limit=3, checkpoints_at_end=at_end)
    train(validate_mapping(raw, "dpo"), "dpo")
    run_dir = Path(raw["dpo_training"]["save_dir"])
    assert [p.name for p in layout.published_checkpoints(run_dir / "checkpoints")] == \
        [layout.step_dir_name(step) for step in kept]
    assert (run_dir / "model.safetensors").exists()


def test_ctrl_c_checkpoints_stops_and_resumes_to_the_same_weights(tmp_path, micro_model):
    data = small_data(tmp_path, 40)
    common = dict(max_steps=12, batch_size=4, learning_rate=2e-3, save_steps=0, logging_steps=1)
    straight = run_config(tmp_path / "a", micro_model, data, "dpo_training", **common)
    stopped = run_config(tmp_path / "b", micro_model, data, "dpo_training", **common)
    assert run_cli(["train", "dpo", "--config", str(write_config(tmp_path, straight, "a.yaml"))]).returncode == 0
    config_b = write_config(tmp_path, stopped, "b.yaml")
    run_b = Path(stopped["dpo_training"]["save_dir"])
    proc = subprocess.Popen([sys.executable, "-m", "dpo_hpc", "train", "dpo", "--config", str(config_b)], cwd=REPO,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(run_b / "progress.json", proc)  # training has begun (save_steps = 0: no periodic checkpoint)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "stopped by SIGINT" in out
    manifest = json.loads((run_b / "run_manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["reason"] == "SIGINT"
    assert 1 <= manifest["step"] < 12 and Path(manifest["checkpoint"]).is_dir()
    resumed = run_cli(["train", "dpo", "--config", str(config_b)])
    assert resumed.returncode == 0 and f"at step {manifest['step']}/12" in resumed.stdout, resumed.stderr[-2000:]
    a = load_file(Path(straight["dpo_training"]["save_dir"]) / "model.safetensors")
    b = load_file(run_b / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged"


def test_a_model_that_is_not_there_fails_in_one_line_before_the_run_directory_is_written(tmp_path, micro_model):
    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 20), "dpo_training", max_steps=2, batch_size=4)
    raw["policy_name"] = str(tmp_path / "no-such-model")
    result = run_cli(["train", "dpo", "--config", str(write_config(tmp_path, raw))])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert f"'{tmp_path / 'no-such-model'}': no such local folder" in line
    assert not (Path(raw["dpo_training"]["save_dir"]) / "run_manifest.json").exists()  # checks come before writes


def test_starting_from_a_run_that_has_not_finished_says_so_in_one_line(tmp_path, micro_model):
    """A DPO config pointing at an SFT run that failed: transformers would talk of sentencepiece."""
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "run_manifest.json").write_text(json.dumps({"trainer": "sft", "status": "failed"}))
    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 20), "dpo_training", max_steps=2, batch_size=4)
    raw["policy_name"] = raw["ref_name"] = str(sft)
    result = run_cli(["train", "dpo", "--config", str(write_config(tmp_path, raw))])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert f"'{sft}' is the directory of a sft run that has not finished (status 'failed')" in line


def test_a_failure_while_training_is_recorded_with_the_traceback_in_the_run(tmp_path, micro_model, monkeypatch):
    from dpo_hpc.config import algorithm
    from dpo_hpc.trainers.trainer import Trainer

    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 20), "dpo_training", max_steps=2, batch_size=4)
    trainer = Trainer(validate_mapping(raw, "dpo"), algorithm("dpo"))

    def step(_):
        raise OSError(28, "No space left on device", str(tmp_path / "run/checkpoints/x.pt"))

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(OSError) as info:
        trainer.train()
    run_dir = Path(raw["dpo_training"]["save_dir"])
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["reason"].startswith("no space left on the device while writing")
    assert info.value.error_log == str(run_dir / "error.log") and "Traceback" in (run_dir / "error.log").read_text()
    assert not (run_dir / ".lock").exists()  # released on the way out


def test_out_of_memory_says_which_micro_batch_and_what_would_help(tmp_path, micro_model, monkeypatch):
    """CPU runs cannot run out of CUDA memory: the step raises what torch raises on a GPU."""
    from dpo_hpc.config import algorithm
    from dpo_hpc.runtime.failures import RunFailure
    from dpo_hpc.trainers.trainer import Trainer

    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 20), "dpo_training", max_steps=2, batch_size=4,
                     gradient_checkpointing=True)
    trainer = Trainer(validate_mapping(raw, "dpo"), algorithm("dpo"))

    def step(_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(RunFailure, match="micro-batch of 4 pairs") as info:
        trainer.train()
    assert "gradient_checkpointing" not in str(info.value) and "precompute_ref_log_probs = true" in str(info.value)
    manifest = json.loads((Path(raw["dpo_training"]["save_dir"]) / "run_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["reason"] == str(info.value)


class _Payload:
    """What an attacker would put in a checkpoint: unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["engine", "rank"])
def test_a_checkpoint_holding_code_is_refused_and_never_run(tmp_path, micro_model, victim):
    from dpo_hpc.fsutil import sha256_file

    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 20), "dpo_training", max_steps=3, batch_size=4,
                     save_steps=2)
    config = write_config(tmp_path, raw)
    run_dir = Path(raw["dpo_training"]["save_dir"])
    assert run_cli(["train", "dpo", "--config", str(config)]).returncode == 0
    (ckpt,) = layout.published_checkpoints(run_dir / "checkpoints")
    target = next((ckpt / layout.ENGINE_TAG).glob("*model_states.pt")) if victim == "engine" \
        else ckpt / layout.rank_file(0)
    state = torch.load(target, weights_only=False)  # our own file, just written
    state["extra"] = _Payload(tmp_path / "pwned")
    torch.save(state, target)
    manifest = json.loads((ckpt / layout.MANIFEST).read_text())  # the attacker rewrites the checksums too
    rel = target.relative_to(ckpt).as_posix()
    manifest["files"][rel] = {"size": target.stat().st_size, "sha256": sha256_file(target)}
    (ckpt / layout.MANIFEST).write_text(json.dumps(manifest))
    (run_dir / "run_manifest.json").unlink()  # as if the run had not finished: it resumes
    (run_dir / "model.safetensors").unlink()
    raw["dpo_training"]["max_steps"] = 4
    result = run_cli(["train", "dpo", "--config", str(write_config(tmp_path, raw))])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert str(target) in line and "holds objects a checkpoint must not hold" in line
    assert not (tmp_path / "pwned").exists()


def _preempted_at_two(tmp_path, micro_model, data) -> dict:
    from dpo_hpc.trainers.trainer import train

    raw = run_config(tmp_path, micro_model, data, "dpo_training", max_steps=4, batch_size=4)
    assert train(validate_mapping(raw, "dpo"), "dpo", stop=stop_at(2))["status"] == "preempted"
    return raw


def test_a_refused_resume_leaves_the_run_directory_as_it_was(tmp_path, micro_model):
    from dpo_hpc.checkpoint import CheckpointError
    from dpo_hpc.trainers.trainer import train

    raw = _preempted_at_two(tmp_path, micro_model, small_data(tmp_path, 20))
    run_dir = Path(raw["dpo_training"]["save_dir"])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    raw["dpo_training"]["learning_rate"] = 0.5
    with pytest.raises(CheckpointError, match=r"step_00000002: checkpoint at step 2 was written with a different "
                                              r"config; refusing to resume: dpo_training.learning_rate"):
        train(validate_mapping(raw, "dpo"), "dpo")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_changed_data_is_refused_unless_accepted_and_a_moved_run_resumes(tmp_path, micro_model):
    from dpo_hpc.checkpoint import CheckpointError
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 20)
    raw = _preempted_at_two(tmp_path / "a", micro_model, data)
    run_dir = Path(raw["dpo_training"]["save_dir"])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    original = data.read_text()
    data.write_text("".join(reversed(original.splitlines(keepends=True))))  # regenerated: same rows, new order
    with pytest.raises(CheckpointError, match=r"step_00000002: checkpoint at step 2 was trained on other data "
                                              r"\(fingerprint train \w+ -> \w+; validation \w+ -> \w+\).*"
                                              r"--set dpo_training.accept_data_change=true"):
        train(validate_mapping(raw, "dpo"), "dpo")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    lines = []
    accepted = {**raw, "dpo_training": {**raw["dpo_training"], "accept_data_change": True}}
    assert train(validate_mapping(accepted, "dpo"), "dpo", log=lines.append)["status"] == "completed"
    assert any("resumed from" in line and "at step 2/4" in line for line in lines), lines

    data.write_text(original)
    raw = _preempted_at_two(tmp_path / "b", micro_model, data)
    moved = tmp_path / "moved" / "run"
    moved.parent.mkdir()
    Path(raw["dpo_training"]["save_dir"]).rename(moved)
    lines = []
    raw["dpo_training"]["save_dir"] = str(moved)
    assert train(validate_mapping(raw, "dpo"), "dpo", log=lines.append)["status"] == "completed"
    assert any("resumed from" in line and "at step 2/4" in line for line in lines), lines


def test_one_writer_per_run_directory_and_a_dead_holder_is_reclaimed(tmp_path, micro_model):
    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 40), "dpo_training", max_steps=400, batch_size=4,
                     save_steps=2)
    config = write_config(tmp_path, raw)
    run_dir = Path(raw["dpo_training"]["save_dir"])
    first = subprocess.Popen([sys.executable, "-m", "dpo_hpc", "train", "dpo", "--config", str(config)], cwd=REPO,
                             env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(run_dir / "progress.json", first)
        second = run_cli(["train", "dpo", "--config", str(config)])
        assert second.returncode == 1 and "Traceback" not in second.stderr
        (line,) = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert f"{run_dir} is in use by" in line and f":{first.pid}" in line
    finally:
        first.kill()
        first.wait()
    assert (run_dir / ".lock").exists()  # SIGKILL: the lock stays, with a dead pid on this host
    raw["dpo_training"]["max_steps"] = 4
    third = run_cli(["train", "dpo", "--config", str(write_config(tmp_path, raw))])
    assert third.returncode == 0, third.stderr[-2000:]
    assert "went stale" in third.stdout and not (run_dir / ".lock").exists()


def test_links_planted_in_the_run_directory_are_replaced_never_written_through(tmp_path, micro_model):
    """Someone with write access to a shared run folder plants links where the run writes: the
    run finishes and what the links point to is untouched."""
    from dpo_hpc.trainers.trainer import train

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.json").write_text("keep me")
    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 20), "dpo_training", max_steps=3, batch_size=4,
                     save_steps=1)
    run_dir = Path(raw["dpo_training"]["save_dir"])
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "data_report.json").symlink_to(outside / "precious.json")
    (run_dir / ".final-model.tmp").symlink_to(outside)
    (run_dir / "checkpoints" / layout.tmp_dir_name(1)).symlink_to(outside)
    assert train(validate_mapping(raw, "dpo"), "dpo")["status"] == "completed"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.json"]
    assert (outside / "precious.json").read_text() == "keep me"
    assert not (run_dir / "data_report.json").is_symlink() and json.loads((run_dir / "data_report.json").read_text())
    assert (run_dir / "model.safetensors").is_file()


def test_a_full_disk_is_one_line_and_the_run_stays_resumable(tmp_path, micro_model):
    """save_dir on a tmpfs too small for a checkpoint (needs root to mount; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    try:
        raw = run_config(tmp_path, micro_model, small_data(tmp_path, 20), "dpo_training", max_steps=3, batch_size=4,
                         save_steps=1, save_dir=str(mount / "run"))
        result = run_cli(["train", "dpo", "--config", str(write_config(tmp_path, raw))])
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert line.startswith(f"error: no space left on the device holding {mount / 'run/checkpoints'} while saving "
                               "checkpoint step 1: free space, lower save_total_limit, or move save_dir"), line
        manifest = json.loads((mount / "run/run_manifest.json").read_text())
        assert manifest["status"] == "failed" and "Traceback" in (mount / "run/error.log").read_text()
        assert list((mount / "run/checkpoints").iterdir()) == []  # the half-written save was removed
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_profile_steps_write_the_phase_table_and_a_trace(tmp_path, micro_model):
    from dpo_hpc.config.errors import ConfigError
    from dpo_hpc.trainers.profiling import PHASES
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 40)
    with pytest.raises(ConfigError, match=r"profile_steps = \[3, 2\]: expected \[first, last\]"):
        validate_mapping(run_config(tmp_path, micro_model, data, "dpo_training", profile_steps=[3, 2]), "dpo")
    raw = run_config(tmp_path, micro_model, data, "dpo_training", max_steps=4, batch_size=4,
                     gradient_accumulation_steps=2, profile_steps=[2, 3])
    said = []
    train(validate_mapping(raw, "dpo"), "dpo", log=said.append)
    folder = Path(raw["dpo_training"]["save_dir"]) / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["rank0_steps2-3.json", "rank0_steps2-3.txt"]  # nothing aside
    table = (folder / "rank0_steps2-3.txt").read_text()
    for phase in PHASES:  # 2 steps x 2 micro-batches each
        (line,) = [line for line in table.splitlines() if line.startswith(phase)]
        assert line.split()[1] == "4", line
    events = json.loads((folder / "rank0_steps2-3.json").read_text())["traceEvents"]
    assert {e.get("name") for e in events} >= set(PHASES)
    assert any("profile of steps 2-3" in line for line in said)
