"""Atomic, verified checkpoints (no DPO knowledge here)."""

from .manager import CheckpointError, CheckpointManager

__all__ = ["CheckpointError", "CheckpointManager"]
