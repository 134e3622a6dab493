"""Experiment trackers (``report_to``): TensorBoard event files in the run directory, and Weights
& Biases (an optional extra: ``pip install 'dpo-hpc[wandb]'``; ``WANDB_MODE=offline`` is honoured,
as on compute nodes without internet).

Tags follow the HF Trainer, so a run overlays with TRL's: ``train/<metric>`` every optimizer step,
``eval/<metric>`` at each evaluation, and the ``train/margins`` histogram. Runs written before
this layout used bare names for training metrics (``loss``); ``read_scalars`` reads both.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from ..checkpoint import RunDir
from ..config import ConfigError

TRAIN, EVAL = "train", "eval"


class Tracker(Protocol):
    def scalars(self, split: str, metrics: dict[str, float], step: int) -> None: ...

    def histograms(self, split: str, values: dict[str, torch.Tensor], step: int) -> None: ...

    def samples(self, split: str, rows: list[dict[str, Any]], step: int) -> None: ...

    def close(self) -> None: ...


HPARAM_METRICS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "train/loss")
"""The scalars TensorBoard's HParams view puts beside each run's settings."""


def flat_hparams(identity: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A run's settings as HParams: every value that differs from its default (the config's
    identity, so the grid values among them), dotted keys, lists as text."""
    out: dict[str, Any] = {}
    for key, value in identity.items():
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class TensorBoard:
    def __init__(self, run: RunDir, start_step: int, hparams: Optional[dict[str, Any]] = None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # Steps after the checkpoint (or all, on a fresh start) are logged again: purge what an
        # interrupted attempt wrote for them, so no step is ever shown twice.
        self.writer = SummaryWriter(str(run.tensorboard), purge_step=start_step + 1)
        if hparams and not start_step:  # in the run's own event file: the HParams view lists each run once
            for summary in hparams_summary(hparams, {name: 0.0 for name in HPARAM_METRICS}):
                self.writer.file_writer.add_summary(summary)

    def scalars(self, split, metrics, step):
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)

    def histograms(self, split, values, step):
        for name, tensor in values.items():
            if tensor.numel():
                self.writer.add_histogram(f"{split}/{name}", tensor.double().cpu(), step)

    def samples(self, split, rows, step):
        self.writer.add_text(f"{split}/samples", samples_markdown(rows), step)

    def close(self):
        self.writer.close()


SAMPLE_TEXTS = (("prompt", "prompt"), ("the data's reply", "reference"), ("the policy's completion", "completion"))


def indented(text: str) -> str:
    """Text as a Markdown code block (indented): markup and whitespace in it show as they are."""
    return "\n".join("    " + line for line in text.split("\n"))


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """Sample generations as TensorBoard's Text tab shows them."""
    shown = []
    for row in rows:
        ending = "" if row["stopped"] else ", cut at max_new_tokens"
        texts = "\n\n".join(f"*{label}*\n\n{indented(row[key])}" for label, key in SAMPLE_TEXTS)
        shown.append(f"**sample {row['sample']}** ({row['completion_tokens']} tokens{ending})\n\n{texts}")
    return "\n\n---\n\n".join(shown)


def wandb_run_id(run: RunDir) -> str:
    """Stable across restarts of the same run directory, so a resumed run continues its W&B run."""
    return f"{run.root.name[:40]}-{hashlib.sha256(str(run.root.resolve()).encode()).hexdigest()[:8]}"


def _wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError(["report_to: 'wandb' needs the wandb package, which is not installed here; "
                           "pip install 'dpo-hpc[wandb]' (or leave wandb out of report_to)"]) from None
    return wandb


def check_available(report_to: list[str]) -> None:
    """Fail at the start of a run, not after the models loaded, when a tracker's package is missing."""
    if "wandb" in report_to:
        _wandb()


class WandB:
    def __init__(self, run: RunDir, name: str, config: dict[str, Any]):
        self.wandb = wandb = _wandb()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpo-hpc"), name=name, id=wandb_run_id(run),
                              resume="allow", dir=str(run.root), config=config)

    def scalars(self, split, metrics, step):
        self.run.log({f"{split}/{name}": value for name, value in metrics.items()}, step=step)

    def histograms(self, split, values, step):
        shown = {f"{split}/{name}": self.wandb.Histogram(t.double().cpu().numpy()) for name, t in values.items()
                 if t.numel()}
        if shown:
            self.run.log(shown, step=step)

    def samples(self, split, rows, step):
        if rows:
            columns = list(rows[0])
            self.run.log({f"{split}/samples": self.wandb.Table(columns=columns, data=[[r[c] for c in columns]
                                                                                      for r in rows])}, step=step)

    def close(self):
        self.run.finish()


def open_trackers(report_to: list[str], run: RunDir, start_step: int, name: str, config: dict[str, Any],
                  identity: dict[str, Any]) -> list[Tracker]:
    """``config``: the whole resolved config (W&B's run config); ``identity``: what differs from
    the defaults (TensorBoard's HParams, with the run name)."""
    trackers: list[Tracker] = []
    if "tensorboard" in report_to:
        trackers.append(TensorBoard(run, start_step, {"run_name": name, **flat_hparams(identity)}))
    if "wandb" in report_to:
        trackers.append(WandB(run, name, config))
    return trackers


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a run by tag: [(step, value), ...]. A run written before the HF
    layout has bare training tags (``loss``); they are returned as ``train/loss``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        name = tag if tag.startswith((f"{TRAIN}/", f"{EVAL}/")) else f"{TRAIN}/{tag}"
        out[name] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out
