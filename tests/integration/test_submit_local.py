"""The submit command without Slurm: the same experiment through submitit's local executor,
stage after stage, with the same idempotence and status as on a cluster."""

from __future__ import annotations

import json
import subprocess
import sys

from test_slurm import DPO, PRECOMPUTED_DPO, SFT, check_reference_pass, experiment


def run(cwd, module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_local_executor_runs_the_chain_and_skips_it_afterwards(tmp_path, micro_model, reverse_data):
    path = experiment(tmp_path, micro_model, reverse_data, SFT + DPO, name="local")
    first = run(tmp_path, "dpo_hpc.submit", path.name, "--local")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "3 of 3 run(s) done" in first.stdout
    rows = [json.loads(line) for line in run(tmp_path, "dpo_hpc.status", path.name, "--json").stdout.splitlines()]
    assert [r["state"] for r in rows] == ["done"] * 3 and [(r["step"], r["total_steps"]) for r in rows] == \
        [(4, 4), (3, 3), (3, 3)]
    assert all(isinstance(r["eval"]["rewards/accuracies"], float) for r in rows if r["stage"] == "dpo")
    assert [r["grid"] for r in rows][1:] == [{"dpo_training.beta": 0.1}, {"dpo_training.beta": 0.3}]
    assert all(r["log"].endswith(f"{r['job']}_0_log.err") for r in rows)
    # the experiment's shared tokenized splits: SFT's two, and the two both DPO runs key alike
    assert len(list((tmp_path / "out/local/.data_cache").glob("*.safetensors"))) == 4
    # From any directory: relative paths in the file are relative to the file's folder.
    elsewhere = [json.loads(line) for line in run("/", "dpo_hpc.status", str(path), "--json").stdout.splitlines()]
    assert [r["state"] for r in elsewhere] == ["done"] * 3
    again = run(tmp_path, "dpo_hpc.submit", path.name, "--local")
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    dry = run(tmp_path, "dpo_hpc.submit", path.name, "--dry-run", "--out", str(tmp_path / "dry"))
    assert dry.returncode == 0 and dry.stdout.count("skip: done") == 3 and "would submit" not in dry.stdout


def test_local_failure_stops_the_children_and_is_reported(tmp_path, micro_model, reverse_data):
    path = experiment(tmp_path, micro_model, tmp_path / "missing.jsonl", SFT + DPO, name="broken")
    result = run(tmp_path, "dpo_hpc.submit", path.name, "--local", "--no-preflight")  # fail in the job itself
    assert result.returncode == 1
    assert "failed" in result.stdout and "0 of 3 run(s) done" in result.stdout
    assert result.stdout.count("not run: parent sft-") == 2
    rows = [json.loads(line) for line in run(tmp_path, "dpo_hpc.status", path.name, "--json").stdout.splitlines()]
    assert [r["state"] for r in rows] == ["failed", "cancelled", "cancelled"]
    assert "missing.jsonl" in rows[0]["detail"] and "parent sft-" in rows[1]["detail"]


def test_local_executor_runs_the_reference_pass_before_its_readers(tmp_path, micro_model, reverse_data):
    path = experiment(tmp_path, micro_model, reverse_data, SFT + PRECOMPUTED_DPO, name="refpass")
    result = run(tmp_path, "dpo_hpc.submit", path.name, "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 of 4 run(s) done" in result.stdout and "dpo: dpo-ref-" in result.stdout
    check_reference_pass(tmp_path / "out/refpass")


def test_the_chat_example_runs_end_to_end_shrunk(tmp_path):
    """experiments/chat.toml (conversational data, chat template, SFT then LoRA DPO with two
    losses) through the local executor, with fewer rows and steps."""
    import re

    from conftest import REPO

    text = (REPO / "experiments/chat.toml").read_text()
    text = text.replace("n_train = 3000", "n_train = 120").replace("batch_size = 64", "batch_size = 8")
    text = re.sub(r"max_steps = \d+", "max_steps = 3", text).replace("batch_size = 32", "batch_size = 4")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments/chat.toml").write_text(text)  # its paths say ../runs: tmp_path/runs
    result = run(tmp_path, "dpo_hpc.submit", "experiments/chat.toml", "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 of 3 run(s) done" in result.stdout
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "runs/chat/dpo").glob("*/run_manifest.json")]
    assert [m["reference"] for m in manifests] == ["policy with adapters off"] * 2
    assert all((p / "adapter_model.safetensors").exists() for p in (tmp_path / "runs/chat/dpo").iterdir())
