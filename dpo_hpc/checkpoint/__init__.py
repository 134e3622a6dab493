"""Run storage: the run directory (``run_dir``), the checkpoint folder names (``layout``) and the
checkpointer that saves and restores named state pieces atomically (``manager``, which needs
torch: import it from ``dpo_hpc.checkpoint.manager``)."""

from .layout import CheckpointError, published_checkpoints
from .run_dir import RunDir, config_hash

__all__ = ["CheckpointError", "RunDir", "config_hash", "published_checkpoints"]
