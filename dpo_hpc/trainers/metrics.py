"""Where metrics go. ``MetricSums`` reduces a step's (sum, count) pairs across ranks; the
``MetricsLogger`` sends the results to every backend (the trackers of ``report_to``, progress
lines, ``progress.json``) on rank 0 and is closed once, however the run ends."""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Sequence

import torch

from ..algorithms.objectives import Stats
from ..checkpoint import RunDir
from ..fsutil import atomic_write_bytes
from ..runtime import all_reduce_sum
from .trackers import EVAL, TRAIN, Tracker


class MetricSums:
    """Sums and counts of metrics over an optimizer step (or an eval pass), reduced across ranks.
    They stay on the device until ``reduce``: one copy to the host per step, not one per metric and
    micro-batch (each copy waits for the GPU to drain)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, stats: Stats, weight: float = 1.0) -> None:
        for name, (total, count) in stats.items():
            total, count = total.detach().double() * weight, count.detach().double() * weight
            self.sums[name] = self.sums.get(name, 0) + total
            self.counts[name] = self.counts.get(name, 0) + count

    def reduce(self, dev: torch.device) -> dict[str, float]:
        """Means over every rank (call on every rank: it is a collective); a metric no unit of the
        step counted (KTO's desirable rewards in a batch of undesirable completions) is left out."""
        names = sorted(self.sums)
        parts = [self.sums[n] for n in names] + [self.counts[n] for n in names]
        flat = torch.stack([torch.as_tensor(p, dtype=torch.float64).to(dev).reshape(()) for p in parts]) \
            if parts else torch.zeros(0, dtype=torch.float64, device=dev)
        all_reduce_sum(flat)
        values, k = flat.tolist(), len(names)
        return {n: values[i] / values[k + i] for i, n in enumerate(names) if values[k + i] > 0}


THROUGHPUT = {"tokens_per_sec": ("median_tokens_per_sec", statistics.median),
              "perf/step_seconds": ("median_step_seconds", statistics.median),
              "perf/tflops_per_device": ("median_tflops_per_device", statistics.median),
              "perf/mfu": ("median_mfu", statistics.median),
              "perf/padding_fraction": ("median_padding_fraction", statistics.median),
              "perf/data_loading_fraction": ("median_data_loading_fraction", statistics.median),
              "perf/peak_memory_gib": ("peak_memory_gib", max),
              "perf/resident_memory_gib": ("resident_memory_gib", max),
              "perf/alloc_retries": ("alloc_retries", max)}
"""Step metrics summarised in the run manifest: their names there and how the steps combine."""


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, metrics: dict[str, float], step_time: float, eta: float) -> str:
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)", f"loss {metrics['loss']:.4f}"]
    if "rewards/accuracies" in metrics:
        parts.append(f"acc {metrics['rewards/accuracies']:.3f}")
        parts.append(f"margin {metrics['rewards/margins']:.4f}")
    if "kl" in metrics:  # KTO's reference point
        parts.append(f"kl {metrics['kl']:.4f}")
    for name, label in (("dpo/beta", "beta"), ("beta_dpo/beta_used", "beta")):
        if name in metrics:
            parts.append(f"{label} {metrics[name]:.4f}")
    parts.append(f"lr {metrics['learning_rate']:.2e}")
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
    parts.append(f"{metrics['tokens_per_sec'] / 1000:.1f}k tok/s")
    if "perf/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['perf/mfu']:.1f}%")
    if "perf/peak_memory_gib" in metrics:
        parts.append(f"mem {metrics['perf/peak_memory_gib']:.1f} GiB")
    parts.append(f"{step_time:.2f} s/step")
    parts.append(f"eta {format_duration(eta)}")
    return " | ".join(parts)


class MetricsLogger:
    """Every metric of a run goes through here: each step to the trackers, every ``logging_steps``
    (and the first and last step) to a progress line and ``progress.json``. Only rank 0 writes
    (the other ranks get no trackers)."""

    def __init__(self, run: RunDir, total_steps: int, start_step: int, logging_steps: int, is_main: bool,
                 say: Callable[[str], None], trackers: Sequence[Tracker] = ()):
        self.run, self.total_steps = run, total_steps
        self.logging_steps, self.is_main, self.say = logging_steps, is_main, say
        self.trackers = list(trackers)
        self.started, self.steps_logged = time.perf_counter(), 0
        self.train: dict[str, float] = {}
        self.eval: dict[str, float] = {}
        self.step = start_step
        self._progress_step = start_step
        self._perf: dict[str, list[float]] = {}

    def log_step(self, step: int, metrics: dict[str, float], histograms: dict[str, torch.Tensor]) -> None:
        self.step, self.train = step, metrics
        self.steps_logged += 1
        if self.steps_logged > 1:  # the first step of a process pays for warm-up
            for name in THROUGHPUT:
                if name in metrics:
                    self._perf.setdefault(name, []).append(metrics[name])
        for tracker in self.trackers:
            tracker.scalars(TRAIN, metrics, step)
            tracker.histograms(TRAIN, histograms, step)
        if step % self.logging_steps == 0 or step == self.total_steps or self.steps_logged == 1:
            mean_step = (time.perf_counter() - self.started) / self.steps_logged
            self.say(progress_line(step, self.total_steps, metrics, metrics["perf/step_seconds"],
                                   mean_step * (self.total_steps - step)))
            self._write_progress()

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.eval = metrics
        for tracker in self.trackers:
            tracker.scalars(EVAL, metrics, step)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if not k.startswith("logps/"))
        self.say(f"eval at step {step}: {shown}")

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Sample generations: ``samples/step_<N>.jsonl`` and the trackers (rank 0)."""
        if not self.is_main or not rows:
            return
        path = self.run.samples(step)
        atomic_write_bytes(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
        for tracker in self.trackers:
            tracker.samples(EVAL, rows, step)
        self.say(f"samples at step {step}: {path} (first: {rows[0]['completion'][:80]!r})")

    def _write_progress(self) -> None:
        if self.is_main:
            self.run.write_progress(step=self.step, total_steps=self.total_steps, train=self.train, eval=self.eval)
        self._progress_step = self.step

    def throughput(self) -> dict[str, float]:
        """Over the steps after the first (for the run manifest), to 6 significant digits: a small
        model's MFU (1e-5) must not round to 0."""
        return {THROUGHPUT[name][0]: float(f"{THROUGHPUT[name][1](values):.6g}") for name, values in self._perf.items()}

    def close(self) -> None:
        """Flush every backend; ``progress.json`` then holds the last step logged."""
        if self._progress_step != self.step:
            self._write_progress()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
