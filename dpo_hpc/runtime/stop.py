"""Graceful stop on a signal: the handler only sets a flag; the training loop reads it at the next
step boundary, agrees on it across ranks, and every rank saves the checkpoint together (a ZeRO-3
save is collective, so it cannot happen inside one rank's signal handler).

Two kinds of stop. The preemption warning, USR2 by default as submitit (NCCL may catch USR1;
``DPO_HPC_PREEMPT_SIGNAL`` changes it): checkpoint, then the task requeues itself. SIGINT (Ctrl-C)
and SIGTERM (``scancel``, a shutdown): checkpoint, then stop (``interrupted``); a second Ctrl-C
stops at once. Send USR2 to every rank (``#SBATCH --signal=USR2@LEAD`` without ``B:``, or
``scancel --signal=USR2``): torchrun and the deepspeed launcher do not forward it to their workers.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch

from .distributed import all_reduce_sum


class StopSignal:
    def __init__(self, signum: Optional[int] = None, interrupts: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
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
        return name == signal.Signals(self.signum).name

    def agreed(self, world_size: int, device: torch.device) -> Optional[str]:
        """The signal every rank stops for (its name, e.g. ``SIGUSR2``), or None. An interrupt on
        any rank wins over a preemption warning. Every rank must call this at the same step."""
        order = sorted((self.signum, *self.interrupts), key=lambda s: (s != signal.SIGINT, s != signal.SIGTERM))
        flags = torch.tensor([float(s in self.received) for s in order], dtype=torch.float64, device=device)
        if world_size > 1:
            flags = all_reduce_sum(flags)
        hit = next((s for s, flag in zip(order, flags.tolist()) if flag > 0), None)
        return signal.Signals(hit).name if hit is not None else None
