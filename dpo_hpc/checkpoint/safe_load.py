"""Nothing from a run directory is ever unpickled as code.

DeepSpeed loads its engine and optimizer files with ``torch.load(weights_only=False)``: a
crafted file in a checkpoint (a shared scratch folder, a copied run) would run code as whoever
resumes it, and the sha256 manifest does not prevent that (anyone who can write the file can
write the manifest). Our checkpoints go through ``TensorOnlyCheckpointEngine`` instead: PyTorch's
weights-only unpickler, which builds tensors, containers and numbers, plus the few plain DeepSpeed
state classes its files hold (loss scaler, ZeRO stage enum, fragment address). Anything else makes
the checkpoint refused with a ``CheckpointError`` that names the file, before it is used.
"""

from __future__ import annotations

import pickle

import torch

from .layout import CheckpointError

_torch_load = torch.load  # as imported: ``reshard.tensors_only`` routes torch.load here for a while


def deepspeed_state_classes() -> list:
    """The DeepSpeed classes in its checkpoint files: plain state, no behaviour on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_tensors_only(path, map_location=None):
    """``torch.load`` that refuses every global outside the allowlist (a CheckpointError)."""
    try:
        with torch.serialization.safe_globals(deepspeed_state_classes()):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
        raise CheckpointError(f"{path} holds objects a checkpoint must not hold, so it was not loaded "
                              f"({refused[:200]}); delete this checkpoint, or start the run in a new save_dir") from None


def tensor_only_engine():
    """A DeepSpeed checkpoint engine that saves as DeepSpeed does and loads with ``load_tensors_only``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class TensorOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_tensors_only(path, map_location)

    return TensorOnlyCheckpointEngine()
