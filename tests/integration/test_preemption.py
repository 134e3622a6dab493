"""A trainer CLI that checkpoints and stops on USR2, then resumes from that step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import run_config
from dpo_hpc.checkpoint import layout


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
    assert (tmp_path / "run" / "checkpoints" / layout.step_dir_name(stopped)).is_dir()
    config["sft_training"]["max_steps"] = stopped + 2  # step counts may change on resume
    (tmp_path / "sft.json").write_text(json.dumps(config))
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {stopped}/{stopped + 2}" in again.stdout
    assert json.loads((tmp_path / "run" / "run_manifest.json").read_text())["status"] == "completed"
