"""Pieces of resuming on another world size that need no second rank: which engine states are
cut by rank, the weights-only guard around DeepSpeed's converter, the step counters it shares,
and the scratch folder's name. The conversion itself runs in tests/integration/test_training.py."""

from __future__ import annotations

import argparse
import collections
import re

import pytest
import torch

from dpo_hpc.checkpoint import CheckpointError, layout
from dpo_hpc.checkpoint.manager import Checkpointer
from dpo_hpc.checkpoint.reshard import sliced, tensors_only, unshare_step_counters
from dpo_hpc.runtime import DistEnv


def test_only_per_rank_optimizer_files_need_resharding(tmp_path):
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert not sliced(tmp_path)  # ZeRO-0 fp32: the optimizer is whole in the model states
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert sliced(tmp_path)
    assert sliced(tmp_path.parent / "absent") is False


def test_every_torch_load_in_the_guard_is_weights_only_and_it_is_undone_after(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"param": torch.ones(2), "shapes": collections.OrderedDict(w=torch.Size([2])), "step": 3}, plain)
    code = tmp_path / "code.pt"
    torch.save({"args": argparse.Namespace(lr=1.0)}, code)  # a class outside the allowlist (Megatron saves one)
    original = torch.load
    with tensors_only():
        assert torch.load is not original
        assert torch.equal(torch.load(plain, weights_only=False)["param"], torch.ones(2))  # its wish is not granted
        with pytest.raises(CheckpointError, match="code.pt holds objects a checkpoint must not hold"):
            torch.load(code, map_location="cpu", weights_only=False)
    assert torch.load is original
    with pytest.raises(RuntimeError), tensors_only():
        raise RuntimeError("a failed conversion")
    assert torch.load is original


def test_each_parameter_group_gets_its_own_step_counter():
    first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([{"params": [first]}, {"params": [second], "weight_decay": 0.0}])
    shared = torch.tensor(3.0)
    optimizer.state[first] = {"step": shared, "exp_avg": torch.zeros(2)}
    optimizer.state[second] = {"step": shared, "exp_avg": torch.zeros(3)}

    class Wrapper:  # DeepSpeed's ZeRO optimizers hold torch's as .optimizer
        pass

    wrapper = Wrapper()
    wrapper.optimizer = optimizer
    unshare_step_counters(wrapper)
    steps = [optimizer.state[p]["step"] for p in (first, second)]
    assert steps[0] is not steps[1] and all(s.item() == 3.0 for s in steps)
    steps[0] += 1
    assert steps[1].item() == 3.0


def test_an_interrupted_conversion_is_cleared_by_the_next_save(tmp_path):
    from test_checkpointer import FakeEngine, Progress

    stale = tmp_path / layout.reshard_dir_name(layout.step_dir_name(4))
    (stale / "engine").mkdir(parents=True)
    assert stale.name == ".reshard-step_00000004" and layout.is_scratch_dir(stale.name)
    assert layout.step_of(stale) is None  # never taken for a checkpoint
    ckpt = Checkpointer(tmp_path, DistEnv(rank=0, local_rank=0, world_size=1), FakeEngine(), interval=1, keep=1,
                        shared={"progress": Progress()}, per_rank={})
    ckpt.save(5)
    assert not stale.exists() and [p.name for p in tmp_path.iterdir()] == [layout.step_dir_name(5)]


@pytest.mark.parametrize("raised, expected", [
    (OSError(28, "No space left on device"), "no space left on the device holding"),
    (ValueError("an unexpected layout"), "DeepSpeed could not convert it for world size 1 (ValueError: an unexpected "
                                         "layout); resume it with world size 2"),
])
def test_a_failed_conversion_is_one_line_and_leaves_no_scratch_folder(tmp_path, monkeypatch, raised, expected):
    from dpo_hpc.checkpoint import reshard
    from dpo_hpc.runtime.failures import RunFailure

    checkpoint = tmp_path / layout.step_dir_name(4)
    (checkpoint / layout.ENGINE_TAG).mkdir(parents=True)

    def convert(engine_dir, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "half-written.pt").write_bytes(b"x")
        raise raised

    monkeypatch.setattr(reshard, "convert", convert)
    said = []
    with pytest.raises((CheckpointError, RunFailure), match=re.escape(expected)):
        reshard.load_resharded(object(), checkpoint, DistEnv(rank=0, local_rank=0, world_size=1), saved_world=2,
                               strict=True, log=said.append)
    assert not (tmp_path / layout.reshard_dir_name(checkpoint.name)).exists()
    assert said[0].startswith(f"checkpoint {checkpoint.name} was written with world size 2, this run has 1")


def test_a_rank_that_finds_no_conversion_after_rank_0_ended_says_so_and_loads_nothing(tmp_path, monkeypatch):
    """Rank 0's failure is its own line; every other rank, let go once rank 0 ended, finds no
    universal form and says where to look instead of loading a half-written one."""
    from dpo_hpc.checkpoint import reshard

    checkpoint = tmp_path / layout.step_dir_name(4)
    (checkpoint / layout.ENGINE_TAG).mkdir(parents=True)
    monkeypatch.setattr(reshard, "main_rank_first", lambda dist, work: work())  # rank 0 has ended
    monkeypatch.setattr(reshard, "convert", lambda *_: pytest.fail("only rank 0 converts"))

    class NoLoad:
        def load_checkpoint(self, *args, **kwargs):
            pytest.fail("nothing to load")

    with pytest.raises(CheckpointError, match=re.escape(f"{checkpoint}: rank 0 did not convert it for world size 2 "
                                                        "(see its log)")):
        reshard.load_resharded(NoLoad(), checkpoint, DistEnv(rank=1, local_rank=1, world_size=2), saved_world=4,
                               strict=True, log=pytest.fail)
