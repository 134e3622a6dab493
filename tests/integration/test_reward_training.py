"""Reward models through the real trainer (DeepSpeed on CPU): the command trains a causal LM's
base with a fresh score head and logs the rewards; the saved model scores as it trained under
transformers' own loading and pooling; a preempted run resumes to the weights of one that never
stopped (LoRA too); packed batches train as padded ones; two ranks match one with accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_resumed_as_straight, run_config, stop_at
from dpo_hpc.config import validate_mapping
from test_training import one_rank_and_two, run_cli, scalars, small_data, write_config

pytestmark = pytest.mark.slow

REWARD_SCALARS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "grad_norm",
                  "tokens_per_sec"}


EPS = 1e-6
"""adam_epsilon where two layouts or splits of a batch are compared: AdamW's default 1e-8 turns the
float noise of a near-zero gradient (a score head's on rare tokens' embeddings) into a full step."""


def reward_config(tmp_path, model, data, **training):
    return run_config(tmp_path, model, data, "reward_training", **training)


def test_a_reward_model_trains_and_scores_as_it_trained_when_loaded_by_transformers(tmp_path, micro_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpo_hpc.algorithms.reward import RewardObjective, sequence_rewards
    from dpo_hpc.algorithms.beta import LOCAL
    from dpo_hpc.data.tokenize import SpecialTokens

    data = small_data(tmp_path, 64)
    raw = reward_config(tmp_path, micro_model, data, max_steps=12, batch_size=8, learning_rate=3e-3,
                        center_rewards_coefficient=0.01, eval_steps=6)
    result = run_cli(["train", "reward", "--config", str(write_config(tmp_path, raw))])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "12 steps of 8 pairs" in result.stdout and "reward model: each prompt and reply scored" in result.stdout
    run = Path(raw["reward_training"]["save_dir"])
    logged = scalars(run / "tensorboard")
    assert REWARD_SCALARS <= set(logged), sorted(set(logged))
    losses = [v for _, v in logged["loss"]]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # it learns the pairs' order
    rewards = _histograms(run / "tensorboard", "train/rewards")  # TRL logs their min, mean and max
    assert [h.step for h in rewards] == list(range(1, 13)) and rewards[-1].histogram_value.num == 16  # 8 pairs
    manifest = json.loads((run / "run_manifest.json").read_text())
    assert manifest["status"] == "completed" and "reference" not in manifest
    assert {"rewards/accuracies", "rewards/margins"} <= set(manifest["final_eval"])
    card = (run / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification.from_pretrained" in card

    model = AutoModelForSequenceClassification.from_pretrained(run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert model.config.num_labels == 1 and model.config.pad_token_id == SpecialTokens.of(tokenizer).pad_id
    prompts = ["Reverse: abc\n", "Reverse: hello there\n"]
    rows = [tokenizer(p + reply, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
            for p, reply in zip(prompts, ["cba", "ereht olleh"])]
    padded = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**padded).logits[:, 0]  # transformers' pooling: the last token that is not padding
        objective = RewardObjective(SpecialTokens.of(tokenizer).pad_id, LOCAL)
        batch = objective.collate([_as_pair(r) for r in rows])
        ours = sequence_rewards(model, batch)[:2]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _histograms(logdir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0})
    acc.Reload()
    return acc.Histograms(tag)


def _as_pair(ids: list[int]):
    from dpo_hpc.data.tokenize import TokenizedPair

    return TokenizedPair(ids[:1], ids[1:], ids[1:])


@pytest.mark.parametrize("options", [{}, {"lora": True}], ids=["full", "lora"])
def test_a_preempted_reward_run_resumes_to_the_weights_of_one_that_never_stopped(tmp_path, micro_model, options):
    from dpo_hpc.trainers.trainer import train

    lora = options.get("lora", False)
    if lora:
        pytest.importorskip("peft")
    data = small_data(tmp_path, 30)

    def run(name, stop=None):
        raw = reward_config(tmp_path / name, micro_model, data, max_steps=6, batch_size=4, learning_rate=2e-3,
                            gradient_accumulation_steps=2, save_steps=2)
        if lora:
            raw["lora"] = {"r": 4, "target_modules": "all-linear"}
        return train(validate_mapping(raw, "reward"), "reward", stop=stop), tmp_path / name / "run"

    _, straight = run("straight")
    assert run("stopped", stop=stop_at(3))[0]["status"] == "preempted"
    summary, resumed = run("stopped")
    assert summary["status"] == "completed"
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert_resumed_as_straight(straight, resumed, weights, "loss", 6)
    if lora:  # peft saves the trained score head whole beside the adapters
        assert any("score" in key for key in load_file(straight / weights)), sorted(load_file(straight / weights))


def test_padding_free_reward_training_equals_padded(tmp_path, micro_model):
    """Packed pairs (with gradient checkpointing, an exact recompute) train to the padded run's weights."""
    from dpo_hpc.trainers.trainer import train

    data = small_data(tmp_path, 30)
    weights = {}
    for name, packed in (("padded", False), ("packed", True)):
        raw = reward_config(tmp_path / name, micro_model, data, max_steps=3, batch_size=4, learning_rate=2e-3,
                            padding_free=packed, gradient_checkpointing=packed, adam_epsilon=EPS)
        assert train(validate_mapping(raw, "reward"), "reward")["status"] == "completed"
        weights[name] = load_file(tmp_path / name / "run" / "model.safetensors")
    for key in weights["padded"]:
        torch.testing.assert_close(weights["packed"][key], weights["padded"][key], rtol=1e-5, atol=1e-4)


@pytest.mark.multiproc
def test_two_reward_ranks_under_zero3_match_one_rank_with_accumulation(tmp_path, micro_model):
    data = small_data(tmp_path, 24)
    common = dict(max_steps=4, batch_size=4, learning_rate=2e-3, adam_epsilon=EPS)
    one = reward_config(tmp_path / "one", micro_model, data, gradient_accumulation_steps=2, **common)
    two = reward_config(tmp_path / "two", micro_model, data, **common)
    two["deepspeed"] = {"zero_stage": 3}
    assert "score.weight" in one_rank_and_two(tmp_path, "reward", one, two)[0]
