"""TensorBoard tags in the HF Trainer's layout, and runs written with the earlier bare names read
back under the same tags."""

from __future__ import annotations

import torch

from dpo_hpc.checkpoint import RunDir
from dpo_hpc.trainers.trackers import EVAL, TRAIN, TensorBoard, read_scalars


def test_tags_are_train_and_eval_and_legacy_bare_names_read_as_train(tmp_path):
    board = TensorBoard(RunDir(tmp_path / "new"), start_step=0)
    board.scalars(TRAIN, {"loss": 0.7, "rewards/margins": 0.1}, 1)
    board.scalars(EVAL, {"loss": 0.69}, 1)
    board.histograms(TRAIN, {"margins": torch.tensor([0.1, -0.2])}, 1)
    board.close()
    assert set(read_scalars(tmp_path / "new/tensorboard")) == {"train/loss", "train/rewards/margins", "eval/loss"}

    from torch.utils.tensorboard import SummaryWriter

    old = SummaryWriter(str(tmp_path / "old"))  # what runs wrote before the HF layout
    old.add_scalar("loss", 0.5, 1)  # values exact in float32: event files store float32
    old.add_scalar("rewards/margins", 0.25, 1)
    old.add_scalar("eval/loss", 0.75, 1)
    old.close()
    assert read_scalars(tmp_path / "old") == {"train/loss": [(1, 0.5)], "train/rewards/margins": [(1, 0.25)],
                                              "eval/loss": [(1, 0.75)]}


def test_a_run_carries_its_settings_as_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from dpo_hpc.trainers.trackers import flat_hparams

    identity = {"dpo_training": {"beta": 0.3, "learning_rate": 1e-4}, "lora": {"r": 8, "target_modules": ["q", "v"]}}
    assert flat_hparams(identity) == {"dpo_training.beta": 0.3, "dpo_training.learning_rate": 1e-4, "lora.r": 8,
                                      "lora.target_modules": "['q', 'v']"}
    board = TensorBoard(RunDir(tmp_path), start_step=0, hparams={"run_name": "dpo-1 beta=0.3", **flat_hparams(identity)})
    board.scalars(TRAIN, {"loss": 0.5}, 1)
    board.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert info.hparams["dpo_training.beta"].number_value == 0.3
    assert info.hparams["run_name"].string_value == "dpo-1 beta=0.3"


def test_a_fresh_start_over_an_old_attempt_shows_each_step_once(tmp_path):
    import time

    old = TensorBoard(RunDir(tmp_path), start_step=0)  # an attempt killed before its first checkpoint
    for step in range(1, 6):
        old.scalars(TRAIN, {"loss": float(step)}, step)
    old.close()
    time.sleep(1.1)  # event files are named by the second they were opened
    again = TensorBoard(RunDir(tmp_path), start_step=0)
    for step in range(1, 4):
        again.scalars(TRAIN, {"loss": 10.0 + step}, step)
    again.close()
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 11.0), (2, 12.0), (3, 13.0)]
