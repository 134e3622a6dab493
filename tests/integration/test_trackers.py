"""Experiment trackers through the real trainer: TensorBoard tags in the HF Trainer's layout,
and Weights & Biases in offline mode, read back from the run file wandb wrote."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import run_config
from dpo_hpc.checkpoint import RunDir
from dpo_hpc.config import validate_mapping

pytestmark = pytest.mark.slow


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a ``run-<id>.wandb`` file: a 7-byte header, then records in
    32 KiB blocks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, records = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_and_tensorboard_get_the_same_train_and_eval_metrics(tmp_path, micro_model, reverse_data,
                                                                          monkeypatch):
    pytest.importorskip("wandb")
    from dpo_hpc.trainers.trackers import read_scalars, wandb_run_id
    from dpo_hpc.trainers.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "dpo-hpc-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = run_config(tmp_path, micro_model, reverse_data, "dpo_training", max_steps=4, batch_size=4, eval_steps=2,
                     report_to=["tensorboard", "wandb"], run_name="dpo-test beta=0.1", generate_during_eval=True,
                     max_new_tokens=4)
    train(validate_mapping(raw, "dpo"), "dpo")
    run_dir = Path(raw["dpo_training"]["save_dir"])
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "dpo-test beta=0.1" and run.project == "dpo-hpc-tests"
    assert run.run_id == wandb_run_id(RunDir(run_dir))  # a restart of this run directory continues it
    history: dict[str, list] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                history.setdefault(key, []).append((row["_step"], value))
    tensorboard = read_scalars(run_dir / "tensorboard")
    for tag in ("train/loss", "train/rewards/margins", "train/learning_rate", "eval/loss", "eval/rewards/accuracies"):
        assert [step for step, _ in history[tag]] == [step for step, _ in tensorboard[tag]], tag
        assert [v for _, v in history[tag]] == pytest.approx([v for _, v in tensorboard[tag]], rel=1e-6), tag
    assert [step for step, _ in history["eval/loss"]] == [2, 4]
    assert any(key.startswith("train/margins") for key in history), sorted(history)  # the margins histogram
    assert history["eval/samples/_type"] == [(step, "table-file") for step in (0, 2, 4)]  # the samples, as a table
    assert [rows for _, rows in history["eval/samples/nrows"]] == [4, 4, 4]


def test_tensorboard_only_when_asked_and_wandb_without_the_package_says_how(tmp_path, micro_model, reverse_data,
                                                                          monkeypatch):
    import sys

    from dpo_hpc.config import ConfigError
    from dpo_hpc.trainers.trainer import train

    raw = run_config(tmp_path, micro_model, reverse_data, "dpo_training", max_steps=2, batch_size=4, report_to=[])
    assert train(validate_mapping(raw, "dpo"), "dpo")["status"] == "completed"
    run_dir = Path(raw["dpo_training"]["save_dir"])
    assert not (run_dir / "tensorboard").exists() and (run_dir / "progress.json").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    raw = run_config(tmp_path / "w", micro_model, reverse_data, "dpo_training", max_steps=2, batch_size=4,
                     report_to=["wandb"])
    with pytest.raises(ConfigError, match=r"pip install 'dpo-hpc\[wandb\]'"):
        train(validate_mapping(raw, "dpo"), "dpo")
    assert not (tmp_path / "w" / "run" / "data_report.json").exists()  # refused before the data was read
