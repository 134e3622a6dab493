"""TR-DPO's moving reference: the mix on the sync steps only, against hand arithmetic; its state
round-trips; a reference of another architecture is refused."""

from __future__ import annotations

import pytest
import torch

from dpo_hpc.checkpoint.layout import CheckpointError
from dpo_hpc.config import ConfigError
from dpo_hpc.trainers.reference_sync import ReferenceSync


def model(seed: int, width: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, 3), torch.nn.Linear(3, 2, bias=False))


def params(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_the_reference_moves_toward_the_policy_on_sync_steps_only():
    policy, reference = model(0), model(1)
    start, target = params(reference), params(policy)
    sync = ReferenceSync(policy, reference, alpha=0.25, every=3, is_main=True)
    assert sync.state_dict() == {}  # not moved: nothing to save
    assert [sync.after_step(step) for step in (1, 2)] == [False, False] and params(reference).keys() == start.keys()
    assert all(torch.equal(params(reference)[k], start[k]) for k in start)
    assert sync.after_step(3)
    for name, value in params(reference).items():
        assert torch.equal(value, start[name] * 0.75 + target[name] * 0.25)
    assert all(torch.equal(params(policy)[k], target[k]) for k in target)  # the policy is only read


def test_the_moved_reference_round_trips_through_its_state():
    policy, reference = model(0), model(1)
    sync = ReferenceSync(policy, reference, alpha=0.6, every=1, is_main=True)
    sync.after_step(1)
    state = sync.state_dict()
    assert set(state) == set(params(reference)) and all(t.device.type == "cpu" for t in state.values())
    fresh = model(1)
    again = ReferenceSync(model(0), fresh, alpha=0.6, every=1, is_main=True)
    again.load_state_dict(state)
    assert all(torch.equal(params(fresh)[k], params(reference)[k]) for k in state) and again.moved
    untouched = model(1)
    ReferenceSync(model(0), untouched, alpha=0.6, every=1, is_main=True).load_state_dict({})  # saved before a sync
    assert all(torch.equal(params(untouched)[k], params(model(1))[k]) for k in state)
    with pytest.raises(CheckpointError, match="lacks 1.weight"):
        again.load_state_dict({k: v for k, v in state.items() if k != "1.weight"})


def test_a_reference_of_another_architecture_is_refused():
    with pytest.raises(ConfigError, match=r"sync_ref_model: the reference's 0.weight \[3, 5\] has no counterpart "
                                          r"in the policy \(\[3, 4\]\)"):
        ReferenceSync(model(0), model(1, width=5), alpha=0.5, every=1, is_main=True)
