"""Evaluate stages end to end through the local executor: SFT, then DPO and Beta-DPO over two
seeds, each run scored (final model, every checkpoint, against its SFT start) into its run
directory, and the report's paired comparison, CSV and plots read back; and a reward model trained
in the experiment judging the policies' replies."""

from __future__ import annotations

import csv
import json

import pytest

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
    """test_slurm's DPO stage as ``trainer``, over two seeds, keeping every checkpoint (plots by a
    grid axis are tested on hand-made scores in tests/unit/test_scoreboard.py)."""
    return edited(
        DPO, ("stages.dpo", f"stages.{trainer}"), ('trainer = "dpo"', f'trainer = "{trainer}"'),
        ("logging_steps = 1 }", 'logging_steps = 1, save_steps = 2, save_total_limit = 5, checkpoints_at_end = "all" }'),
        ("max_steps = 3", "max_steps = 4"),
        ('"dpo_training.beta" = [0.1, 0.3]', '"dpo_training.seed" = [1, 2]'))


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
    assert "10 of 10 run(s) done" in result.stdout  # 1 + 4 trained, 5 scored

    rows = [json.loads(line) for line in run(tmp_path, "dpo_hpc.status", path.name, "--json").stdout.splitlines()]
    scored = [r for r in rows if r["stage"] == "scores"]
    assert len(scored) == 5 and {r["state"] for r in rows} == {"done"}
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
    beta_rows = [line for line in text.splitlines() if line.startswith("| beta_dpo |")]
    assert len(beta_rows) == 1 and "(n=2)" in beta_rows[0]  # paired over the two seeds
    table = list(csv.DictReader((root / "report/scores.csv").open()))
    assert len(table) == 5 and {r["stage"] for r in table} == {"sft", "dpo", "beta_dpo"}
    assert (root / "report/scores_accuracy_by_step.png").stat().st_size > 5000


REWARD_JUDGE = DPO + """
[stages.rm]
trainer = "reward"
from = "sft"
[stages.rm.config]
dataset = { dataset_name = "DATA", val_ratio = 0.1, max_length = 96, max_prompt_length = 64 }
reward_training = { learning_rate = 1e-3, batch_size = 4, max_steps = 3, logging_steps = 1 }

[stages.judged]
from = ["sft", "dpo"]
evaluate = { reward_model = "rm", baseline = "sft", compare_to = "dpo", limit = 6, max_new_tokens = 8, batch_size = 4 }
"""


def test_a_reward_model_judges_each_runs_replies_to_its_validation_prompts(tmp_path, micro_model, reverse_data):
    """SFT, two DPO runs and a reward model from the SFT model; an evaluate stage that waits for the
    reward model scores each policy's greedy replies, against the SFT model's, prompt by prompt."""
    path = experiment(tmp_path, micro_model, reverse_data, SFT + REWARD_JUDGE, name="judged")
    dry = run(tmp_path, "dpo_hpc.submit", path.name, "--dry-run")
    assert "judged by rm" in dry.stdout, dry.stdout
    result = run(tmp_path, "dpo_hpc.submit", path.name, "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 of 7 run(s) done" in result.stdout  # sft, 2 dpo, rm; 3 scored

    root = tmp_path / "out/judged"
    (rm_dir,) = (root / "rm").iterdir()
    for run_dir in (root / "dpo").iterdir():
        scores = json.loads((run_dir / "evaluations/judged/evaluation.json").read_text())
        assert scores["metric"] == "reward" and scores["reward_model"] == str(rm_dir) and scores["prompts"] == 6
        assert "correct" not in scores and len(scores["examples"]) == 5
        final, base = scores["final"], scores["baseline"]
        assert final["reward_change_vs_baseline"] == pytest.approx(final["reward"] - base["reward"])
        assert 0.0 <= final["win_rate_vs_baseline"] <= 1.0
        curve = read_scalars(run_dir / "evaluations/judged/tensorboard")["eval/task_reward"]
        assert [step for step, _ in curve] == [0, 3]  # the SFT start and the end
    status = run(tmp_path, "dpo_hpc.status", path.name).stdout
    judged = [line for line in status.splitlines() if line.startswith("judged")]
    assert len(judged) == 3 and all(" reward " in line for line in judged), status  # each one's mean reward
    report = run(tmp_path, "dpo_hpc.report", path.name)
    assert report.returncode == 0, report.stdout + report.stderr
    text = (root / "report/report.md").read_text()
    assert "| stage | setting | runs | reward | Δ reward vs baseline |" in text and "Δ reward vs dpo" in text
    assert "judged by" in text
    table = list(csv.DictReader((root / "report/judged.csv").open()))
    assert len(table) == 3 and all(row["reward"] for row in table)

    # Changed settings make other scorings in the same folders: submitted again, they are redone
    # (only they: the trained runs stay done).
    path.write_text(path.read_text().replace("limit = 6", "limit = 4"))
    before = run(tmp_path, "dpo_hpc.status", path.name).stdout
    assert before.count("scored under other settings") == 3, before
    assert run(tmp_path, "dpo_hpc.report", path.name).returncode == 0  # their old scores are not shown as these
    assert "Left out: 3 scoring(s) made under other settings" in (root / "report/report.md").read_text()
    again = run(tmp_path, "dpo_hpc.submit", path.name, "--local")
    assert again.returncode == 0 and "3 of 3 run(s) done" in again.stdout, again.stdout + again.stderr
    assert again.stdout.count("skip: done") == 4 and again.stdout.count("not submitted submit") == 3
    for run_dir in (root / "dpo").iterdir():
        assert json.loads((run_dir / "evaluations/judged/evaluation.json").read_text())["prompts"] == 4
