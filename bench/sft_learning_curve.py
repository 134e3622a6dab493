"""How fast the tiny model learns the reversal task under plain SFT (for the quality benchmark's design).

    python bench/sft_learning_curve.py [--steps 1200] [--lr 2e-3] [--batch 64] [--multi-turn 0.0] [--every 100]

A plain PyTorch loop over dpo-hpc's own data path (generated rows, byte tokenizer, SFT masks,
step-indexed batches), no DeepSpeed: it isolates the learning dynamics from the trainer. Prints
the answer-token loss (nats) and the greedy exact-match accuracy on held-out prompts every
``--every`` steps, with the seconds elapsed (evaluation time excluded).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--multi-turn", type=float, default=0.0, help="fraction of two-turn rows")
    parser.add_argument("--every", type=int, default=100, help="report interval in steps")
    parser.add_argument("--eval-prompts", type=int, default=300, help="held-out prompts for greedy accuracy")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_hpc.config import DatasetConfig
    from dpo_hpc.data.pipeline import load_splits
    from dpo_hpc.data.sampler import global_batch_indices
    from dpo_hpc.data.verifiable import TaskSpec, generate, reward, write_jsonl
    from dpo_hpc.evaluate import greedy_answers
    from dpo_hpc.tiny_model import make_tiny_model
    from dpo_hpc.algorithms.logprobs import CompletionScorer
    from dpo_hpc.algorithms.objectives import SFTObjective

    scratch = Path(tempfile.mkdtemp(prefix="dpo_hpc_curve_"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # this run's alone, however it ends
    rows, test, _ = generate(4000, args.eval_prompts, seed=0, spec=TaskSpec(multi_turn_ratio=args.multi_turn))
    prompts = [row["prompt"] for row in test]
    write_jsonl(rows, scratch / "train.jsonl")
    model_dir = make_tiny_model(scratch / "model", seed=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, _, _ = load_splits(DatasetConfig(dataset_name=str(scratch / "train.jsonl"), val_ratio=0.0,
                                            max_length=128, max_prompt_length=96), tokenizer, "sft")
    objective = SFTObjective(tokenizer.pad_token_id, CompletionScorer())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train_seconds = 0.0
    for step in range(args.steps):
        start = time.perf_counter()
        batch = objective.collate([train[i] for i in global_batch_indices(len(train), step, args.batch, 1, 1, 0, 42)[0]])
        loss_sum, _ = objective.loss_and_stats(model, batch)
        loss = loss_sum / objective.units(batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_seconds += time.perf_counter() - start
        if (step + 1) % args.every == 0 or step == args.steps - 1:
            answers = greedy_answers(model, tokenizer, prompts)
            model.train()
            accuracy = sum(reward(p, a) for p, a in zip(prompts, answers)) / len(prompts)
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  accuracy {accuracy:6.1%}  {train_seconds:7.1f} s",
                  flush=True)


if __name__ == "__main__":
    main()
