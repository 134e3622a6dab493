"""Pre-flight and the Slurm shape: a global_batch_size the stage's ranks cannot share, and a stopped
run resubmitted on a shape that changes its global batch, are refused before anything is queued
(the job would otherwise wait in the queue, start, and only then refuse)."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_hpc.checkpoint.manager import Checkpointer
from dpo_hpc.config import validate_mapping
from dpo_hpc.launch.preflight import Findings, check_batch, check_resumable
from dpo_hpc.runtime import DistEnv


class Piece:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def config(tmp_path, **training):
    return validate_mapping({"policy_name": "m", "dataset": {"dataset_name": "d"},
                             "dpo_training": {"learning_rate": 1e-3, "batch_size": 2, "save_dir": str(tmp_path / "run"),
                                              **training}}, "dpo")


class Engine:
    """What a save asks of DeepSpeed's engine: a folder of its own in the checkpoint."""

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters=False):
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"")


def stopped_run(tmp_path, global_batch: int, status: str = "preempted") -> None:
    run = tmp_path / "run"
    Checkpointer(run / "checkpoints", DistEnv(rank=0, local_rank=0, world_size=2), Engine(), interval=1, keep=1,
                 shared={"progress": Piece({"step": 7, "global_batch": global_batch})}, per_rank={}).save(7)
    (run / "run_manifest.json").write_text(json.dumps({"status": status}))


def test_a_global_batch_the_ranks_cannot_share_is_named_with_the_shape(tmp_path):
    found = Findings()
    check_batch(config(tmp_path, global_batch_size=6), "dpo", 4, found, "x.toml: stages.dpo (dpo-1)")
    assert found.problems == ["x.toml: stages.dpo (dpo-1): dpo_training.global_batch_size = 6 cannot be shared by 4 "
                              "ranks; run on a number of ranks that divides it (the stage's nodes x ntasks_per_node)"]
    check_batch(config(tmp_path, global_batch_size=8), "dpo", 4, found, "")
    assert len(found.problems) == 1


def test_a_stopped_run_on_a_shape_that_changes_its_global_batch_is_refused(tmp_path):
    stopped_run(tmp_path, global_batch=4)  # 2 ranks x batch 2
    found = Findings()
    check_resumable(config(tmp_path), 1, found, "x.toml: stages.dpo (dpo-1)")
    assert found.problems == ["x.toml: stages.dpo (dpo-1): its checkpoint step_00000007 was trained with a global "
                              "batch of 4, which this stage's 1 rank(s) (nodes x ntasks_per_node) make 2, so it would "
                              "not resume; give the stage its shape back (global_batch_size keeps the global batch on "
                              "any shape, in a new run)"]
    found = Findings()
    check_resumable(config(tmp_path), 2, found, "")  # its own shape
    check_resumable(config(tmp_path, gradient_accumulation_steps=2), 1, found, "")  # the same global batch
    check_resumable(config(tmp_path, global_batch_size=4), 1, found, "")
    assert found.problems == []


def test_a_completed_run_or_a_fresh_one_is_not_checked(tmp_path):
    found = Findings()
    check_resumable(config(tmp_path), 1, found, "")  # nothing there yet
    stopped_run(tmp_path, global_batch=4, status="completed")  # not resubmitted
    check_resumable(config(tmp_path), 1, found, "")
    assert found.problems == []
