"""The evaluate stages' report: the paired intervals against hand values, the pairing rule."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from conftest import EXPERIMENT_BASE, EXPERIMENT_DPO
from dpo_hpc.experiment import Run
from dpo_hpc.scoreboard import Scored, mean_ci, paired_differences


def test_mean_ci_is_the_student_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean_ci([0.5]) == (0.5, None)
    spread = [0.0, 1.0] * 20  # 40 values: beyond the table, the normal quantile
    assert mean_ci(spread)[1] == pytest.approx(1.96 * statistics.stdev(spread) / math.sqrt(40))


def scored(stage, accuracy, baseline="sft-1", **grid):
    run = Run(stage=stage, index=0, run_id=f"{stage}-{sorted(grid.items())}", trainer=stage, grid_values=grid,
              parent=None, config={}, run_dir=Path("/x"))
    return Scored(run, {"final": {"accuracy": accuracy}, "baseline": {"run": baseline, "accuracy": 0.5}})


def test_runs_pair_on_the_grid_values_both_have_and_on_their_baseline():
    dpo = [scored("dpo", 0.60, label_noise=0.0, seed=1), scored("dpo", 0.70, label_noise=0.0, seed=2),
           scored("dpo", 0.50, label_noise=0.4, seed=1)]
    beta = [scored("beta_dpo", 0.65, label_noise=0.0, seed=1, rho=0.8),  # rho: an axis dpo lacks
            scored("beta_dpo", 0.60, label_noise=0.0, seed=2, rho=0.8),
            scored("beta_dpo", 0.40, label_noise=0.4, seed=1, rho=0.8, baseline="sft-2")]  # another start
    diffs = paired_differences(dpo + beta, "dpo")
    assert diffs == {beta[0].target.run_id: [pytest.approx(0.05)], beta[1].target.run_id: [pytest.approx(-0.10)]}
    # another trainer's seed axis (an SFT control) pairs by seed too, not with every DPO seed
    control = scored("sft_more", 0.62, label_noise=0.0, **{"sft_training.seed": 2})
    assert paired_differences(dpo + [control], "dpo") == {control.target.run_id: [pytest.approx(-0.08)]}


def test_runs_pair_with_one_variant_of_their_stage_by_seed():
    """compare_to = "losses.dpo": every other variant's run against the dpo variant's run of the
    same seed (the variant itself is the axis that differs)."""
    runs = [scored("losses", accuracy, variant=variant, seed=seed)
            for variant, seed, accuracy in (("dpo", 1, 0.30), ("dpo", 2, 0.34), ("rpo", 1, 0.40), ("rpo", 2, 0.41),
                                            ("orpo", 1, 0.35))]
    diffs = paired_differences(runs, "losses.dpo")
    assert diffs == {runs[2].target.run_id: [pytest.approx(0.10)], runs[3].target.run_id: [pytest.approx(0.07)],
                     runs[4].target.run_id: [pytest.approx(0.05)]}


def test_plots_and_table_from_scores_with_a_gridless_baseline_run(tmp_path):
    pytest.importorskip("matplotlib")
    from dpo_hpc.experiment import load_plan
    from dpo_hpc.scoreboard import stage_table, write_plots

    (tmp_path / "exp.toml").write_text(EXPERIMENT_BASE + EXPERIMENT_DPO + """
[stages.dpo.grid]
"dataset.label_noise" = [0.0, 0.4]
"dpo_training.seed" = [1, 2]
[stages.scores]
from = ["sft", "dpo"]
evaluate = { data = "t.jsonl", baseline = "sft", checkpoints = true, compare_to = "dpo" }
""")
    plan = load_plan(tmp_path / "exp.toml")
    scores, sft_dir = [], str(plan.stage_runs("sft")[0].run_dir)
    for i, target in enumerate([*plan.stage_runs("sft"), *plan.stage_runs("dpo")]):
        curve = [{"step": s, "accuracy": 0.1 * s + 0.01 * i} for s in ((0, 2, 4) if target.stage == "dpo" else (2, 4))]
        scores.append(Scored(target, {"prompts": 10, "final": {"accuracy": curve[-1]["accuracy"],
                                                                "answer_logp_change_vs_baseline": 0.1},
                                      "baseline": {"run": sft_dir, "accuracy": 0.05} if target.stage == "dpo" else None,
                                      "by_step": curve}))
    written = {p.name for p in write_plots(plan, "scores", scores, tmp_path)}
    assert written == {"scores_accuracy_by_step.png", "scores_accuracy_by_label_noise.png",
                       "scores_answer_logp_change_vs_baseline_by_label_noise.png"}
    table = stage_table(plan, "scores", scores)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| sft (baseline) | - | 1 | 0.400 |")  # once, not again as a baseline line
    assert "`sft-" not in table and sum(r.startswith("| dpo | label_noise=") for r in rows) == 2


def test_a_later_round_is_paired_with_the_run_whose_pairs_it_trained_on(tmp_path):
    """rounds = 2: each round-2 run against the round-1 run of its own seed, by hand values."""
    from dpo_hpc.experiment import load_plan
    from dpo_hpc.scoreboard import round_differences, stage_table

    (tmp_path / "exp.toml").write_text(EXPERIMENT_BASE + """
[stages.pairs]
from = "sft"
generate = { prompts = "p.jsonl", verifiable = true }
[stages.dpo]
trainer = "dpo"
from = "pairs"
rounds = 2
[stages.dpo.config]
dpo_training = { learning_rate = 1e-6, batch_size = 2 }
[stages.dpo.grid]
"dpo_training.seed" = [1, 2]
[stages.scores]
from = ["sft", "dpo"]
evaluate = { data = "t.jsonl" }
""")
    plan = load_plan(tmp_path / "exp.toml")
    accuracy = {"sft": [0.2], "dpo": [0.30, 0.40], "dpo_round2": [0.35, 0.38]}
    scores = [Scored(run, {"prompts": 10, "final": {"accuracy": accuracy[stage][i]}})
              for stage in accuracy for i, run in enumerate(plan.stage_runs(stage))]
    second = plan.stage_runs("dpo_round2")
    assert round_differences(plan, scores) == {second[0].run_id: [pytest.approx(0.05)],
                                               second[1].run_id: [pytest.approx(-0.02)]}
    rows = {line.split(" | ")[0]: line for line in stage_table(plan, "scores", scores).splitlines()}
    mean, half = mean_ci([0.05, -0.02])
    assert rows["| dpo_round2"].endswith(f"| {mean:+.3f} ± {half:.3f} (n=2) |") and rows["| dpo"].endswith("| - |")
