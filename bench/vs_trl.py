"""dpo-hpc against TRL's DPOTrainer, side by side in one run: same model, data, batches and
optimizer, each side in a fresh process, alternating, medians.

    python bench/vs_trl.py --trl-python /path/to/trl-venv/bin/python [--vocab 32768] [--steps 25]

TRL lives in its own virtual environment (never a dependency of dpo-hpc), for example::

    python3 -m venv ~/trl-venv && ~/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0

What it does (perf.md section 4, the fair protocol):
- a random-init Llama (hidden 256, 4 layers, 8 heads / 2 KV, FFN 688, untied head) over a word-level
  tokenizer of ``--vocab`` words, saved once and loaded by both sides;
- preference pairs of random words (prompt 16-64, replies 8-96), nothing truncated; TRL gets the rows
  in the exact order dpo-hpc's sampler draws them, so both train on identical batches;
- fp32 on both sides, same AdamW, constant learning rate, clipping at 1.0, beta 0.1, no gradient
  checkpointing, ``--threads`` threads;
- the correctness gate: the first loss is ln 2 on both sides and the first 10 losses agree within
  1e-5; a speed ratio is only reported when the gate holds;
- step time: median of the steps after ``--warmup``; peak RSS of each process.

Note on memory: TRL keeps the weights and Adam state in the model's dtype, dpo-hpc keeps fp32
master weights under DeepSpeed; in fp32 (this benchmark) the two agree. The last line is a JSON
object with every figure and the ratios (ours / TRL: below 1 is better).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_assets(folder: Path, vocab: int, pairs: int, seed: int) -> tuple[Path, Path]:
    """A word-level tokenizer and random Llama in ``folder/model``, pairs in ``folder/pairs.jsonl``."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<bos>": 0, "<eos>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    model_dir = folder / "model"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))

    rows = []
    for _ in range(pairs):
        prompt, chosen, rejected = text(rng.randint(16, 64)), text(rng.randint(8, 96)), text(rng.randint(8, 96))
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def trl_order(data: Path, out: Path, steps: int, batch: int, seed: int) -> Path:
    """The rows of dpo-hpc's first ``steps`` batches, in order, for TRL's sequential sampler."""
    from dpo_hpc.data.sampler import global_batch_indices

    rows = data.read_text().splitlines()
    ordered = [rows[i] for step in range(steps) for i in global_batch_indices(len(rows), step, batch, 1, 1, 0, seed)[0]]
    out.write_text("\n".join(ordered) + "\n")
    return out


def run_ours(folder: Path, model: Path, data: Path, args, tag: str, precompute: bool) -> dict:
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = folder / f"ours-{tag}"
    config = {
        "policy_name": str(model), "precision": "fp32",
        "dataset": {"dataset_name": str(data), "val_ratio": 0.0, "max_length": 512, "max_prompt_length": 256},
        "dpo_training": {"learning_rate": args.lr, "batch_size": args.batch, "max_steps": args.steps,
                         "lr_scheduler": "constant", "max_grad_norm": 1.0, "beta": 0.1, "seed": args.seed,
                         "logging_steps": 1000, "save_dir": str(run_dir), "precompute_ref_log_probs": precompute,
                         "ref_log_probs_cache": str(folder / f"ref-cache-{tag}")},
    }
    path = folder / f"ours-{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "dpo_hpc", "train", "dpo", "--config", str(path)], check=True, env=env,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    return {"side": "dpo-hpc", "losses": [e.value for e in acc.Scalars("loss")],
            "step_seconds": [e.value for e in acc.Scalars("perf/step_seconds")],
            "peak_rss_mb": manifest["peak_rss_mb"], "precompute_s": manifest.get("ref_precompute_seconds")}


def run_trl(folder: Path, model: Path, ordered: Path, args, tag: str, precompute: bool) -> dict:
    command = [args.trl_python, str(REPO / "bench" / "trl_side.py"), "--model", str(model), "--data", str(ordered),
               "--out", str(folder / f"trl-{tag}"), "--steps", str(args.steps), "--batch", str(args.batch),
               "--lr", str(args.lr), "--threads", str(args.threads)] + (["--precompute"] if precompute else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs: list[dict], warmup: int) -> dict:
    steps = [statistics.median(r["step_seconds"][warmup:]) for r in runs]
    return {"median_step_s": round(statistics.median(steps), 4), "per_repeat_step_s": [round(s, 4) for s in steps],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", required=True, help="python of a virtual environment with trl installed")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precompute", action="store_true", help="both sides with precomputed reference log-probs")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="dpo_hpc_vs_trl_"))
    model, data = build_assets(folder, args.vocab, args.pairs, args.seed)
    ordered = trl_order(data, folder / "pairs_in_order.jsonl", args.steps, args.batch, args.seed)
    ours, theirs = [], []
    for repeat in range(args.repeats):  # alternate, each side in a fresh process
        ours.append(run_ours(folder, model, data, args, str(repeat), args.precompute))
        theirs.append(run_trl(folder, model, ordered, args, str(repeat), args.precompute))
        print(json.dumps({"repeat": repeat, "ours": summary(ours[-1:], args.warmup),
                          "trl": summary(theirs[-1:], args.warmup)}), flush=True)
    gap = max(abs(a - b) for a, b in zip(ours[0]["losses"][:10], theirs[0]["losses"][:10]))
    gate = abs(ours[0]["losses"][0] - math.log(2)) < 1e-4 and abs(theirs[0]["losses"][0] - math.log(2)) < 1e-4 \
        and gap < 1e-5
    mine, trl = summary(ours, args.warmup), summary(theirs, args.warmup)
    result = {
        "vocab": args.vocab, "batch_pairs": args.batch, "steps": args.steps, "threads": args.threads,
        "precompute_ref_log_probs": args.precompute, "versions": theirs[0]["versions"],
        "gate": {"passed": gate, "first_loss": [ours[0]["losses"][0], theirs[0]["losses"][0]],
                 "max_loss_gap_first_10": gap},
        "dpo_hpc": mine, "trl": trl,
        "step_time_ratio": round(mine["median_step_s"] / trl["median_step_s"], 3) if gate else None,
        "peak_rss_ratio": round(mine["peak_rss_mb"] / trl["peak_rss_mb"], 3) if gate else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
