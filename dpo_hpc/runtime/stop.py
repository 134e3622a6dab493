"""Graceful stop on a signal: the handler only sets a flag; the training loop reads it at the next
step boundary, agrees on it across ranks, and every rank saves the checkpoint together (a ZeRO-3
save is collective, so it cannot happen inside one rank's signal handler).

A third, the deadline: under Slurm the job's end time is known, so the run also stops (and
requeues, as for the time-limit signal) once the time left is less than it needs to finish a step
and a checkpoint, even when no signal comes (a signal lead set too short, a signal lost). That
margin is the signal lead, raised to twice the last step plus one and a half times the last save
once those are measured.

Two kinds of signal. The preemption warning, USR2 by default as submitit (NCCL may catch USR1;
``DPO_HPC_PREEMPT_SIGNAL`` changes it): checkpoint, then the task requeues itself. SIGINT (Ctrl-C)
and SIGTERM (``scancel``, a shutdown): checkpoint, then stop (``interrupted``); a second Ctrl-C
stops at once. Send USR2 to every rank (``#SBATCH --signal=USR2@LEAD`` without ``B:``, or
``scancel --signal=USR2``): torchrun and the deepspeed launcher do not forward it to their workers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch

from .distributed import all_reduce_sum


DEADLINE = "deadline"
"""What ``agreed`` returns when the job's end is too near: a stop to be requeued, like the signal."""


class StopSignal:
    def __init__(self, signum: Optional[int] = None, interrupts: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                 end_time: Optional[float] = None, lead_s: float = 0.0):
        """``end_time``: when the job's time limit ends (epoch seconds), for the deadline;
        ``lead_s``: the least time to keep for the last step and checkpoint (the signal lead)."""
        self.end_time, self.lead_s = end_time, lead_s
        name = os.environ.get("DPO_HPC_PREEMPT_SIGNAL", "USR2")
        self.signum = signum if signum is not None else getattr(signal, f"SIG{name.upper().removeprefix('SIG')}")
        self.interrupts = tuple(s for s in interrupts if s != self.signum)
        self.received: set[int] = set()
        self.received_signal: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and signum in self.received:  # Ctrl-C again: the user will not wait
            self.restore()
            raise KeyboardInterrupt
        self.received.add(signum)
        self.received_signal = signum

    def install(self) -> "StopSignal":
        """Bind the handlers (main thread only; elsewhere the signals keep their current handlers)."""
        if threading.current_thread() is threading.main_thread():
            for signum in (self.signum, *self.interrupts):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def is_preemption(self, name: str) -> bool:
        """A stop to be requeued: the preemption signal, or the deadline."""
        return name in (signal.Signals(self.signum).name, DEADLINE)

    def margin_s(self, step_s: float = 0.0, save_s: float = 0.0) -> float:
        """Time to keep before the end: the signal lead, or what the last step and save measured."""
        return max(self.lead_s, 2 * step_s + 1.5 * save_s)

    def deadline_reached(self, step_s: float = 0.0, save_s: float = 0.0, now: Optional[float] = None) -> bool:
        if self.end_time is None:
            return False
        return (time.time() if now is None else now) + self.margin_s(step_s, save_s) >= self.end_time

    def agreed(self, world_size: int, device: torch.device, step_s: float = 0.0, save_s: float = 0.0) -> Optional[str]:
        """The signal every rank stops for (its name, e.g. ``SIGUSR2``; ``deadline`` when the job's
        end is nearer than ``margin_s``), or None. An interrupt on any rank wins over a preemption
        warning, which wins over the deadline. Every rank must call this at the same step."""
        order = sorted((self.signum, *self.interrupts), key=lambda s: (s != signal.SIGINT, s != signal.SIGTERM))
        flags = [float(s in self.received) for s in order] + [float(self.deadline_reached(step_s, save_s))]
        reduced = torch.tensor(flags, dtype=torch.float64, device=device)
        if world_size > 1:
            reduced = all_reduce_sum(reduced)
        names = [signal.Signals(s).name for s in order] + [DEADLINE]
        return next((name for name, flag in zip(names, reduced.tolist()) if flag > 0), None)
