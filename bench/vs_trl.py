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
- the correctness gate: the first loss is ln 2 (KTO: 0.5) on both sides and the first 10 losses agree within
  1e-5; a speed ratio is only reported when the gate holds;
- step time: median of the steps after ``--warmup``; peak RSS of each process.

On one GPU, perf.md section 7's setup (Llama-3.2-1B shape, bf16, HH-like lengths)::

    python bench/vs_trl.py --trl-python ... --shape llama-1b --vocab 128256 --bf16 \
        --prompt-words 100 500 --reply-words 50 300 --batch 8 --steps 20 --warmup 8 [--precompute]

an option both sides name alike with ``--both KEY=VALUE`` (``ld_alpha=0.5``, ``use_weighting=true``,
``loss_type="ipo"``: the loss gate then checks the two implementations of that option against each
other, and not the first loss's ln 2), and an ablation of one dpo-hpc option at a time with
``--set dpo_training.KEY=VALUE``
(``gradient_checkpointing``, ``optim``, ``group_by_length``, ``torch_compile``); ``--trainer kto``
compares TRL's KTOTrainer with ours on the pairs' sides as labelled completions, ``--trainer reward``
TRL's RewardTrainer with ours (the model with a score head at 0); ``--sides ours``
runs dpo-hpc alone (a micro-batch TRL is not compared at), ``--assets DIR`` reuses the model and
pairs of an earlier call. ``bench/gpu_session.sh`` runs all of these on a lent GPU machine. Pairs/s,
real tokens/s and MFU are computed the same way for both sides from the measured batches; on CUDA
each side also reports its peak memory above the state kept between steps.

Note on memory: TRL keeps the weights and Adam state in the model's dtype, dpo-hpc keeps fp32
master weights under DeepSpeed; in fp32 (this benchmark) the two agree. The last line is a JSON
object with every figure and the ratios (ours / TRL: below 1 is better).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FIRST_LOSS = {"dpo": math.log(2), "kto": 0.5, "reward": math.log(2)}
"""What ``--trainer`` compares (TRL's DPOTrainer, KTOTrainer or RewardTrainer) and the first loss both
sides must give (policy = reference: DPO's ln 2, KTO's 1 - sigmoid(0); a reward model whose score
head starts at 0: ln 2)."""


def algorithm(trainer: str):
    """The registry's entry of ``trainer``: its config section, and whether it reads a reference."""
    from dpo_hpc.config import ALGORITHMS

    return ALGORITHMS[trainer]


def section(trainer: str) -> str:
    return algorithm(trainer).training_section


def reward_model(model: Path, out: Path) -> Path:
    """The causal LM as a reward model with its score head at 0 (every reward 0 at the first step,
    so both sides' first loss is ln 2), saved for both sides to load."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    torch.nn.init.zeros_(scorer.score.weight)
    scorer.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


SHAPES = {
    # perf.md section 4 (CPU): small enough for 2 cores
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, tie_word_embeddings=False),
    # perf.md section 7 (one H100): Llama-3.2-1B's shape, random init
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
}


def build_assets(folder: Path, vocab: int, pairs: int, seed: int, shape: str = "small",
                 prompt_words: tuple[int, int] = (16, 64), reply_words: tuple[int, int] = (8, 96)) -> tuple[Path, Path]:
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
    longest = 2 + prompt_words[1] + reply_words[1]
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(512, longest), bos_token_id=0, eos_token_id=1,
                         pad_token_id=2, **SHAPES[shape])
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))

    rows = []
    for _ in range(pairs):
        prompt, chosen, rejected = text(rng.randint(*prompt_words)), text(rng.randint(*reply_words)), \
            text(rng.randint(*reply_words))
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def unpaired(data: Path, out: Path) -> Path:
    """KTO's rows of the pairs: each pair's chosen completion desirable and its rejected one not, in
    the order dpo-hpc unpairs them."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    out.write_text("".join(json.dumps({"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"})
                           + "\n" for row in rows for side in ("chosen", "rejected")))
    return out


def with_margins(data: Path, out: Path, seed: int) -> Path:
    """The pairs, each with a ``margin`` in [0, 2) (TRL's reward-model column; both sides read it)."""
    import random

    rng = random.Random(seed)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    out.write_text("".join(json.dumps({**row, "margin": round(2 * rng.random(), 3)}) + "\n" for row in rows))
    return out


def trl_order(data: Path, out: Path, steps: int, batch: int, seed: int) -> Path:
    """The rows of dpo-hpc's first ``steps`` batches, in order, for TRL's sequential sampler."""
    from dpo_hpc.data.sampler import global_batch_indices

    rows = data.read_text().splitlines()
    ordered = [rows[i] for step in range(steps) for i in global_batch_indices(len(rows), step, batch, 1, 1, 0, seed)[0]]
    out.write_text("\n".join(ordered) + "\n")
    return out


def run_ours(folder: Path, model: Path, data: Path, args, tag: str, precompute: bool) -> dict:
    import yaml

    from dpo_hpc.trainers.trackers import read_scalars

    run_dir = folder / f"ours-{tag}"
    config = {
        "policy_name": str(model), "precision": "bf16" if args.bf16 else "fp32",
        "dataset": {"dataset_name": str(data), "val_ratio": 0.0, "max_length": 4096, "max_prompt_length": 2048},
        section(args.trainer): {"learning_rate": args.lr, "batch_size": args.batch, "max_steps": args.steps,
                                "lr_scheduler": "constant", "max_grad_norm": 1.0, "seed": args.seed,
                                "logging_steps": 1000, "save_dir": str(run_dir)},
    }
    if algorithm(args.trainer).uses_reference:
        config[section(args.trainer)].update(beta=0.1, precompute_ref_log_probs=precompute,
                                             ref_log_probs_cache=str(folder / f"ref-cache-{tag}"))
    path = folder / f"ours-{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    overrides = [word for text in args.set for word in ("--set", text)]
    overrides += [word for text in args.both for word in ("--set", f"{section(args.trainer)}.{text}")]
    subprocess.run([sys.executable, "-m", "dpo_hpc", "train", args.trainer, "--config", str(path), *overrides],
                   check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    logged = read_scalars(run_dir / "tensorboard")
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    profiles = sorted((run_dir / "profile").glob("*.txt"))  # with --set dpo_training.profile_steps=[a, b]
    if profiles and args.profile_out:  # the scratch folder goes when this process ends
        profiles = [Path(shutil.copy(profiles[0], args.profile_out))]
    for weights in run_dir.glob("*.safetensors"):  # the trained model is not what is measured, and a GPU
        weights.unlink()                           # machine's disk holds few copies of a 1B model
    return {"side": "dpo-hpc", "profile": str(profiles[0]) if profiles else None,
            "losses": [v for _, v in logged["train/loss"]],
            "step_seconds": [v for _, v in logged["train/perf/step_seconds"]],
            "peak_rss_mb": manifest["peak_rss_mb"], "precompute_s": manifest.get("ref_precompute_seconds"),
            "peak_cuda_gib": manifest.get("peak_memory_gib") if "cuda" in manifest.get("device", "") else None,
            "resident_cuda_gib": manifest.get("resident_memory_gib"),
            "logged": {k: manifest[k] for k in ("median_tokens_per_sec", "median_mfu", "median_padding_fraction")
                       if k in manifest}}


def run_trl(folder: Path, model: Path, ordered: Path, args, tag: str, precompute: bool) -> dict:
    command = [args.trl_python, str(REPO / "bench" / "trl_side.py"), "--model", str(model), "--data", str(ordered),
               "--out", str(folder / f"trl-{tag}"), "--steps", str(args.steps), "--batch", str(args.batch),
               "--lr", str(args.lr), "--threads", str(args.threads), "--trainer", args.trainer] \
        + (["--precompute"] if precompute else []) \
        + (["--bf16"] if args.bf16 else []) \
        + (["--gradient-checkpointing"] if args.trl_gradient_checkpointing else []) \
        + [word for text in args.both for word in ("--option", text)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs: list[dict], warmup: int, work: dict) -> dict:
    """Median step time over repeats; pairs/s, real tokens/s and MFU from it (the same FLOPs count,
    perf.md section 3, for both sides: 6N + attention for the policy, 2N + attention for an online
    reference, real tokens only); peak memory; the first run's first 10 losses (two ``--sides ours``
    calls, with and without an option, show what the option changes)."""
    steps = [statistics.median(r["step_seconds"][warmup:]) for r in runs]
    step = statistics.median(steps)
    out = {"median_step_s": round(step, 4), "per_repeat_step_s": [round(s, 4) for s in steps],
           "pairs_per_s": round(work["pairs"] / step, 2), "real_tokens_per_s": round(work["tokens"] / step, 1),
           "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "first_losses": runs[0]["losses"][:10]}
    if work["peak_flops"]:
        out["mfu"] = round(work["flops"] / step / work["peak_flops"], 4)
    cuda = [r["peak_cuda_gib"] for r in runs if r.get("peak_cuda_gib") is not None]
    if cuda:
        out["peak_cuda_gib"] = max(cuda)
    resident = [r["resident_cuda_gib"] for r in runs if r.get("resident_cuda_gib") is not None]
    if cuda and resident:  # what a step's activations and temporaries add to the state kept between steps
        out["resident_cuda_gib"] = max(resident)
        out["peak_above_resident_gib"] = round(max(cuda) - max(resident), 2)
    if runs[0].get("precompute_s") is not None:
        out["precompute_s"] = runs[0]["precompute_s"]
    if runs[0].get("profile"):
        out["profile"] = runs[0]["profile"]
    if "logged" in runs[0]:
        out["logged_by_dpo_hpc"] = runs[0]["logged"]  # its own count, right even when an override changes the batches
    return out


def step_work(model: Path, data: Path, args) -> dict:
    """Mean pairs (KTO: completions), real tokens and FLOPs of a measured step (the batches after the
    warm-up); KTO's KL sequences (each prompt with the previous completion of its batch) run forward
    only, on the policy and an online reference."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from dpo_hpc.data.sampler import global_batch_indices
    from dpo_hpc.trainers.throughput import FlopsModel, peak_flops

    tokenizer = AutoTokenizer.from_pretrained(model)
    scored = algorithm(args.trainer).model == "reward_model"  # a score head, not the vocabulary's
    online_reference = algorithm(args.trainer).uses_reference and not args.precompute
    with torch.device("meta"):
        auto = AutoModelForSequenceClassification if scored else AutoModelForCausalLM
        flops = FlopsModel.of(auto.from_config(AutoConfig.from_pretrained(model)))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokens = total = 0.0
    measured = range(args.warmup, args.steps)
    for step in measured:
        lengths, kl_lengths = [], []
        batch = global_batch_indices(len(rows), step, args.batch, 1, 1, 0, args.seed)[0]
        for k, i in enumerate(batch):
            prompt = len(tokenizer(rows[i]["prompt"])["input_ids"])  # BOS included
            sides = ("completion",) if args.trainer == "kto" else ("chosen", "rejected")
            lengths += [prompt + len(rows[i][side].split()) + 1 for side in sides]  # + EOS
            if args.trainer == "kto":
                kl_lengths.append(prompt + len(rows[batch[k - 1]]["completion"].split()) + 1)
        lengths, kl_lengths = torch.tensor(lengths), torch.tensor(kl_lengths or [0])
        tokens += float(lengths.sum())
        total += flops.train(lengths) + (flops.forward(lengths) if online_reference else 0.0)
        if args.trainer == "kto":
            total += flops.forward(kl_lengths) * (1 if args.precompute else 2)
    n = len(measured)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {"pairs": args.batch, "tokens": tokens / n, "flops": total / n, "peak_flops": peak_flops(device)}


def assets(folder: Path, args) -> tuple[Path, Path]:
    """The model and pairs in ``folder``: built there unless an earlier call built the same ones."""
    key = {"shape": args.shape, "vocab": args.vocab, "pairs": args.pairs, "seed": args.seed,
           "prompt_words": list(args.prompt_words), "reply_words": list(args.reply_words)}
    stamp = folder / "assets.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        return folder / "model", folder / "pairs.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    built = build_assets(folder, args.vocab, args.pairs, args.seed, args.shape, tuple(args.prompt_words),
                         tuple(args.reply_words))
    stamp.write_text(json.dumps(key))  # last: a build cut short is built again
    return built


def setup(args, work: dict) -> dict:
    """What a result was measured on."""
    return {"trainer": args.trainer, "vocab": args.vocab,
            "shape": args.shape, "precision": "bf16" if args.bf16 else "fp32",
            "batch_pairs": args.batch, "steps": args.steps, "threads": args.threads, "dpo_hpc_overrides": args.set,
            "both_sides": args.both,
            "real_tokens_per_step": round(work["tokens"], 1), "precompute_ref_log_probs": args.precompute,
            "trl_gradient_checkpointing": args.trl_gradient_checkpointing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", help="python of a virtual environment with trl installed")
    parser.add_argument("--trainer", choices=list(FIRST_LOSS), default="dpo",
                        help="kto: TRL's KTOTrainer against ours, on each pair's sides as labelled completions; "
                             "reward: TRL's RewardTrainer against ours, from the model with a score head at 0")
    parser.add_argument("--margins", action="store_true",
                        help="reward: give each pair a margin (TRL's column), which both sides' losses read")
    parser.add_argument("--sides", choices=("both", "ours"), default="both",
                        help="ours: dpo-hpc alone (a micro-batch TRL is not run at, e.g. the largest that fits)")
    parser.add_argument("--assets", type=Path, help="folder of the model and pairs, built once and reused by "
                        "later calls with the same --shape, --vocab, --pairs, --seed and lengths")
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
    parser.add_argument("--shape", choices=list(SHAPES), default="small", help="model shape (llama-1b: perf.md section 7)")
    parser.add_argument("--bf16", action="store_true", help="bf16 on both sides (GPU); the loss gate then checks ln 2 only")
    parser.add_argument("--prompt-words", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--reply-words", type=int, nargs=2, default=[8, 96], metavar=("MIN", "MAX"))
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL with gradient checkpointing, its default (the comparison for an online reference)")
    parser.add_argument("--both", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of TRL's DPOConfig and dpo-hpc's dpo_training alike, e.g. ld_alpha=0.5")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dpo-hpc config override for an ablation, e.g. dpo_training.group_by_length=true")
    parser.add_argument("--profile-out", type=Path, metavar="FILE",
                        help="with --set dpo_training.profile_steps=[a, b]: keep dpo-hpc's profile table here (the "
                             "run's scratch folder is removed at exit)")
    args = parser.parse_args()
    if args.sides == "both" and not args.trl_python:
        parser.error("--trl-python is needed unless --sides ours")

    folder = Path(tempfile.mkdtemp(prefix="dpo_hpc_vs_trl_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # this run's alone, however it ends
    model, data = assets(args.assets or folder, args)
    if args.trainer == "kto":
        data = unpaired(data, folder / "completions.jsonl")
    if args.trainer == "reward":
        if args.precompute:
            parser.error("--precompute: a reward model reads no reference")
        model = reward_model(model, folder / "reward_model")  # this call's: --assets may have been rebuilt
        if args.margins:
            data = with_margins(data, folder / "pairs_with_margins.jsonl", args.seed)
    elif args.margins:
        parser.error("--margins: only a reward model reads them (--trainer reward)")
    work = step_work(model, data, args)
    if args.sides == "ours":
        ours = [run_ours(folder, model, data, args, str(repeat), args.precompute) for repeat in range(args.repeats)]
        print(json.dumps({**setup(args, work), "dpo_hpc": summary(ours, args.warmup, work)}))
        return
    ordered = trl_order(data, folder / "pairs_in_order.jsonl", args.steps, args.batch, args.seed)
    ours, theirs = [], []
    for repeat in range(args.repeats):  # alternate, each side in a fresh process
        ours.append(run_ours(folder, model, data, args, str(repeat), args.precompute))
        theirs.append(run_trl(folder, model, ordered, args, str(repeat), args.precompute))
        print(json.dumps({"repeat": repeat, "ours": summary(ours[-1:], args.warmup, work),
                          "trl": summary(theirs[-1:], args.warmup, work)}), flush=True)
    gap = max(abs(a - b) for a, b in zip(ours[0]["losses"][:10], theirs[0]["losses"][:10]))
    # an option on both sides (WPO's weights, another loss, a reward model's margins) may move the first
    # loss off ln 2: then the two sides are checked against each other only
    first_loss = FIRST_LOSS[args.trainer]
    first_ok = bool(args.both) or args.margins or all(
        abs(run[0]["losses"][0] - first_loss) < (1e-3 if args.bf16 else 1e-4) for run in (ours, theirs))
    gate = first_ok and (args.bf16 or gap < 1e-5)  # bf16 rounding makes a 1e-5 loss parity meaningless
    mine, trl = summary(ours, args.warmup, work), summary(theirs, args.warmup, work)
    result = {
        **setup(args, work), "versions": theirs[0]["versions"],
        "gate": {"passed": gate, "applies": not args.set, "first_loss": [ours[0]["losses"][0], theirs[0]["losses"][0]],
                 "max_loss_gap_first_10": gap},
        "dpo_hpc": mine, "trl": trl,
        # An override that changes the batches (group_by_length) voids the loss comparison, not the timing.
        "step_time_ratio": round(mine["median_step_s"] / trl["median_step_s"], 3) if gate or args.set else None,
        "peak_rss_ratio": round(mine["peak_rss_mb"] / trl["peak_rss_mb"], 3) if gate or args.set else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
