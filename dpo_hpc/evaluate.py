"""Ground-truth evaluation on the verifiable task: greedy answers to held-out prompts, scored
with the task's exact reward; optionally the win rate against a baseline model (e.g. the SFT one).

    dpo-hpc evaluate runs/tiny-single/dpo --data runs/tiny/data/test.jsonl --baseline runs/tiny-single/sft

Prompts use the training convention ([BOS] + prompt, no special tokens added by the tokenizer)
and are left-padded in batches; generation stops at EOS.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

from .data.collate import pad_rows
from .data.tokenize import SpecialTokens, encode_completion
from .algorithms.logprobs import sequence_logps
from .data.sources import DataError
from .data.verifiable import is_task_prompt, prompt_for, reward


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


def load_test_rows(path: str | Path, limit: Optional[int] = None) -> tuple[list[str], Optional[list[str]]]:
    """Prompts, and the reference answers when every row has an ``answer`` string (make-data writes them).
    Rows that are not prompts of the verifiable task are refused: its exact reward would score them
    as if they were."""
    prompts, answers = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(f"{path}:{line_no}: expected an object with a 'prompt' string")
            if not is_task_prompt(row["prompt"]):
                raise DataError(f"{path}:{line_no}: not a prompt of the verifiable reversal task (expected "
                                f"'{prompt_for('WORD')!r}', as `dpo-hpc make-data` writes to test.jsonl); "
                                "evaluate scores only that task")
            prompts.append(row["prompt"])
            answers.append(row.get("answer") if isinstance(row.get("answer"), str) else None)
    if limit:
        prompts, answers = prompts[:limit], answers[:limit]
    return prompts, (answers if answers and all(a is not None for a in answers) else None)


def load_test_prompts(path: str | Path, limit: Optional[int] = None) -> list[str]:
    return load_test_rows(path, limit)[0]


@torch.no_grad()
def answer_logps(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 64) -> list[float]:
    """Summed log-prob of each reference answer (and its EOS) after [BOS] + prompt, as training scores it."""
    special = SpecialTokens.of(tokenizer)
    stats: Counter = Counter()
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        rows, masks = [], []
        for prompt, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion = encode_completion(tokenizer, prompt, prompt_ids, answer, stats) + [special.eos_id]
            rows.append(special.prefix + prompt_ids + completion)
            masks.append([0] * (len(special.prefix) + len(prompt_ids)) + [1] * len(completion))
        batch = pad_rows(rows, masks, special.pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.extend(sequence_logps(logits, batch["input_ids"], batch["loss_mask"]).tolist())
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def evaluate(model_dir: str, data: str, baseline: Optional[str] = None, limit: Optional[int] = None,
             max_new_tokens: int = 16, batch_size: int = 64) -> dict:
    """Accuracy (exact reward of greedy answers); with reference answers, their mean log-prob; with a
    baseline, its figures, the win rate against it and the change of the answer log-prob."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts, references = load_test_rows(data, limit)

    def score(path):
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
        logps = answer_logps(model, tokenizer, prompts, references, batch_size) if references else None
        return answers, [reward(p, a) for p, a in zip(prompts, answers)], logps

    answers, rewards, logps = score(model_dir)
    result = {"model": model_dir, "data": data, "prompts": len(prompts), "accuracy": _mean(rewards)}
    if logps:
        result["answer_logp"] = _mean(logps)
    if baseline:
        _, base_rewards, base_logps = score(baseline)
        result.update(baseline=baseline, baseline_accuracy=_mean(base_rewards),
                      win_rate_vs_baseline=win_rate(rewards, base_rewards))
        if logps:
            result["baseline_answer_logp"] = _mean(base_logps)
            result["answer_logp_change_vs_baseline"] = _mean(logps) - _mean(base_logps)
    result["examples"] = [{"prompt": p, "answer": a, "reward": r} for p, a, r in list(zip(prompts, answers, rewards))[:5]]
    return result
