"""Graceful stop on a Slurm warning signal: the handler only sets a flag; the training loop reads
it at the next step boundary, agrees on it across ranks, and every rank saves the checkpoint
together (a ZeRO-3 save is collective, so it cannot happen inside one rank's signal handler).

USR2 by default, as submitit: NCCL may catch USR1. ``DPO_HPC_PREEMPT_SIGNAL`` changes it. Send it
to every rank (``#SBATCH --signal=USR2@LEAD`` without ``B:``, or ``scancel --signal=USR2``):
torchrun and the deepspeed launcher do not forward USR2 to their workers.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch

from .distributed import all_reduce_sum


class StopSignal:
    def __init__(self, signum: Optional[int] = None):
        name = os.environ.get("DPO_HPC_PREEMPT_SIGNAL", "USR2")
        self.signum = signum if signum is not None else getattr(signal, f"SIG{name.upper().removeprefix('SIG')}")
        self.received_signal: Optional[int] = None
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.received_signal = signum

    def install(self) -> "StopSignal":
        """Bind the handler (main thread only; elsewhere the signal keeps its current handler)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)
        return self

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """True if any rank received the signal. Every rank must call this at the same step."""
        flag = 1.0 if self.received_signal is not None else 0.0
        if world_size == 1:
            return bool(flag)
        return all_reduce_sum(torch.tensor(flag, dtype=torch.float64, device=device)).item() > 0
