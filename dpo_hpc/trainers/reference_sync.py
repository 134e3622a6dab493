"""TR-DPO's moving reference (Gorbatovski et al., 2024; TRL's ``sync_ref_model``): every
``ref_model_sync_steps`` optimizer steps the reference moves toward the policy,

    ref <- alpha * policy + (1 - alpha) * ref        (``ref_model_mixup_alpha`` = alpha)

Once moved, the reference's weights are state of the run: the checkpointer saves them (rank 0,
one safetensors file) and a resumed run loads them back, so a resume equals a run that never
stopped. Under ZeRO-3 both models are partitioned alike; each parameter is gathered, mixed and
partitioned again, one at a time (no second whole model in memory).
"""

from __future__ import annotations

import contextlib

import torch

from ..checkpoint.layout import CheckpointError
from ..config import ConfigError


def _module(model):
    return getattr(model, "module", model)  # a DeepSpeed engine holds its model as .module


def _gathered(params: list, modifier: bool):
    """The whole of ZeRO-3 partitioned ``params`` inside the block (written back from rank 0 when
    ``modifier``); plain parameters as they are."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modifier else None)


def _shape(param) -> tuple:
    return tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition keeps the whole shape there


class ReferenceSync:
    """Mixes the policy into the reference on the sync steps; Stateful (the reference's weights,
    empty until it first moves)."""

    def __init__(self, policy, reference, alpha: float, every: int, is_main: bool):
        self.alpha, self.every, self.is_main = alpha, every, is_main
        self.reference = reference
        policy_params = dict(_module(policy).named_parameters())
        self.pairs = []
        for name, param in _module(reference).named_parameters():
            source = policy_params.get(name)
            if source is None or _shape(source) != _shape(param):
                found = "missing" if source is None else f"{list(_shape(source))}"
                raise ConfigError([f"sync_ref_model: the reference's {name} {list(_shape(param))} has no "
                                   f"counterpart in the policy ({found}); TR-DPO needs the reference and the "
                                   "policy to be one architecture (leave ref_name out)"])
            self.pairs.append((name, param, source))
        self.moved = False  # whether the reference differs from the model it was loaded as

    def after_step(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based): mix if it is a sync step. Every rank calls."""
        if step % self.every:
            return False
        with torch.no_grad():
            for _, param, source in self.pairs:
                with _gathered([param, source], modifier=True):
                    param.data.mul_(1 - self.alpha).add_(source.data.to(param.dtype), alpha=self.alpha)
        self.moved = True
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference's parameters on rank 0 (a collective under ZeRO-3; other ranks get {}),
        nothing before the first sync."""
        if not self.moved:
            return {}
        state = {}
        for name, param, _ in self.pairs:
            with _gathered([param], modifier=False):
                if self.is_main:
                    state[name] = param.data.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The reference's parameters back (empty: it had not moved yet). Every rank calls."""
        if not state:
            return
        missing = [name for name, _, _ in self.pairs if name not in state]
        if missing:
            raise CheckpointError(f"the saved reference lacks {missing[0]} (and {len(missing) - 1} more)")
        with torch.no_grad():
            for name, param, _ in self.pairs:
                with _gathered([param], modifier=True):
                    param.data.copy_(state[name].to(param.device, param.dtype))
        self.moved = True
