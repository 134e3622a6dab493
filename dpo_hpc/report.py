"""Results of an experiment at a glance: ``dpo-hpc report experiments/x.toml [--out DIR]``.

Writes into ``<root>/report/`` (or ``--out``):

- ``runs.csv``: one row per run: stage, run id, each grid value, seed, state, steps, the final
  train and eval metrics, time and throughput (raw numbers, for pandas or a spreadsheet);
- ``report.md``: per stage, one row per grid point with mean ± std over its seeds (grid axes
  named ``*.seed``), and the number of runs done;
- with matplotlib (``pip install 'dpo-hpc[plots]'``), PNG plots per stage: each metric's curve per
  grid point (mean over seeds), and each final eval metric against each numeric grid axis;
- ``samples.md``, where runs generated samples (``generate_during_eval``): per stage and prompt,
  every run's last completion, so settings read side by side;
- for each evaluate stage (``dpo_hpc.scoreboard``): a section of report.md with the scores per
  stage and setting, paired differences with 95% intervals, ``<stage>.csv``, and plots of
  accuracy against step and against each numeric grid axis.

Everything is read back from the run directories (manifest, progress, TensorBoard events), so a
report can be made while runs are still going, and again when they finish.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import scoreboard
from .scoreboard import is_seed_axis, save_figure
from .checkpoint import RunDir
from .config import ALGORITHMS
from .experiment import GENERATION_FILE, Plan, Run, grid_label
from .launch.guard import guarded
from .launch.plans import open_plan, plan_parser
from .launch.jobs import plan_status
from .launch.submission import ledger_of
from .trainers.metrics import THROUGHPUT

CURVES = ("train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen_change",
          "train/dpo/beta", "train/beta_dpo/beta_used", "train/kl", "eval/loss", "eval/rewards/accuracies",
          "eval/rewards/margins")
"""Metrics drawn as curves, where a stage logged them."""

FINAL = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen_change", "kl")
"""Final metrics in the tables (eval, else train), where a run has them."""


def run_row(plan: Plan, run: Run, state: str) -> dict[str, Any]:
    """Everything the tables say about one run, as raw values."""
    run_dir = RunDir(run.run_dir)
    manifest = run_dir.read_manifest() or {}
    progress = run_dir.read_progress() or {}
    training = run.config[ALGORITHMS[run.trainer].training_section]
    row: dict[str, Any] = {"stage": run.stage, "run_id": run.run_id, **run.grid_values,
                           "seed": training.get("seed"), "state": state,
                           "step": manifest.get("final_step", progress.get("step")),
                           "total_steps": manifest.get("final_step", progress.get("total_steps"))}
    train = progress.get("train") or {}
    evaluation = manifest.get("final_eval") or progress.get("eval") or {}
    for name in FINAL:
        if name in train:
            row[f"train/{name}"] = train[name]
        if name in evaluation:
            row[f"eval/{name}"] = evaluation[name]
    for key in ("train_seconds", *(summary for summary, _ in THROUGHPUT.values())):
        if key in manifest:
            row[key] = manifest[key]
    return row


def mean_std(values: list[float]) -> str:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def grid_point(run: Run) -> tuple:
    """The run's grid values without its seed axes (seeds of one point are averaged)."""
    return tuple((axis, value) for axis, value in run.grid_values.items() if not is_seed_axis(axis))


def stage_table(plan: Plan, stage: str, rows: dict[str, dict]) -> str:
    runs = plan.stage_runs(stage)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(grid_point(run), []).append(run)
    metrics = [m for m in (*(f"eval/{n}" for n in FINAL), "train/loss")  # runs.csv has the rest
               if any(m in rows[r.run_id] for r in runs)]
    axes = [axis for axis, _ in next(iter(groups))] if groups else []
    header = [*(a.split(".")[-1] for a in axes), "runs done", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point, members in groups.items():
        done = sum(rows[r.run_id]["state"] == "done" for r in members)
        cells = [str(value) for _, value in point] + [f"{done}/{len(members)}"]
        cells += [mean_std([rows[r.run_id].get(m) for r in members]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(plan: Plan, rows: dict[str, dict], out: Path) -> tuple[Path, Path]:
    columns: list[str] = []
    for row in rows.values():
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows.values())
    csv_path, md_path = out / "runs.csv", out / "report.md"
    csv_path.write_text(buffer.getvalue())
    parts = [f"# {plan.experiment.experiment.name}\n",
             "Mean ± std over seeds (grid axes named `seed`); final eval metrics where the run evaluated.\n"]
    for stage in plan.stage_order:
        trainer = plan.experiment.stages[stage].trainer
        if plan.experiment.stages[stage].generate is not None:
            parts.append(f"## {stage} (pairs)\n\n{pairs_table(plan, stage)}\n")
            continue
        if trainer is None:
            scores = scoreboard.read_scores(plan, stage)
            scoreboard.write_csv(scores, out / f"{stage}.csv")
            parts.append(f"## {stage} (scores)\n\n{scoreboard.stage_table(plan, stage, scores)}\n")
            continue
        parts.append(f"## {stage} ({trainer})\n\n{stage_table(plan, stage, rows)}\n")
    md_path.write_text("\n".join(parts))
    return csv_path, md_path


def pairs_table(plan: Plan, stage: str) -> str:
    """A generate stage's pair sets, one row per model sampled (``generation.json``; not yet made: blank)."""
    lines = ["| model | setting | prompts | pairs | all samples alike | mean reward | chosen | rejected |",
             "|---|---|---|---|---|---|---|---|"]
    for run in plan.stage_runs(stage, "generate"):
        path = run.run_dir / GENERATION_FILE
        made = json.loads(path.read_text()) if path.exists() else None
        cells = ["", "", "", "", "", ""] if made is None else [
            made["prompts"], made["pairs"], made["skipped"]["no_reward_spread"], f"{made['mean_reward']:.4g}",
            f"{made['mean_chosen_reward']:.4g}", f"{made['mean_rejected_reward']:.4g}"]
        label = grid_label(run.grid_values.items()) or "-"
        lines.append("| " + " | ".join(map(str, [run.parent, label, *cells])) + " |")
    return "\n".join(lines)


def samples_markdown(plan: Plan) -> Optional[str]:
    """Per stage and sample prompt, every run's last completion of it (``generate_during_eval``):
    what each setting writes to the same prompt. None when no run generated samples."""
    from .trainers.trackers import indented

    parts = [f"# {plan.experiment.experiment.name}: sample generations\n",
             "Each run's last greedy completions of its first validation prompts (`generate_during_eval`).\n"]
    for stage in plan.stage_order:
        if plan.experiment.stages[stage].trainer is None:
            continue
        by_prompt: dict[str, list[tuple[Run, dict]]] = {}
        for run in plan.stage_runs(stage):
            for record in RunDir(run.run_dir).latest_samples():
                by_prompt.setdefault(record["prompt"], []).append((run, record))
        if not by_prompt:
            continue
        parts.append(f"## {stage}\n")
        for number, (prompt, found) in enumerate(by_prompt.items()):
            parts.append(f"### prompt {number}\n\n{indented(prompt)}\n\n*the data's reply*\n\n"
                         f"{indented(found[0][1]['reference'])}\n")
            for run, record in found:
                label = grid_label(run.grid_values.items()) or stage
                parts.append(f"**{label}** ({run.run_id}, step {record['step']})\n\n"
                             f"{indented(record['completion'])}\n")
    return "\n".join(parts) if len(parts) > 2 else None


def write_plots(plan: Plan, rows: dict[str, dict], out: Path) -> list[Path]:
    """PNG curves and final-metric plots per stage (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .trainers.trackers import read_scalars

    written = []
    for stage in plan.stage_order:
        if plan.experiment.stages[stage].evaluate is not None:
            written += scoreboard.write_plots(plan, stage, scoreboard.read_scores(plan, stage), out)
            continue
        if plan.experiment.stages[stage].generate is not None:
            continue
        runs = [r for r in plan.stage_runs(stage) if r.run_dir.joinpath("tensorboard").is_dir()]
        logged = {r.run_id: read_scalars(r.run_dir / "tensorboard") for r in runs}
        groups: dict[tuple, list[Run]] = {}
        for run in runs:
            groups.setdefault(grid_point(run), []).append(run)
        many = len(groups) > 10  # a tuning grid: a colour scale, the legend beside the plot in columns
        columns = math.ceil(len(groups) / 24)
        for metric in CURVES:
            if not any(metric in logged[r.run_id] for r in runs):
                continue
            fig, ax = plt.subplots(figsize=(6 + (3.6 * columns if many else 0), 4))
            colours = iter(plt.cm.viridis([i / max(len(groups) - 1, 1) for i in range(len(groups))]) if many else [])
            for point, members in groups.items():
                colour = next(colours, None)
                series = [dict(logged[r.run_id].get(metric, [])) for r in members]
                steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
                if steps:
                    label = grid_label(point) or stage
                    ax.plot(steps, [statistics.mean(s[t] for s in series) for t in steps], label=label, color=colour,
                            marker="o" if metric.startswith("eval/") else None, markersize=3)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(metric)
            ax.set_title(f"{stage}: {metric} (mean over seeds)")
            if many:
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns, frameon=False)
            elif len(groups) > 1:
                ax.legend(fontsize=7)
            path = out / f"{stage}_{metric.replace('/', '_')}.png"
            written.append(save_figure(plt, fig, path))
        written += _final_against_axes(plt, plan, stage, rows, out)
    return written


def _final_against_axes(plt, plan: Plan, stage: str, rows: dict[str, dict], out: Path) -> list[Path]:
    runs = plan.stage_runs(stage)
    axes = [a for a in (runs[0].grid_values if runs else {}) if not is_seed_axis(a)
            and all(isinstance(r.grid_values[a], (int, float)) for r in runs)]
    written = []
    for axis in axes:
        for metric in ("eval/rewards/accuracies", "eval/loss"):
            points: dict[Any, list[float]] = {}
            for run in runs:
                value = rows[run.run_id].get(metric)
                if isinstance(value, (int, float)):
                    points.setdefault(run.grid_values[axis], []).append(value)
            if not points:
                continue
            xs = sorted(points)
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.errorbar(xs, [statistics.mean(points[x]) for x in xs],
                        yerr=[statistics.stdev(points[x]) if len(points[x]) > 1 else 0 for x in xs],
                        marker="o", capsize=3)
            ax.set_xlabel(axis)
            ax.set_ylabel(f"final {metric}")
            ax.set_title(f"{stage}: final {metric} by {axis.split('.')[-1]} (mean ± std)")
            path = out / f"{stage}_final_{metric.replace('/', '_')}_by_{axis.split('.')[-1]}.png"
            written.append(save_figure(plt, fig, path))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = plan_parser("dpo-hpc report", __doc__)
    parser.add_argument("--out", help="folder for the report (default: <output_root>/<name>/report)")
    args = parser.parse_args(argv)
    plan, _ = open_plan(args.experiment, args.set or None)
    statuses = plan_status(plan, ledger_of(plan).latest())
    rows = {run.run_id: run_row(plan, run, statuses[run.run_id].state) for run in plan.runs if run.role == "train"}
    out = Path(args.out) if args.out else plan.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = write_tables(plan, rows, out)
    print(md_path.read_text())
    print(f"[report] tables: {md_path}, {csv_path}")
    samples = samples_markdown(plan)
    if samples is not None:
        (out / "samples.md").write_text(samples)
        print(f"[report] sample generations, run beside run: {out / 'samples.md'}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("[report] no plots: matplotlib is not installed (pip install 'dpo-hpc[plots]')")
        return 0
    plots = write_plots(plan, rows, out)
    print(f"[report] {len(plots)} plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
