"""Where a step's time goes: ``torch.profiler`` over a range of optimizer steps (``profile_steps``).

Each rank writes ``<run>/profile/rank<r>_steps<a>-<b>.json`` (a Chrome trace: ui.perfetto.dev or
chrome://tracing) and ``.txt``: first the step's phases, which the training step marks with
``record_function`` (``PHASES``), then the operators that cost most (device time first where
there is a device). Outside a profiled range the marks cost nothing measurable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..fsutil import atomic_write_bytes, write_aside

PHASES = ("dpo_hpc.forward_loss", "dpo_hpc.backward", "dpo_hpc.optimizer_step")


class StepProfiler:
    """Profiles optimizer steps ``first``..``last`` (1-based, as logged); ``None`` profiles nothing.
    A context around the training loop (leaving it drops a range the run stopped inside); call
    ``before(done)`` and ``after(done)`` around each step."""

    def __init__(self, steps: Optional[tuple[int, int]], folder: Path, rank: int, say: Callable[[str], None]):
        self.steps, self.folder, self.rank, self.say = steps, folder, rank, say
        self.profile: Optional[torch.profiler.profile] = None

    def before(self, done: int) -> None:
        if self.steps is not None and done == self.steps[0]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.start()

    def after(self, done: int) -> None:
        if self.profile is None or done != self.steps[1]:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the range's kernels belong to it
        profile, self.profile = self.profile, None
        profile.stop()
        first, last = self.steps
        stem = self.folder / f"rank{self.rank}_steps{first}-{last}"
        averages = profile.key_averages()
        on_device = any(getattr(e, "device_time_total", 0) > 0 for e in averages)
        by_operator = averages.table(sort_by="self_device_time_total" if on_device else "self_cpu_time_total",
                                     row_limit=40)
        text = (f"steps {first}-{last} ({last - first + 1}), rank {self.rank}\n\n{phase_lines(averages, on_device)}\n\n"
                f"{by_operator}\n")
        atomic_write_bytes(stem.with_suffix(".txt"), text.encode())
        write_aside(stem.with_suffix(".json"), lambda tmp: profile.export_chrome_trace(str(tmp)))
        self.say(f"profile of steps {first}-{last}: {stem}.txt (trace: {stem}.json, ui.perfetto.dev)")

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.profile is not None:
            self.profile.stop()
            self.profile = None


def phase_lines(averages, on_device: bool) -> str:
    """The marked phases of the step, summed over the profiled steps."""
    rows = {e.key: e for e in averages if e.key in PHASES}
    lines = [f"{'phase':<24} {'calls':>5} {'host ms':>10}" + (f" {'device ms':>10}" if on_device else "")]
    for name in PHASES:
        if name in rows:
            e = rows[name]
            device = f" {getattr(e, 'device_time_total', 0) / 1e3:>10.1f}" if on_device else ""
            lines.append(f"{name:<24} {e.count:>5} {e.cpu_time_total / 1e3:>10.1f}{device}")
    return "\n".join(lines)
