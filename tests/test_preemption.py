"""Stop signal and requeue policy: pure decisions, the signal flag, and a trainer CLI that
checkpoints and stops on USR2, then resumes from that step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import run_config
from dpo_hpc.hpc.state import _expand_array_ids, error_line
from dpo_hpc.hpc.task import requeue_decision
from dpo_hpc.trainers.preemption import StopSignal


def test_requeue_policy_caps_requeues_and_needs_progress():
    assert requeue_decision([], step=5, max_requeues=3) == ""
    assert requeue_decision([{"step": 5}], step=9, max_requeues=3) == ""
    assert "no progress" in requeue_decision([{"step": 9}], step=9, max_requeues=3)
    assert "max_requeues = 2" in requeue_decision([{"step": 1}, {"step": 2}], step=9, max_requeues=2)
    assert "max_requeues = 0" in requeue_decision([], step=9, max_requeues=0)


def test_stop_signal_only_sets_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopSignal(signal.SIGUSR2).install()
    assert not stop.agreed(1, torch.device("cpu"))
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stop.received_signal == signal.SIGUSR2 and stop.agreed(1, torch.device("cpu"))
    stop.restore()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_slurm_output_parsing():
    assert _expand_array_ids("12_[0-2,5%4]") == ["12_0", "12_1", "12_2", "12_5"]
    assert _expand_array_ids("12_3") == ["12_3"] and _expand_array_ids("40") == ["40"]
    log = ("Traceback (most recent call last):\n  File x\n[rank0]: dpo_hpc.data.loading.DataError: dataset.dataset_name: "
           "local path 'x' does not exist\nsrun: error: task 0: Exited with exit code 1\n")
    assert error_line(log) == "dpo_hpc.data.loading.DataError: dataset.dataset_name: local path 'x' does not exist"
    assert error_line("all good\n") == ""


def test_trainer_cli_checkpoints_on_usr2_and_resumes_from_there(tmp_path, micro_model, reverse_data):
    config = run_config(tmp_path, micro_model, reverse_data, "sft_training", max_steps=400, logging_steps=1)
    (tmp_path / "sft.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "dpo_hpc", "train", "sft", "--config", str(tmp_path / "sft.json")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = tmp_path / "run" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and json.loads(progress.read_text())["step"] >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-3000:]  # stopped with a checkpoint, not requeued (no Slurm here)
    assert "not requeued: not running under Slurm" in out
    manifest = json.loads((tmp_path / "run" / "run_manifest.json").read_text())
    stopped = manifest["step"]
    assert manifest["status"] == "preempted" and 3 <= stopped < 400
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped:08d}").is_dir()
    config["sft_training"]["max_steps"] = stopped + 2  # step counts may change on resume
    (tmp_path / "sft.json").write_text(json.dumps(config))
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {stopped}/{stopped + 2}" in again.stdout
    assert json.loads((tmp_path / "run" / "run_manifest.json").read_text())["status"] == "completed"
