"""Ground-truth evaluation on the verifiable task: greedy answers to held-out prompts, scored
with the task's exact reward; optionally the win rate against a baseline model (e.g. the SFT one).

    dpo-hpc evaluate runs/tiny/dpo --data runs/tiny/data/test.jsonl --baseline runs/tiny/sft

Prompts use the training convention ([BOS] + prompt, no special tokens added by the tokenizer)
and are left-padded in batches; generation stops at EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from .data.tokenize import SpecialTokens
from .data.verifiable import reward


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
    special = SpecialTokens.of(tokenizer)
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = [special.prefix + tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), special.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention[i, width - len(row):] = 1
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=special.eos_id, pad_token_id=special.pad_id)
        for row in out[:, width:]:
            ids = row.tolist()
            if special.eos_id in ids:
                ids = ids[:ids.index(special.eos_id)]
            answers.append(tokenizer.decode(ids))
    return answers


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> float:
    """P(reward > baseline) + 0.5 P(tie), per prompt."""
    if len(rewards) != len(baseline) or not rewards:
        raise ValueError("win rate needs two equally long, non-empty reward lists")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline)) / len(rewards)


def load_test_prompts(path: str | Path, limit: Optional[int] = None) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{line_no}: expected a 'prompt' string")
            prompts.append(row["prompt"])
    return prompts[:limit] if limit else prompts


def evaluate(model_dir: str, data: str, baseline: Optional[str] = None, limit: Optional[int] = None,
             max_new_tokens: int = 16, batch_size: int = 64) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = load_test_prompts(data, limit)

    def score(path):
        model = AutoModelForCausalLM.from_pretrained(path)
        answers = greedy_answers(model, AutoTokenizer.from_pretrained(path), prompts, max_new_tokens, batch_size)
        return answers, [reward(p, a) for p, a in zip(prompts, answers)]

    answers, rewards = score(model_dir)
    result = {"model": model_dir, "data": data, "prompts": len(prompts), "accuracy": sum(rewards) / len(rewards),
              "examples": [{"prompt": p, "answer": a, "reward": r} for p, a, r in list(zip(prompts, answers, rewards))[:5]]}
    if baseline:
        _, base_rewards = score(baseline)
        result.update(baseline=baseline, baseline_accuracy=sum(base_rewards) / len(base_rewards),
                      win_rate_vs_baseline=win_rate(rewards, base_rewards))
    return result
