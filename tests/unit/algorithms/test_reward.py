"""Reward models: the Bradley-Terry loss at hand values, each sequence's end in every batch layout,
and the objective on a tiny Llama reward model against transformers' own pooling of each sequence
alone, in float64, gradient included."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dpo_hpc.algorithms.beta import LOCAL
from dpo_hpc.algorithms.reward import RewardObjective, reward_losses, score_head, sequence_rewards
from dpo_hpc.config import ConfigError
from dpo_hpc.data.collate import layout_rows, sequence_ends
from dpo_hpc.data.tokenize import TokenizedPair

PAD = 0


def test_reward_losses_at_hand_values():
    chosen, rejected = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = [-math.log(1 / (1 + math.exp(-1))), math.log(2), -math.log(1 / (1 + math.exp(3)))]
    assert reward_losses(chosen, rejected).tolist() == pytest.approx(expected, abs=1e-6)
    centred = reward_losses(chosen, rejected, center_rewards_coefficient=0.01)
    assert centred.tolist() == pytest.approx([expected[0] + 0.01, expected[1], expected[2] + 0.01], abs=1e-6)
    margins = reward_losses(chosen, rejected, margins=torch.tensor([1.0, -1.0, 0.0]))  # Llama 2's: r_c - r_r - m
    assert margins.tolist() == pytest.approx([math.log(2), -math.log(1 / (1 + math.exp(-1))), expected[2]], abs=1e-6)


@pytest.mark.parametrize("layout", ["padded", "packed", "flat"])
def test_sequence_ends_are_each_sequences_last_token_in_sequence_order(layout):
    rows = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    batch = layout_rows(rows, [[1] * len(r) for r in rows], PAD, layout)
    end_rows, end_positions = sequence_ends(batch)
    assert batch["input_ids"][end_rows, end_positions].tolist() == [7, 8, 13, 15]


def tiny_reward_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, num_labels=1,
                         pad_token_id=PAD, attn_implementation="sdpa", use_cache=False)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # rewards well apart from 0
    return model.eval()


def pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = torch.Generator().manual_seed(seed)
    return [TokenizedPair(*(torch.randint(1, 32, (int(k),), generator=rng).tolist()
                            for k in torch.randint(1, 6, (3,), generator=rng))) for _ in range(n)]


def alone(model, ids: list[int]) -> torch.Tensor:
    """transformers' reward of one unpadded sequence (its pooling reads the last token)."""
    return model(input_ids=torch.tensor([ids])).logits[0, 0]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_rewards_are_transformers_scores_of_each_sequence_alone(layout):
    model, batch_pairs = tiny_reward_model(), pairs(5)
    batch = RewardObjective(PAD, LOCAL, layout).collate(batch_pairs)
    with torch.no_grad():
        ours = sequence_rewards(model, batch)
        expected = [alone(model, p.prompt_ids + side) for side_of in ("chosen_ids", "rejected_ids")
                    for p in batch_pairs for side in [getattr(p, side_of)]]
    torch.testing.assert_close(ours, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_the_objective_matches_a_float64_bradley_terry_loss_with_its_gradient():
    """With the centring term, and the data's margins where some pairs have one."""
    coefficient, batch_pairs = 0.05, pairs(6, seed=1)
    batch_pairs = [dataclasses.replace(p, margin=0.3 * i) if i % 2 else p for i, p in enumerate(batch_pairs)]
    model, naive = tiny_reward_model(), tiny_reward_model().double()
    objective = RewardObjective(PAD, LOCAL, "padded", center_rewards_coefficient=coefficient)
    loss_sum, stats = objective.loss_and_stats(model, objective.collate(batch_pairs))
    loss_sum.backward()
    expected = 0
    for p in batch_pairs:
        chosen, rejected = alone(naive, p.prompt_ids + p.chosen_ids), alone(naive, p.prompt_ids + p.rejected_ids)
        expected = expected - torch.nn.functional.logsigmoid(chosen - rejected - (p.margin or 0.0)) \
            + coefficient * (chosen + rejected) ** 2
    expected.backward()
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["loss"][1].item() == 6 and objective.units(objective.collate(batch_pairs)).item() == 6
    for ours, theirs in ((model.score.weight, naive.score.weight),
                         (model.model.layers[0].mlp.up_proj.weight, naive.model.layers[0].mlp.up_proj.weight)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)
    chosen, rejected = stats["rewards/chosen"][0], stats["rewards/rejected"][0]
    assert stats["rewards/margins"][0].item() == pytest.approx((chosen - rejected).item(), abs=1e-5)
    objective.end_step()
    assert objective.histograms()["rewards"].shape == (12,)  # every reward of the step, chosen and rejected


def test_accuracy_counts_strictly_higher_chosen_rewards():
    model = tiny_reward_model()
    same = TokenizedPair([3, 4], [5, 6], [5, 6])  # equal replies score equally: not counted right
    objective = RewardObjective(PAD, LOCAL)
    stats = objective.eval_stats(model, objective.collate([same]))
    assert stats["rewards/accuracies"][0].item() == 0.0 and stats["loss"][0].item() == pytest.approx(math.log(2))


def test_the_score_head_is_found_through_a_deepspeed_engine_and_peft():
    model = tiny_reward_model()

    class Engine(torch.nn.Module):  # what the trainer holds: the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert score_head(Engine(model)) is model.score
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    head = score_head(wrapped)
    # peft's wrapper, whose trained copy of the head is what the model calls
    assert type(head).__name__ == "ModulesToSaveWrapper" and any(p.requires_grad for p in head.parameters())
    with pytest.raises(ConfigError, match="has no 'score' head"):
        score_head(torch.nn.Linear(2, 2))

