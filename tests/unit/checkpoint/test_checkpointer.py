"""The checkpointer on its own, with a fake engine: named pieces round-trip, the interval and
rotation, the format version, corrupt and refused checkpoints, and reading format 1."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dpo_hpc.checkpoint import CheckpointError, layout
from dpo_hpc.checkpoint.manager import Checkpointer, verify
from dpo_hpc.runtime import DistEnv

ONE = DistEnv(rank=0, local_rank=0, world_size=1)


class FakeEngine:
    """What the checkpointer asks of a DeepSpeed engine: a collective save into a folder and a load."""

    def __init__(self, value: float = 0.0):
        self.weights = torch.full((4,), value)
        self.loads = 0

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters=False):
        (Path(save_dir) / tag).mkdir(parents=True)
        torch.save({"weights": self.weights}, Path(save_dir) / tag / "model_states.pt")

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states, load_module_strict=True):
        self.loads += 1
        self.weights = torch.load(Path(load_dir) / tag / "model_states.pt", weights_only=True)["weights"]
        return load_dir, {}


class Counter:
    """A per-rank piece with tensor state."""

    def __init__(self):
        self.seen = torch.zeros(3)

    def state_dict(self):
        return {"seen": self.seen.clone()}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class Progress:
    """A shared piece that refuses a checkpoint of another config (as the trainer's does)."""

    def __init__(self, config="a"):
        self.config, self.step = config, 0

    def state_dict(self):
        return {"config": self.config, "step": self.step}

    def load_state_dict(self, state):
        if state["config"] != self.config:
            raise CheckpointError(f"config {state['config']!r} is not {self.config!r}")
        self.step = state["step"]


def checkpointer(root, engine=None, interval=2, keep=2, config="a"):
    progress, counter = Progress(config), Counter()
    ckpt = Checkpointer(root, ONE, engine or FakeEngine(), interval=interval, keep=keep,
                        shared={"progress": progress}, per_rank={"objective": counter})
    return ckpt, progress, counter


def test_interval_rotation_and_manifest(tmp_path):
    ckpt, progress, counter = checkpointer(tmp_path, interval=2, keep=2)
    saved = [step for step in range(1, 8) if ckpt.maybe_save(step, total_steps=6)]
    assert saved == [2, 4]  # on the interval, and never at the end (the final model is saved instead)
    assert layout.step_dir_name(5) == "step_00000005"  # the on-disk name, which existing runs already use
    assert ckpt.save(5).name == layout.step_dir_name(5)
    assert ckpt.save(5) == tmp_path / layout.step_dir_name(5)  # once per step
    assert [p.name for p in ckpt.published()] == [layout.step_dir_name(5), layout.step_dir_name(4)]  # keep = 2
    manifest = json.loads((tmp_path / layout.step_dir_name(5) / layout.MANIFEST).read_text())
    assert manifest["format_version"] == layout.FORMAT_VERSION and manifest["step"] == 5
    assert set(manifest["files"]) == {layout.SHARED_STATE, layout.rank_file(0), "engine/model_states.pt"}
    assert not any(layout.is_scratch_dir(p.name) for p in tmp_path.iterdir())


def test_pieces_and_rng_round_trip(tmp_path):
    ckpt, progress, counter = checkpointer(tmp_path, FakeEngine(1.5))
    progress.step, counter.seen = 3, torch.tensor([1.0, 2.0, 3.0])
    torch.manual_seed(7), random.seed(7)
    ckpt.save(3)
    expected = (torch.rand(2), random.random())

    engine = FakeEngine(0.0)
    fresh, progress2, counter2 = checkpointer(tmp_path, engine)
    torch.manual_seed(0), random.seed(0)
    assert fresh.resume(print) == (3, tmp_path / layout.step_dir_name(3))
    assert progress2.step == 3 and torch.equal(counter2.seen, counter.seen)
    assert torch.equal(engine.weights, torch.full((4,), 1.5))
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]


class Weights:
    """A replicated piece: tensors, or nothing yet (as TR-DPO's reference before it moves)."""

    def __init__(self, state=None):
        self.state, self.loaded = state or {}, None

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.loaded = state


def test_replicated_pieces_are_one_checksummed_safetensors_file_or_none(tmp_path):
    def with_weights(piece):
        return Checkpointer(tmp_path, ONE, FakeEngine(), interval=0, keep=3, shared={"progress": Progress()},
                            per_rank={}, replicated={"reference": piece})

    with_weights(Weights()).save(1)
    with_weights(Weights({"w": torch.arange(3.0), "b": torch.ones(2, 2)})).save(2)
    assert not (tmp_path / layout.step_dir_name(1) / layout.REPLICATED).exists()  # nothing to keep yet
    manifest = json.loads((tmp_path / layout.step_dir_name(2) / layout.MANIFEST).read_text())
    assert layout.replicated_file("reference") in manifest["files"]
    piece = Weights()
    assert with_weights(piece).resume(print)[0] == 2
    assert set(piece.loaded) == {"w", "b"} and torch.equal(piece.loaded["w"], torch.arange(3.0))
    piece = Weights()
    with_weights(piece).load(tmp_path / layout.step_dir_name(1))
    assert piece.loaded == {}


def test_corrupt_newer_and_unknown_version_are_skipped(tmp_path):
    ckpt, _, _ = checkpointer(tmp_path, interval=0, keep=5)
    for step in (1, 2, 3):
        ckpt.save(step)
    victim = tmp_path / layout.step_dir_name(3) / layout.rank_file(0)
    victim.write_bytes(victim.read_bytes()[:-4] + b"oops")
    manifest_path = tmp_path / layout.step_dir_name(2) / layout.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": layout.FORMAT_VERSION + 1}))
    said = []
    assert ckpt.latest_valid(said.append) == tmp_path / layout.step_dir_name(1)
    assert "checksum mismatch" in said[0] and "newer than this dpo-hpc reads" in said[1]


def test_a_refusing_piece_stops_the_load_before_the_engine(tmp_path):
    checkpointer(tmp_path)[0].save(2)
    engine = FakeEngine()
    other, _, _ = checkpointer(tmp_path, engine, config="b")
    with pytest.raises(CheckpointError, match=r"step_00000002: config 'a' is not 'b'"):
        other.resume(print)
    assert engine.loads == 0


def test_format_1_checkpoints_are_read(tmp_path):
    """Format 1 had one unnamed objective state per rank and the progress keys at the top level."""
    ckpt, progress, counter = checkpointer(tmp_path)
    progress.step, counter.seen = 4, torch.tensor([4.0, 5.0, 6.0])
    path = ckpt.save(4)
    rank = torch.load(path / layout.rank_file(0), weights_only=True)
    torch.save({"rng": rank["rng"], "state": rank["objective"]}, path / layout.rank_file(0))
    (path / layout.SHARED_STATE).write_text(json.dumps({"config": "a", "step": 4, "world_size": 1}))
    files = {rel: {"size": (path / rel).stat().st_size, "sha256": __import__("hashlib").sha256(
        (path / rel).read_bytes()).hexdigest()} for rel in json.loads((path / layout.MANIFEST).read_text())["files"]}
    (path / layout.MANIFEST).write_text(json.dumps({"step": 4, "files": files}))
    assert verify(path) is None
    fresh, progress2, counter2 = checkpointer(tmp_path)
    assert fresh.resume(print)[0] == 4 and progress2.step == 4 and torch.equal(counter2.seen, counter.seen)


def test_all_checkpoints_unusable_stops_instead_of_starting_over(tmp_path):
    ckpt, _, _ = checkpointer(tmp_path, interval=0, keep=5)
    for step in (1, 2):
        victim = ckpt.save(step) / layout.rank_file(0)
        victim.write_bytes(victim.read_bytes()[:-4] + b"oops")
    fresh, _, _ = checkpointer(tmp_path, interval=0, keep=5)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step_00000002 \(.*checksum mismatch\); "
                                              r"step_00000001 .*move them aside"):
        fresh.resume(print)


def test_rotation_keeps_the_newest_usable_checkpoint_not_a_newer_corrupt_one(tmp_path):
    """A corrupt step 5 left from before must not make rotation delete the fresh step 1."""
    old, _, _ = checkpointer(tmp_path, interval=0, keep=1)
    victim = old.save(5) / layout.rank_file(0)
    victim.write_bytes(victim.read_bytes()[:-4] + b"oops")
    fresh, _, _ = checkpointer(tmp_path, interval=0, keep=1)  # a new process
    kept = fresh.save(1)
    assert kept.is_dir() and not (tmp_path / layout.step_dir_name(5)).exists()
    assert fresh.latest_valid(print) == kept


@pytest.mark.parametrize("manifest, problem", [
    (None, "manifest is not an object with a 'files' table"),
    ({"step": 2}, "manifest is not an object with a 'files' table"),
    ({"files": {"../../etc/passwd": {"size": 1, "sha256": "x"}}}, "outside the checkpoint"),
    ({"files": {"trainer_state.json": {"size": "big"}}}, "lacks its size and sha256"),
    ({"files": {}}, "is not in the manifest"),  # files nobody vouched for
])
def test_a_manifest_of_another_shape_makes_the_checkpoint_unusable(tmp_path, manifest, problem):
    path = checkpointer(tmp_path)[0].save(2)
    (path / layout.MANIFEST).write_text(json.dumps(manifest))
    assert problem in verify(path)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        checkpointer(tmp_path)[0].resume(print)


def test_links_in_the_checkpoint_folder_are_never_followed_loaded_or_deleted_through(tmp_path):
    outside = tmp_path / "someone_elses"
    (outside / "keep.txt").parent.mkdir()
    (outside / "keep.txt").write_text("precious")
    root = tmp_path / "checkpoints"
    ckpt, _, _ = checkpointer(root, interval=0, keep=1)
    real = ckpt.save(1)
    (root / layout.step_dir_name(7)).symlink_to(outside)         # a newer "checkpoint" that is a link
    (root / layout.tmp_dir_name(3)).symlink_to(outside)          # a stale save in progress that is a link
    said = []
    assert ckpt.latest_valid(said.append) == real and "symbolic link" in said[0]
    ckpt.save(3)
    ckpt.save(4)  # rotation: keep 1
    assert (outside / "keep.txt").read_text() == "precious"
    assert (root / layout.step_dir_name(7)).is_symlink()  # not ours: left where it is
    assert [p.name for p in layout.published_checkpoints(root) if not p.is_symlink()] == [layout.step_dir_name(4)]
    file_link = root / layout.step_dir_name(4) / "engine" / "model_states.pt"
    file_link.unlink()
    file_link.symlink_to(outside / "keep.txt")
    assert "model_states.pt is a symbolic link" in verify(root / layout.step_dir_name(4))


class FullDisk(FakeEngine):
    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters=False):
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "part.pt").write_bytes(b"half")
        raise OSError(28, "No space left on device", str(Path(save_dir) / tag / "part.pt"))


def test_a_full_disk_during_a_save_is_said_in_one_line_and_leaves_nothing_half_written(tmp_path):
    from dpo_hpc.runtime.failures import RunFailure

    ckpt, _, _ = checkpointer(tmp_path, FullDisk())
    with pytest.raises(RunFailure, match=r"no space left on the device holding .* while saving checkpoint step 2: "
                                         r"free space, lower save_total_limit, or move save_dir"):
        ckpt.save(2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("manifest", ["null", '{"step": 3}', "[1, 2]"])
def test_the_resume_guard_peeks_past_a_manifest_of_another_shape(tmp_path, manifest):
    from dpo_hpc.checkpoint.manager import peek_shared

    ckpt, progress, _ = checkpointer(tmp_path, interval=0, keep=5)
    ckpt.save(1)
    (ckpt.save(2) / layout.MANIFEST).write_text(manifest)
    path, state = peek_shared(tmp_path, "progress")
    assert path.name == layout.step_dir_name(1) and state["config"] == "a"
