"""Shared fixtures: an offline micro model and generated preference data (built once per session)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A two-stage experiment file (SFT, then DPO from it) for tests of the expansion and the report.
EXPERIMENT_BASE = """
[experiment]
name = "exp"
output_root = "out"

[stages.sft]
trainer = "sft"
[stages.sft.config]
policy_name = "base-model"
dataset = { dataset_name = "data.jsonl" }
sft_training = { learning_rate = 1e-3, batch_size = 4 }
"""

EXPERIMENT_DPO = """
[stages.dpo]
trainer = "dpo"
from = "sft"
[stages.dpo.config]
dataset = { dataset_name = "data.jsonl" }
dpo_training = { learning_rate = 1e-6, batch_size = 2 }
"""


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    """A 2-layer, width-64 Llama with the byte tokenizer: fast enough for many training tests."""
    from dpo_hpc.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("micro_model"), seed=0, hidden_size=64, num_layers=2,
                           num_heads=4, intermediate_size=128, max_position_embeddings=256)


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory, micro_model) -> Path:
    """The micro model with a seeded, untrained one-output head: scores that differ sample by sample."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("random_reward_model")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_pretrained(micro_model, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(micro_model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reverse_data(tmp_path_factory, hf_cache) -> Path:
    from dpo_hpc.data.verifiable import write_dataset

    out = tmp_path_factory.mktemp("reverse_data")
    write_dataset(out, n_train=256, n_test=32, seed=0, label_noise=0.0)
    return out / "train.jsonl"


def assert_resumed_as_straight(straight: Path, resumed: Path, weights: str, curve: str, steps: int) -> None:
    """A run stopped and resumed ends with the weights (``weights``, a file of its run directory) of
    the run that never stopped, and logged ``curve`` at every step 1..``steps``, value for value."""
    import torch
    from safetensors.torch import load_file

    from dpo_hpc.trainers.trackers import read_scalars

    a, b = load_file(straight / weights), load_file(resumed / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged"
    once, twice = read_scalars(straight / "tensorboard"), read_scalars(resumed / "tensorboard")
    assert [s for s, _ in twice[f"train/{curve}"]] == list(range(1, steps + 1))
    assert [v for _, v in twice[f"train/{curve}"]] == [v for _, v in once[f"train/{curve}"]]


def stop_at(step: int):
    """A stop signal as if USR2 arrived during step ``step`` (the trainer asks once per step)."""
    from dpo_hpc.runtime.stop import StopSignal

    class StopAt(StopSignal):
        asked = 0

        def agreed(self, world_size, device, **_):
            self.asked += 1
            return "SIGUSR2" if self.asked == step else None

    return StopAt()


def run_config(tmp_path: Path, model: Path, data: Path, section: str, **training) -> dict:
    """A small trainer config dict for the micro model."""
    base = {
        "policy_name": str(model),
        "precision": "fp32",
        "dataset": {"dataset_name": str(data), "val_ratio": 0.1, "max_length": 96, "max_prompt_length": 64},
        section: {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 4, "save_dir": str(tmp_path / "run"),
                  "logging_steps": 1, **training},
    }
    return base
