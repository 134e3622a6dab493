"""KTO through the real trainer (DeepSpeed on CPU): the command trains on preference pairs read as
labelled completions and logs TRL's metrics; a preempted run resumes to the weights of one that
never stopped; a precomputed reference table trains as the online reference and is shared; two
ranks match one rank with accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_resumed_as_straight, run_config, stop_at
from dpo_hpc.config import validate_mapping
from test_training import one_rank_and_two, run_cli, scalars, small_data, torchrun_train, write_config

pytestmark = pytest.mark.slow

KTO_SCALARS = {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected", "desirable_fraction", "grad_norm", "tokens_per_sec"}


def kto_config(tmp_path, model, data, **training):
    return run_config(tmp_path, model, data, "kto_training", **training)


def test_kto_trains_on_pairs_as_labelled_completions_and_logs_trls_metrics(tmp_path, micro_model):
    data = small_data(tmp_path, 40)
    raw = kto_config(tmp_path, micro_model, data, max_steps=6, batch_size=4, learning_rate=2e-3, desirable_weight=1.2,
                     generate_during_eval=True, generation_samples=2, max_new_tokens=8)
    result = run_cli(["train", "kto", "--config", str(write_config(tmp_path, raw))])
    assert result.returncode == 0, result.stderr[-3000:]
    run = Path(raw["kto_training"]["save_dir"])
    report = json.loads((run / "data_report.json").read_text())
    kept = report["train"]["kept"]
    assert (report["train"]["desirable"], report["train"]["undesirable"]) == (kept, kept)  # a pair gives one of each
    assert "6 steps of 4 completions" in result.stdout and "| kl " in result.stdout
    logged = scalars(run / "tensorboard")
    assert KTO_SCALARS <= set(logged), sorted(set(logged))
    assert logged["loss"][0][1] == pytest.approx(0.5 * (1.2 + 1.0) / 2, abs=0.1)  # 1 - sigmoid(0), weighted
    assert any(v > 0 for _, v in logged["kl"])  # the reference point moves off 0 as the policy does
    chosen, rejected = dict(logged["rewards/chosen"]), dict(logged["rewards/rejected"])
    for step, margin in logged["rewards/margins"]:  # a step whose completions are all of one label logs no margin
        assert margin == pytest.approx(chosen[step] - rejected[step], abs=1e-6)
    manifest = json.loads((run / "run_manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["reference"] == "model"
    assert {"eval/kl", "eval/rewards/margins"} <= {f"eval/{k}" for k in manifest["final_eval"]}
    assert (run / "model.safetensors").exists()
    samples = [json.loads(line) for line in (run / "samples" / "step_00000006.jsonl").read_text().splitlines()]
    assert len(samples) == 2  # the desirable completions' prompts, with the data's reply beside the model's


@pytest.mark.parametrize("options", [{}, {"loss_type": "apo_zero_unpaired"},
                                     {"sync_ref_model": True, "ref_model_sync_steps": 2}, {"lora": True}],
                         ids=["kto", "apo_zero_unpaired", "tr_kto", "lora"])
def test_a_preempted_kto_run_resumes_to_the_weights_of_one_that_never_stopped(tmp_path, micro_model, options):
    """Also with TR-DPO's moving reference (TRL's KTO has it too), and with LoRA, whose reference
    is the policy with its adapters off."""
    from dpo_hpc.trainers.trainer import train

    options = dict(options)
    lora = options.pop("lora", False)
    if lora:
        pytest.importorskip("peft")
    data = small_data(tmp_path, 30)

    def run(name, stop=None):
        raw = kto_config(tmp_path / name, micro_model, data, max_steps=6, batch_size=4, learning_rate=2e-3,
                         gradient_accumulation_steps=2, save_steps=2, **options)
        if lora:
            raw["lora"] = {"r": 4, "target_modules": "all-linear"}
        return train(validate_mapping(raw, "kto"), "kto", stop=stop), tmp_path / name / "run"

    summary, straight = run("straight")
    assert summary.get("reference_syncs", 0) == (3 if options.get("sync_ref_model") else 0)
    assert summary["reference"] == ("policy with adapters off" if lora else "model")
    assert run("stopped", stop=stop_at(3))[0]["status"] == "preempted"
    summary, resumed = run("stopped")
    assert summary["status"] == "completed"
    assert_resumed_as_straight(straight, resumed, "adapter_model.safetensors" if lora else "model.safetensors",
                               "kl", 6)


def test_a_precomputed_kto_table_trains_as_the_online_reference_and_is_shared(tmp_path, micro_model):
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 40)
    common = dict(max_steps=3, batch_size=4, learning_rate=2e-3)
    online = kto_config(tmp_path / "online", micro_model, data, **common)
    assert train(validate_mapping(online, "kto"), "kto")["reference_forwards"] > 0
    summaries = []
    for name, batch in (("first", 4), ("second", 4), ("other_batch", 2)):
        raw = kto_config(tmp_path / name, micro_model, data, **{**common, "batch_size": batch},
                         precompute_ref_log_probs=True, ref_log_probs_cache=str(tmp_path / "cache"))
        summaries.append(train(validate_mapping(raw, "kto"), "kto"))
    # another micro-batch pairs other KL completions: a table of its own
    assert [s["ref_log_probs"] for s in summaries] == ["computed", "cache", "computed"]
    assert [s["reference_forwards"] for s in summaries] == [0, 0, 0]
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2
    a = load_file(tmp_path / "online" / "run" / "model.safetensors")
    b = load_file(tmp_path / "second" / "run" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    logged_online, logged_table = scalars(tmp_path / "online" / "run" / "tensorboard"), \
        scalars(tmp_path / "second" / "run" / "tensorboard")
    assert [v for _, v in logged_online["kl"]] == pytest.approx([v for _, v in logged_table["kl"]], abs=1e-5)


@pytest.mark.multiproc
def test_two_kto_ranks_match_one_rank_with_accumulation(tmp_path, micro_model):
    """apo_zero_unpaired (no reference point: the micro-batch split does not enter the loss): 2 ranks
    x GA 1 under ZeRO-3 train to the weights of 1 rank x GA 2; and kto's reference point, gathered
    over both ranks, trains there too."""
    data = small_data(tmp_path, 24)
    common = dict(max_steps=4, batch_size=4, learning_rate=2e-3, loss_type="apo_zero_unpaired")
    one = kto_config(tmp_path / "one", micro_model, data, gradient_accumulation_steps=2, **common)
    two = kto_config(tmp_path / "two", micro_model, data, **common)
    two["deepspeed"] = {"zero_stage": 3}
    one_rank_and_two(tmp_path, "kto", one, two)
    kto = kto_config(tmp_path / "kto", micro_model, data, **{**common, "loss_type": "kto"})
    result = torchrun_train(write_config(tmp_path, kto, "kto.yaml"), "kto")
    assert result.returncode == 0, result.stderr[-4000:]
    kl = [v for _, v in scalars(tmp_path / "kto" / "run" / "tensorboard")["kl"]]
    assert len(kl) == 4 and all(v >= 0 for v in kl) and any(v > 0 for v in kl)


def test_padding_free_kto_trains_as_padded(tmp_path, micro_model):
    """The completions and the KL sequences packed alike (position ids restarting per sequence)."""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 30)
    weights = {}
    for name, packed in (("padded", False), ("packed", True)):
        raw = kto_config(tmp_path / name, micro_model, data, max_steps=3, batch_size=4, learning_rate=2e-3,
                         padding_free=packed)
        assert train(validate_mapping(raw, "kto"), "kto")["status"] == "completed"
        weights[name] = load_file(tmp_path / name / "run" / "model.safetensors")
    for key in weights["padded"]:
        torch.testing.assert_close(weights["packed"][key], weights["padded"][key], rtol=1e-5, atol=1e-4)  # as SFT/DPO
