"""The TRL side of bench/vs_trl.py: TRL's DPOTrainer (or KTOTrainer, or RewardTrainer) on the same
model, data and batch order.

Run by bench/vs_trl.py with the Python of a separate virtual environment that has TRL (TRL is
never a dependency of dpo-hpc). Prints one JSON line: per-step losses (recorded from the loss
tensor, not the rounded log), per-step wall times, peak RSS, on CUDA the peak and resident
(between steps) device memory, versions.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="JSONL of prompt/chosen/rejected (KTO: prompt/completion/"
                        "label), already in batch order")
    parser.add_argument("--trainer", choices=("dpo", "kto", "reward"), default="dpo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precompute", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a DPOConfig (KTOConfig, RewardConfig) option (the value read as JSON, else as text)")
    args = parser.parse_args()

    import torch
    import transformers
    import trl
    from datasets import load_dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    reward = args.trainer == "reward"
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = auto.from_pretrained(args.model, dtype=dtype)
    ref = None if reward or args.precompute else AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_dataset("json", data_files=args.data, split="train")
    losses: list[float] = []
    step_times: list[float] = []

    Config, Trainer = {"dpo": (DPOConfig, DPOTrainer), "kto": (KTOConfig, KTOTrainer),
                       "reward": (RewardConfig, RewardTrainer)}[args.trainer]
    # a reward model has no reference, so no beta and nothing to precompute
    with_reference = {} if reward else {"beta": args.beta, "precompute_ref_log_probs": args.precompute}
    reference = {} if reward else {"ref_model": ref}

    class InOrder(Trainer):
        def _get_train_sampler(self, *unused, **unused_kw):
            return SequentialSampler(self.train_dataset)  # the batches dpo-hpc's sampler drew, in its order

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            if model.training:
                losses.append((out[0] if return_outputs else out).detach().float().item())
            return out

    resident: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *unused, **unused_kw):
            self.t = time.perf_counter()

        def on_step_end(self, *unused, **unused_kw):
            step_times.append(time.perf_counter() - self.t)
            if torch.cuda.is_available():  # after the optimizer step: weights, gradients, Adam state
                resident.append(torch.cuda.memory_allocated() / 2**30)

    config = Config(
        output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=args.steps, logging_steps=1,
        save_strategy="no", report_to=[], bf16=args.bf16, fp16=False, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, seed=42, max_length=None, optim="adamw_torch",
        gradient_checkpointing=args.gradient_checkpointing, disable_tqdm=True, **with_reference,
        **dict(option(text) for text in args.option),
    )
    trainer = InOrder(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[Clock()],
                      **reference)
    init_s = time.perf_counter() - started
    trainer.train()
    print(json.dumps({
        "side": "trl", "losses": losses, "step_seconds": step_times, "init_s": round(init_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "resident_cuda_gib": round(max(resident), 2) if resident else None,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
