"""Evaluate stages end to end through the local executor: SFT, then DPO and Beta-DPO over label
noise x seed, each run scored (final model, every checkpoint, against its SFT start) into its run
directory, and the report's paired comparison, CSV and plots read back."""

from __future__ import annotations

import csv
import json

from test_slurm import DPO, SFT, experiment
from test_submit_local import run

from dpo_hpc.trainers.trackers import read_scalars


def edited(text: str, *changes: tuple[str, str]) -> str:
    """``text`` with each (old, new) replaced; an ``old`` that is not there fails loudly instead of
    leaving a stage silently unchanged."""
    for old, new in changes:
        assert old in text, f"test_slurm's DPO stage no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def method_stage(trainer: str) -> str:
    """test_slurm's DPO stage as ``trainer``, over label noise x seed, keeping every checkpoint."""
    return edited(
        DPO, ("stages.dpo", f"stages.{trainer}"), ('trainer = "dpo"', f'trainer = "{trainer}"'),
        ("logging_steps = 1 }", 'logging_steps = 1, save_steps = 2, save_total_limit = 5, checkpoints_at_end = "all" }'),
        ("max_steps = 3", "max_steps = 4"),
        ('"dpo_training.beta" = [0.1, 0.3]', '"dataset.label_noise" = [0.0, 0.5]\n"dpo_training.seed" = [1, 2]'))


METHODS = method_stage("dpo") + method_stage("beta_dpo") + """
[stages.scores]
from = ["sft", "dpo", "beta_dpo"]
evaluate = { data = "TEST", baseline = "sft", checkpoints = true, compare_to = "dpo", limit = 12, max_new_tokens = 8 }
"""


def test_evaluate_stage_scores_each_run_and_the_report_compares_them(tmp_path, micro_model, reverse_data):
    path = experiment(tmp_path, micro_model, reverse_data,
                      SFT + METHODS.replace("TEST", str(reverse_data.parent / "test.jsonl")), name="scored")
    result = run(tmp_path, "dpo_hpc.submit", path.name, "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "18 of 18 run(s) done" in result.stdout  # 1 + 8 trained, 9 scored

    rows = [json.loads(line) for line in run(tmp_path, "dpo_hpc.status", path.name, "--json").stdout.splitlines()]
    scored = [r for r in rows if r["stage"] == "scores"]
    assert len(scored) == 9 and {r["state"] for r in rows} == {"done"}
    assert all(0.0 <= r["eval"]["accuracy"] <= 1.0 for r in scored)

    root = tmp_path / "out/scored"
    for run_dir in (root / "dpo").iterdir():
        scores = json.loads((run_dir / "evaluations/scores/evaluation.json").read_text())
        assert scores["prompts"] == 12 and len(scores["correct"]) == 12
        assert [p["step"] for p in scores["by_step"]] == [0, 2, 4]  # the SFT start, a checkpoint, the end
        assert scores["by_step"][0]["accuracy"] == scores["baseline"]["accuracy"]
        assert scores["by_step"][-1]["accuracy"] == scores["final"]["accuracy"]
        assert scores["final"]["accuracy_change_vs_baseline"] == \
            scores["final"]["accuracy"] - scores["baseline"]["accuracy"]
        curve = read_scalars(run_dir / "evaluations/scores/tensorboard")["eval/task_accuracy"]
        assert [step for step, _ in curve] == [0, 2, 4]
    sft = json.loads(next((root / "sft").iterdir()).joinpath("evaluations/scores/evaluation.json").read_text())
    assert sft["baseline"] is None and [p["step"] for p in sft["by_step"]] == [4]

    report = run(tmp_path, "dpo_hpc.report", path.name)
    assert report.returncode == 0, report.stdout + report.stderr
    text = (root / "report/report.md").read_text()
    assert "## scores (scores)" in text and "Δ accuracy vs dpo (95% CI, paired)" in text
    beta_rows = [line for line in text.splitlines() if line.startswith("| beta_dpo | label_noise=")]
    assert len(beta_rows) == 2 and all("(n=2)" in line for line in beta_rows)  # paired over the two seeds
    table = list(csv.DictReader((root / "report/scores.csv").open()))
    assert len(table) == 9 and {r["stage"] for r in table} == {"sft", "dpo", "beta_dpo"}
    for name in ("scores_accuracy_by_step.png", "scores_accuracy_by_label_noise.png",
                 "scores_answer_logp_change_vs_baseline_by_label_noise.png"):
        assert (root / "report" / name).stat().st_size > 5000
