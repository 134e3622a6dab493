"""A run resumes on another number of ranks: ZeRO state written by 2 ranks loads on 1 and the
other way round (rank 0 converts it to DeepSpeed's universal checkpoint), and the global batch
may be split otherwise (batch_size, gradient_accumulation_steps, global_batch_size). Either way
the run ends where the run that never stopped ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, stop_at
from dpo_hpc.checkpoint import layout
from dpo_hpc.config import validate_mapping
from test_training import clean_env, dpo_config, free_port, run_cli, scalars, small_data, torchrun_train, write_config

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def preempted_on_two_ranks(config: Path, run_dir: Path, after_step: int) -> int:
    """``dpo-hpc train dpo --config CONFIG`` on 2 ranks started as srun starts them (each its own
    process, rank and world size in its environment), both sent USR2 once rank 0 has logged
    ``after_step``; returns the step of the checkpoint they wrote."""
    port = str(free_port())
    log = open(config.with_suffix(".rank1.log"), "w")
    ranks = [subprocess.Popen([sys.executable, "-m", "dpo_hpc", "train", "dpo", "--config", str(config)], cwd=REPO,
                              env=clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                                            PYTHONUNBUFFERED="1"),
                              stdout=subprocess.PIPE if rank == 0 else log, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    deadline, seen = time.time() + 240, []
    for line in ranks[0].stdout:
        seen.append(line)
        if f"step {after_step}/" in line or time.time() > deadline:
            break
    for rank in ranks:
        rank.send_signal(signal.SIGUSR2)
    out = "".join(seen) + ranks[0].stdout.read()
    codes = [rank.wait(timeout=240) for rank in ranks]
    assert codes[0] == 3, out[-3000:]  # rank 0 says it stopped with a checkpoint, not requeued
    log.close()
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["status"] == "preempted" and manifest["world_size"] == 2, out[-3000:]
    return manifest["step"]


def assert_same_weights(a: Path, b: Path) -> None:
    """Weights of two runs, equal but for the summation order of 1 rank x GA 2 against 2 ranks
    (Adam divides by sqrt(v): it magnifies that order on near-zero gradients). A resume that lost
    Adam's moments or step count misses by about the learning rate."""
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_ranks_state_resumes_on_one_with_the_accumulation_derived(tmp_path, micro_model, zero_stage):
    """global_batch_size = 8 at batch_size 4 is GA 1 on 2 ranks, GA 2 on 1: the same run. ZeRO-3's
    slices are converted; ZeRO-0 (fp32) keeps its optimizer whole and loads as it is."""
    data = small_data(tmp_path, 40)
    common = dict(batch_size=4, global_batch_size=8, lr_scheduler="constant", learning_rate=2e-3, max_steps=400)
    resumed = dpo_config(tmp_path / "b", micro_model, data, "dpo", **common)
    resumed["deepspeed"] = {"zero_stage": zero_stage}
    run_b = Path(resumed["dpo_training"]["save_dir"])
    stopped = preempted_on_two_ranks(write_config(tmp_path, resumed, "b.yaml"), run_b, after_step=3)
    engine_files = {p.name for p in (run_b / "checkpoints" / layout.step_dir_name(stopped) / "engine").iterdir()}
    assert ("zero_pp_rank_1_mp_rank_00_optim_states.pt" in engine_files) == (zero_stage == 3)  # sliced by rank

    straight = dpo_config(tmp_path / "a", micro_model, data, "dpo", **{**common, "max_steps": stopped + 3})
    straight["deepspeed"] = {"zero_stage": zero_stage}
    resumed["dpo_training"]["max_steps"] = stopped + 3
    for config, name in ((straight, "a.yaml"), (resumed, "b.yaml")):
        result = run_cli(["train", "dpo", "--config", str(write_config(tmp_path, config, name))])
        assert result.returncode == 0, result.stderr[-3000:]
    converted = (f"checkpoint {layout.step_dir_name(stopped)} was written with world size 2, this run has 1: "
                 "converting its ZeRO state to DeepSpeed's universal format")
    assert (converted in result.stdout) == (zero_stage == 3)
    assert f"resumed from {run_b / 'checkpoints' / layout.step_dir_name(stopped)} at step {stopped}" in result.stdout
    assert not any(layout.is_scratch_dir(p.name) for p in (run_b / "checkpoints").iterdir())  # converted, loaded, gone
    manifest = json.loads((run_b / "run_manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["world_size"] == 1 and manifest["starts"] == 2
    assert manifest["resumed_from"] == {"checkpoint": layout.step_dir_name(stopped), "step": stopped, "world_size": 2}
    assert_same_weights(Path(straight["dpo_training"]["save_dir"]), run_b)
    logged, straight_logged = scalars(run_b / "tensorboard"), scalars(Path(straight["dpo_training"]["save_dir"]) /
                                                                      "tensorboard")
    assert [s for s, _ in logged["loss"]] == list(range(1, stopped + 4))  # each step once
    assert [v for _, v in logged["loss"]] == pytest.approx([v for _, v in straight_logged["loss"]], abs=1e-5)


def test_one_rank_resumes_on_two_with_the_micro_batch_split_and_dynamic_beta_where_it_was(tmp_path, micro_model):
    """ZeRO-2, Dynamic-Beta DPO: a checkpoint of 1 rank x batch 8 resumes on 2 ranks x batch 4
    (its controller state is the same on every rank: rank 0's is read)."""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 40)
    common = dict(batch_size=8, learning_rate=2e-3, max_steps=8, save_steps=1000, warmup_steps=2)
    straight = dpo_config(tmp_path / "a", micro_model, data, "dynamic_beta_dpo", **common)
    resumed = dpo_config(tmp_path / "b", micro_model, data, "dynamic_beta_dpo", **common)
    for config in (straight, resumed):
        config["deepspeed"] = {"zero_stage": 2}
    assert train(validate_mapping(straight, "dynamic_beta_dpo"), "dynamic_beta_dpo")["status"] == "completed"
    summary = train(validate_mapping(resumed, "dynamic_beta_dpo"), "dynamic_beta_dpo", stop=stop_at(4))
    assert summary["status"] == "preempted"
    resumed["dpo_training"]["batch_size"] = 4  # same global batch on 2 ranks
    result = torchrun_train(write_config(tmp_path, resumed, "b.yaml"), "dynamic-beta-dpo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was written with world size 1, this run has 2: converting" in result.stdout
    run_b = Path(resumed["dpo_training"]["save_dir"])
    assert_same_weights(Path(straight["dpo_training"]["save_dir"]), run_b)
    logged, straight_logged = scalars(run_b / "tensorboard"), scalars(Path(straight["dpo_training"]["save_dir"]) /
                                                                      "tensorboard")
    beta, straight_beta = [v for _, v in logged["dpo/beta"]], [v for _, v in straight_logged["dpo/beta"]]
    assert beta == pytest.approx(straight_beta, rel=1e-6) and len(set(beta)) > 2


def test_a_changed_global_batch_is_refused_saying_what_may_change(tmp_path, micro_model):
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 40)
    config = dpo_config(tmp_path, micro_model, data, "dpo", batch_size=4, max_steps=6, save_steps=1000)
    assert train(validate_mapping(config, "dpo"), "dpo", stop=stop_at(2))["status"] == "preempted"
    config["dpo_training"]["batch_size"] = 2
    result = run_cli(["train", "dpo", "--config", str(write_config(tmp_path, config))])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("refusing to resume: global batch 4 -> 2 (batch_size x gradient_accumulation_steps x world size; any "
            "split of the same global batch resumes, and global_batch_size keeps it on any world size)") \
        in result.stderr
