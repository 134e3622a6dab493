"""The trainer's progress piece is the resume guard: a checkpoint of another config is refused,
one written before a key existed is not."""

from __future__ import annotations

import pytest

from dpo_hpc.checkpoint import CheckpointError
from dpo_hpc.config import to_dict, validate_mapping
from dpo_hpc.trainers.progress import TrainProgress

RAW = {"policy_name": "m", "dataset": {"dataset_name": "d"},
       "dpo_training": {"learning_rate": 1e-3, "batch_size": 2, "save_dir": "r"}}


def progress(raw=RAW, global_batch=2):
    return TrainProgress("dpo", to_dict(validate_mapping(raw, "dpo")), global_batch)


def test_same_config_resumes_and_step_counts_may_change():
    saved = {**progress().state_dict(), "step": 7}
    longer = progress({**RAW, "dpo_training": {**RAW["dpo_training"], "max_steps": 50, "save_steps": 5}})
    longer.load_state_dict(saved)
    assert longer.step == 7


def test_the_global_batch_may_be_split_otherwise_but_not_changed():
    saved = {**progress(global_batch=8).state_dict(), "step": 5}
    halved = progress({**RAW, "dpo_training": {**RAW["dpo_training"], "batch_size": 1,
                                                "gradient_accumulation_steps": 2}}, global_batch=8)
    halved.load_state_dict(saved)  # what the out-of-memory advice says to do, on any world size
    assert halved.step == 5
    with pytest.raises(CheckpointError, match=r"global batch 8 -> 4 \(batch_size x gradient_accumulation_steps x "
                                              r"world size; .*global_batch_size keeps it on any world size\)"):
        progress(global_batch=4).load_state_dict(saved)


def test_a_key_unknown_when_the_checkpoint_was_written_is_not_a_change():
    saved = progress().state_dict()
    del saved["config"]["dpo_training"]["weight_decay"]  # as if written before the key existed
    again = progress()
    again.load_state_dict(saved)


def test_other_math_or_global_batch_is_refused():
    saved = progress().state_dict()
    with pytest.raises(CheckpointError, match=r"learning_rate: 0.001 -> 0.002"):
        progress({**RAW, "dpo_training": {**RAW["dpo_training"], "learning_rate": 2e-3}}).load_state_dict(saved)
    with pytest.raises(CheckpointError, match="global batch 2 -> 4"):
        progress(global_batch=4).load_state_dict(saved)
    saved["config"]["dpo_training"]["no_such_key"] = 1
    with pytest.raises(CheckpointError, match="does not validate any more: .*no_such_key: unknown key"):
        progress().load_state_dict(saved)


def test_other_data_is_refused_with_both_fingerprints_unless_accepted():
    data = {"train": "aaaa", "validation": "bbbb"}
    saved = {**TrainProgress("dpo", to_dict(validate_mapping(RAW, "dpo")), 2, data).state_dict(), "step": 3}
    regenerated = {"train": "cccc", "validation": "bbbb"}
    with pytest.raises(CheckpointError, match=r"step 3 was trained on other data \(fingerprint train aaaa -> cccc\).*"
                                              r"set dpo_training.accept_data_change = true"):
        TrainProgress("dpo", to_dict(validate_mapping(RAW, "dpo")), 2, regenerated).load_state_dict(saved)
    accepted = {**RAW, "dpo_training": {**RAW["dpo_training"], "accept_data_change": True}}
    resumed = TrainProgress("dpo", to_dict(validate_mapping(accepted, "dpo")), 2, regenerated)
    resumed.load_state_dict(saved)
    assert resumed.step == 3
    del saved["data"]  # written before fingerprints were kept: nothing to compare
    TrainProgress("dpo", to_dict(validate_mapping(RAW, "dpo")), 2, regenerated).load_state_dict(saved)


def test_accepting_a_data_change_or_moving_the_run_is_not_another_run():
    from dpo_hpc.config import to_identity

    same = {**RAW, "dpo_training": {**RAW["dpo_training"], "accept_data_change": True, "save_dir": "elsewhere"}}
    assert to_identity(validate_mapping(same, "dpo")) == to_identity(validate_mapping(RAW, "dpo"))
