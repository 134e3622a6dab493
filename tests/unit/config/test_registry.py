"""The algorithm registry is the one list of trainers: everything that names trainers derives from it."""

from __future__ import annotations

import typing

import pytest

from dpo_hpc.cli import TRAINERS, build_parser
from dpo_hpc.config import ALGORITHMS, ConfigError, algorithm, by_command, detect_trainer, validate_mapping
from dpo_hpc.experiment.schema import StageConfig


def test_every_list_of_trainers_is_the_registry():
    assert set(TRAINERS.values()) == set(ALGORITHMS)
    trainer_names = typing.get_args(typing.get_args(StageConfig.__pydantic_fields__["trainer"].annotation)[0])
    assert set(trainer_names) == set(ALGORITHMS)
    train = build_parser().parse_args(["train", "dynamic-beta-dpo", "--config", "c.toml"])
    assert TRAINERS[train.trainer] == "dynamic_beta_dpo"
    assert list(TRAINERS) == [a.command for a in ALGORITHMS.values()]


def test_detection_and_commands():
    for algo in ALGORITHMS.values():
        for section in algo.marker_sections:
            assert detect_trainer({section: {}}) == algo.name
        assert by_command(algo.command) is algo
    assert detect_trainer({"dpo_training": {}}) == "dpo"
    assert {a.legacy_command: a.name for a in ALGORITHMS.values() if a.legacy_command} == {
        "train-sft": "sft", "train-dpo": "dynamic_beta_dpo", "train-beta-dpo": "beta_dpo"}
    with pytest.raises(ConfigError, match="unknown trainer 'ipo'; expected one of sft, dpo"):
        algorithm("ipo", "x.toml")


def test_each_preference_algorithm_builds_its_beta_policy():
    from dpo_hpc.algorithms.beta import LOCAL
    from dpo_hpc.algorithms.objectives import build_objective

    base = {"policy_name": "m", "dataset": {"dataset_name": "d"}}
    for algo in ALGORITHMS.values():
        cfg = validate_mapping({**base, algo.training_section: {"learning_rate": 1.0, "batch_size": 1,
                                                                 "save_dir": "r"}}, algo.name)
        objective = build_objective(algo, cfg, pad_id=0, collective=LOCAL)
        assert objective.kind == algo.kind
        if algo.model == "reward_model":
            assert type(objective).__name__ == "RewardObjective" and algo.beta_policy is None
        elif algo.kind == "preference":
            assert type(objective.policy).__name__ == algo.beta_policy.rsplit(":", 1)[1]
