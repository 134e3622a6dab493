"""The one command (``dpo-hpc submit|status|report``, ``--version``), clear messages when a file
of the other kind is given, and the report of a finished experiment read back."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from conftest import REPO
from test_slurm import DPO, SFT, experiment


def dpo_hpc(cwd, *args):
    return subprocess.run([sys.executable, "-m", "dpo_hpc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_version_and_files_of_the_other_kind(tmp_path):
    from dpo_hpc import __version__

    version = dpo_hpc(REPO, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"dpo-hpc {__version__}"
    wrong = dpo_hpc(REPO, "validate", "experiments/tiny.toml")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    (line,) = wrong.stderr.strip().splitlines()
    assert "experiments/tiny.toml is an experiment file" in line and "dpo-hpc submit experiments/tiny.toml" in line
    wrong = dpo_hpc(REPO, "submit", "experiments/seed/config_dpo.yaml", "--dry-run")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    (line,) = wrong.stderr.strip().splitlines()
    assert "config_dpo.yaml is a trainer config" in line and "dpo-hpc train dynamic-beta-dpo --config" in line
    dry = dpo_hpc(REPO, "submit", "experiments/tiny.toml", "--dry-run", "--out", str(tmp_path / "dry"))
    assert dry.returncode == 0 and (tmp_path / "dry/manifest.jsonl").exists(), dry.stderr
    assert dpo_hpc(REPO, "submit", "--help").stdout.startswith("usage: python -m dpo_hpc.submit")


SEEDED_DPO = DPO.replace('"dpo_training.beta" = [0.1, 0.3]', '"dpo_training.beta" = [0.1, 0.3]\n"dpo_training.seed" = [1, 2]')


def test_report_tables_and_plots_of_a_finished_experiment(tmp_path, micro_model, reverse_data):
    path = experiment(tmp_path, micro_model, reverse_data, SFT + SEEDED_DPO, name="rep")
    done = dpo_hpc(tmp_path, "submit", path.name, "--local", "--set", "training.max_steps=2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--set over every stage that has the key: training.max_steps=2" in done.stdout
    result = dpo_hpc(tmp_path, "report", path.name)  # the plan as submitted, --set included
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out/rep/report"
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 5 and {r["state"] for r in rows} == {"done"}
    for row in rows:  # values read back from each run's manifest
        manifest = json.loads((tmp_path / "out/rep" / row["stage"] / row["run_id"] / "run_manifest.json").read_text())
        if "eval/rewards/accuracies" in row and row["eval/rewards/accuracies"]:
            assert float(row["eval/rewards/accuracies"]) == manifest["final_eval"]["rewards/accuracies"]
        assert int(row["step"]) == manifest["final_step"]
    markdown = (out / "report.md").read_text()
    table = markdown.split("## dpo (dpo)")[1]
    assert "| beta | runs done |" in table and table.count("| 2/2 |") == 2 and " ± " in table  # 2 seeds each
    pngs = sorted(out.glob("*.png"))
    assert any(p.name == "dpo_train_loss.png" for p in pngs)
    assert any(p.name.startswith("dpo_final_eval_rewards_accuracies_by_beta") for p in pngs)
    import matplotlib.image

    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).ndim == 3
