"""The report of an experiment's evaluate stages: scores per method and setting, paired
comparisons with confidence intervals, the score against step and against a grid axis. The score
is the verifiable task's accuracy, or a reward model's mean reward (each evaluation names its
``metric``).

Read back from ``<run dir>/evaluations/<stage>/evaluation.json`` (written by the stage's tasks),
so it can be made while scoring is still going. ``dpo-hpc report`` calls it for every evaluate
stage of the plan.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .checkpoint.run_dir import RunDir
from .evaluate import EVALUATION_FILE
from .experiment import VARIANT, Plan, Run

# Two-sided 95% Student t quantiles by degrees of freedom (1..30); the normal 1.96 beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def mean_ci(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and the half-width of its 95% t interval (None for a single value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    t = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def is_seed_axis(axis: str) -> bool:
    return axis.split(".")[-1] == "seed"


def short(axis: str) -> str:
    return axis.split(".")[-1]


@dataclass
class Scored:
    """One run's scores from one evaluate stage."""

    target: Run
    result: dict[str, Any]

    @property
    def final(self) -> dict[str, Any]:
        return self.result["final"]

    def setting(self, averaged: set[str]) -> tuple:
        """The run's grid point without seeds and averaged axes: runs of one setting are pooled."""
        return tuple((a, v) for a, v in self.target.grid_values.items() if not is_seed_axis(a) and a not in averaged)


def headline(scores: list[Scored]) -> str:
    """The stage's score: ``accuracy`` or ``reward`` (the metric its evaluations name; older ones
    name none and are the verifiable task's)."""
    return scores[0].result.get("metric", "accuracy") if scores else "accuracy"


def read_scores(plan: Plan, stage: str) -> list[Scored]:
    """The stage's scorings that are done under its present settings (one made under others is
    left out: ``stage_table`` counts them)."""
    scored = []
    for run in plan.stage_runs(stage, "evaluate"):
        path = run.run_dir / EVALUATION_FILE
        if path.is_file() and not RunDir(run.run_dir).other_run(run.run_id):
            scored.append(Scored(plan.run(run.parent), json.loads(path.read_text())))
    return scored


def _text(setting: tuple) -> str:
    return " ".join(f"{short(a)}={v}" for a, v in setting) or "-"


def _cell(values: list[float], digits: int = 3, signed: bool = False) -> str:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return "-"
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {statistics.stdev(values):.{digits}f}"


def paired_differences(scores: list[Scored], compare_to: str) -> dict[str, list[float]]:
    """Run id -> [its score minus that of the ``compare_to`` run (a stage's, or ``STAGE.VARIANT``:
    that variant's) with the same values on the grid axes both runs have (same noise, same seed,
    whichever trainer's seed) and the same baseline]."""
    def values(s: Scored) -> dict[str, Any]:  # every trainer's seed is one axis: an SFT run pairs by seed too
        return {("seed" if is_seed_axis(a) else a): v for a, v in s.target.grid_values.items()}

    metric, stages = headline(scores), {s.target.stage for s in scores}
    stage, variant = (compare_to, None) if compare_to in stages else compare_to.rpartition(".")[::2]
    reference = [s for s in scores if s.target.stage == stage
                 and (variant is None or s.target.grid_values.get(VARIANT) == variant)]
    compared = {r.target.run_id for r in reference}
    out: dict[str, list[float]] = {}
    for s in scores:
        if s.target.run_id in compared:
            continue
        for r in reference:
            mine, theirs = values(s), values(r)
            if variant is not None:  # runs of the other variants: paired by their other axes (the seed)
                mine.pop(VARIANT, None), theirs.pop(VARIANT, None)
            if all(mine[a] == theirs[a] for a in set(mine) & set(theirs)) \
                    and (s.result.get("baseline") or {}).get("run") == (r.result.get("baseline") or {}).get("run"):
                out.setdefault(s.target.run_id, []).append(s.final[metric] - r.final[metric])
    return out


def round_differences(plan: Plan, scores: list[Scored]) -> dict[str, list[float]]:
    """Run id -> [its score minus that of the run it continues], for the runs of a later round
    (``rounds``) whose round-before run is scored too: the pairs drawn by a run, trained on by its
    next round's run, share its seed and settings."""
    metric, by_id = headline(scores), {s.target.run_id: s for s in scores}
    parent_of = {r.run_id: r.parent for r in plan.runs}
    out: dict[str, list[float]] = {}
    for s in scores:
        if s.target.stage not in plan.copies or s.target.parent is None:
            continue
        before = by_id.get(parent_of.get(s.target.parent) or "")  # its pairs' run: the round before
        if before is not None:
            out[s.target.run_id] = [s.final[metric] - before.final[metric]]
    return out


def _paired_cell(diffs: list[float]) -> str:
    if not diffs:
        return "-"
    mean, half = mean_ci(diffs)
    return f"{mean:+.3f}{f' ± {half:.3f}' if half is not None else ''} (n={len(diffs)})"


def stage_table(plan: Plan, stage: str, scores: list[Scored]) -> str:
    """Markdown: one row per scored stage and setting (mean ± sd over its seeds and averaged axes)."""
    section = plan.experiment.stages[stage].evaluate
    averaged = set(section.average_over)
    order = {name: i for i, name in enumerate(plan.stage_order)}
    groups: dict[tuple, list[Scored]] = {}
    for s in scores:
        groups.setdefault((s.target.stage, s.setting(averaged)), []).append(s)
    paired = paired_differences(scores, section.compare_to) if section.compare_to else {}
    metric = headline(scores)
    header = ["stage", "setting", "runs", metric, f"Δ {metric} vs baseline", "Δ log p(answer) vs baseline",
              "win rate vs baseline"]
    if section.compare_to:
        header.append(f"Δ {metric} vs {section.compare_to} (95% CI, paired)")
    rounds = round_differences(plan, scores)
    if rounds:
        header.append(f"Δ {metric} vs the round before (95% CI, paired)")
    baselines = {s.result["baseline"]["run"]: s.result["baseline"] for s in scores if s.result.get("baseline")}
    scored_dirs = {str(s.target.run_dir) for s in scores}
    rows = []
    for (target_stage, setting), members in groups.items():
        means = [m.final[metric] for m in members]
        cells = [target_stage, _text(setting), str(len(members)), _cell(means),
                 _cell([m.final.get(f"{metric}_change_vs_baseline") for m in members], signed=True),
                 _cell([m.final.get("answer_logp_change_vs_baseline") for m in members], 2, signed=True),
                 _cell([m.final.get("win_rate_vs_baseline") for m in members])]
        if section.compare_to:
            cells.append(_paired_cell([d for m in members for d in paired.get(m.target.run_id, [])]))
        if rounds:
            cells.append(_paired_cell([d for m in members for d in rounds.get(m.target.run_id, [])]))
        if {str(m.target.run_dir) for m in members} <= set(baselines):
            cells[0] += " (baseline)"
        rows.append((order[target_stage], statistics.mean(means), setting, cells))
    if averaged:  # ranking settings: best first within each stage, the best marked
        rows.sort(key=lambda r: (r[0], -r[1]))
        best: dict[int, list] = {}
        for row in rows:
            best.setdefault(row[0], []).append(row)
        for ranked in best.values():
            if len(ranked) > 1:  # a stage with one setting has nothing to choose
                ranked[0][3][1] = f"**{ranked[0][3][1]}** (best)"
    else:
        rows.sort(key=lambda r: (bool(r[2]), str(r[2]), r[0]))  # gridless runs (the baseline) first
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run_dir, base in baselines.items():
        if run_dir in scored_dirs:  # scored here too: its own row says so
            continue
        lines.append(f"| baseline `{Path(base['run']).name}` | - | 1 | {base[metric]:.3f} |"
                     + " - |" * (len(header) - 4))
    lines += ["| " + " | ".join(cells) + " |" for *_, cells in rows]
    prompts = sorted({s.result["prompts"] for s in scores})
    note = (f"\n\n{len(scores)} runs scored on {', '.join(map(str, prompts))} prompts ({section.prompts}); "
            "mean ± sample sd over seeds" + (f" and {', '.join(map(short, averaged))}" if averaged else "") + "."
            ) if scores else "\n\nNo run of this stage scored yet."
    if section.compare_to:
        note += (f" Paired: each run against the `{section.compare_to}` run with the same grid values on "
                 "the axes both have and the same baseline; 95% t interval over the pairs.")
    if rounds:
        note += " The round before: each run of a later round against the run whose pairs it trained on."
    skipped: dict[str, int] = {}
    for s in scores:
        for why, n in s.result.get("checkpoints_not_scored", {}).items():
            skipped[why] = skipped.get(why, 0) + n
    if skipped:
        note += " Checkpoints not scored: " + "; ".join(f"{n} ({why})" for why, n in skipped.items()) + "."
    stale = sum(bool(RunDir(r.run_dir).other_run(r.run_id)) for r in plan.stage_runs(stage, "evaluate"))
    if stale:
        note += (f" Left out: {stale} scoring(s) made under other settings of this stage (submit the experiment "
                 "to score them again).")
    return "\n".join(lines) + note


def write_csv(scores: list[Scored], path: Path) -> None:
    metric = headline(scores)
    rows = [{"stage": s.target.stage, "run_id": s.target.run_id, **s.target.grid_values,
             **{k: v for k, v in s.final.items()},
             f"baseline_{metric}": (s.result.get("baseline") or {}).get(metric)} for s in scores]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def save_figure(plt, fig, path: Path) -> Path:
    """Write a finished figure as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # a legend beside the axes is kept
    plt.close(fig)
    return path


def write_plots(plan: Plan, stage: str, scores: list[Scored], out: Path, max_panels: int = 12) -> list[Path]:
    """The score against step (one panel per setting, a line per scored stage, mean over seeds) and
    the final score / answer log-prob change against each numeric grid axis (mean ± sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, metric = [], headline(scores)
    averaged = set(plan.experiment.stages[stage].evaluate.average_over)
    # Runs without grid values (a lone SFT run) are the baseline line, not a curve of their own.
    gridded = [s for s in scores if s.target.grid_values]
    stages = [name for name in plan.stage_order if any(s.target.stage == name for s in gridded)]
    shared = [a for a in gridded[0].target.grid_values if all(a in s.target.grid_values for s in gridded)
              and not is_seed_axis(a) and a not in averaged] if gridded else []
    panels: dict[tuple, list[Scored]] = {}
    for s in gridded:
        if len(s.result.get("by_step", [])) > 1:
            panels.setdefault(tuple((a, s.target.grid_values[a]) for a in shared), []).append(s)
    if panels and len(panels) <= max_panels:
        cols = min(len(panels), 4)
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharey=True, squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (panel, members) in zip(axes.flat, sorted(panels.items())):
            for name in stages:
                curves = [{p["step"]: p[metric] for p in m.result["by_step"]} for m in members
                          if m.target.stage == name]
                steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
                if steps:
                    ax.plot(steps, [statistics.mean(c[t] for c in curves) for t in steps], marker="o", markersize=3,
                            label=f"{name} (n={len(curves)})")
            ax.set_title(_text(panel), fontsize=9)
            ax.set_xlabel("optimizer step")
        for row in axes:
            row[0].set_ylabel(f"{metric} (mean over seeds)")
        handles = {}  # one entry per line label over every panel (a stage may be in some panels only)
        for ax in axes.flat[:len(panels)]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        axes.flat[len(panels) - 1].legend(handles.values(), handles.keys(), fontsize=7)
        fig.suptitle(f"{stage}: {metric} against step", fontsize=10)
        path = out / f"{stage}_{metric}_by_step.png"
        written.append(save_figure(plt, fig, path))
    numeric = [a for a in shared if all(isinstance(s.target.grid_values[a], (int, float)) for s in gridded)]
    baselines = [s.result["baseline"][metric] for s in scores if s.result.get("baseline")]
    for axis in numeric:
        values = [s.target.grid_values[axis] for s in gridded]
        log_axis = min(values) > 0 and max(values) >= 10 * min(values)  # learning rates and the like
        for plotted, label in ((metric, f"final {metric}"), ("answer_logp_change_vs_baseline",
                                                            "Δ log p(right answer) vs baseline")):
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            drawn = False
            for i, name in enumerate(stages):
                by_value: dict[Any, list[float]] = {}
                for s in gridded:
                    if s.target.stage == name and isinstance(s.final.get(plotted), (int, float)):
                        by_value.setdefault(s.target.grid_values[axis], []).append(s.final[plotted])
                if not by_value:
                    continue
                xs = sorted(by_value)
                shift = (i - (len(stages) - 1) / 2) * 0.02  # error bars side by side, not on top of each other
                moved = [x * (1 + shift) for x in xs] if log_axis else [x + shift * 0.2 * (max(xs) - min(xs) or 1) for x in xs]
                ax.errorbar(moved, [statistics.mean(by_value[x]) for x in xs],
                            yerr=[statistics.stdev(by_value[x]) if len(by_value[x]) > 1 else 0 for x in xs],
                            marker="o", capsize=3, label=name)
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            if plotted == metric and baselines:
                ax.axhline(statistics.mean(baselines), color="gray", linestyle="--", label="baseline")
            ax.set_xlabel(axis)
            if log_axis:
                ax.set_xscale("log")
            ax.set_ylabel(label)
            ax.set_title(f"{stage}: {label} by {short(axis)} (mean ± sd over runs)", fontsize=9)
            ax.legend(fontsize=7)
            path = out / f"{stage}_{plotted}_by_{short(axis)}.png"
            written.append(save_figure(plt, fig, path))
    return written
