"""How long a run spends reading and tokenizing its data before the first step (every start and
every requeue pays it), batched on every core against one row at a time.

    python bench/data_loading.py [--pairs 50000] [--repeats 2] [--out bench/results_data_loading.json]

Builds once under ``--assets``: HH-format pairs of random words (prompt 20-150 words, replies
20-150) and a byte-level BPE of 32k tokens trained on them, so a token is a few characters as
with a real tokenizer. Then for each kind (preference, SFT) and each way, in a fresh process:

- ``batched``: what runs use (blocks of 1,024 rows, one tokenizer call each, the tokenizer's
  threads on);
- ``one_by_one``: blocks of one row and the threads off, the way rows were read before;
- ``cached``: the splits read from ``dataset.cache_dir``, where an earlier run left them (what
  every later start, requeue and run of a sweep on the same data does).

Every way must give the same examples (checked by a hash); the last line is a JSON object with
the median seconds per way and their ratios to one row at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = {"batched": {}, "one_by_one": {"BLOCK_ROWS": 1, "TOKENIZERS_PARALLELISM": "false"}, "cached": {"CACHE": 1}}


def build_assets(folder: Path, pairs: int, seed: int = 0) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    data, tokenizer_dir = folder / "pairs.jsonl", folder / "tokenizer"
    if data.exists() and tokenizer_dir.exists():
        return data, tokenizer_dir
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(20, 150))) + "."

    rows = []
    for _ in range(pairs):
        prompt = f"\n\nHuman: {sentence()}\n\nAssistant:"
        rows.append({"chosen": f"{prompt} {sentence()}", "rejected": f"{prompt} {sentence()}"})
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator((r["chosen"] for r in rows[:5000]), trainers.BpeTrainer(
        vocab_size=32000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>").save_pretrained(tokenizer_dir)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, tokenizer_dir


def measure(data: Path, tokenizer_dir: Path, kind: str) -> None:
    """In this process: load the splits as a run does; print seconds, examples kept and a hash."""
    import hashlib
    import time

    from transformers import AutoTokenizer

    from dpo_hpc.config import DatasetConfig
    from dpo_hpc.data import pipeline

    pipeline.BLOCK_ROWS = int(os.environ.get("BLOCK_ROWS", pipeline.BLOCK_ROWS))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cache = str(data.parent / "cache") if os.environ.get("CACHE") else None
    cfg = DatasetConfig(dataset_name=str(data), max_length=1024, max_prompt_length=512, val_ratio=0.01,
                        cache_dir=cache)
    started = time.perf_counter()
    train, val, _ = pipeline.load_splits(cfg, tokenizer, kind)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256(repr(list(train) + list(val)).encode()).hexdigest()[:16]
    print(json.dumps({"seconds": round(seconds, 2), "examples": len(train) + len(val), "hash": digest}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--assets", type=Path, default=Path(tempfile.gettempdir()) / "dpo_hpc_data_loading")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", nargs=3, metavar=("DATA", "TOKENIZER", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(Path(args.measure[0]), Path(args.measure[1]), args.measure[2])
    data, tokenizer_dir = build_assets(args.assets / str(args.pairs), args.pairs)
    result = {"pairs": args.pairs, "cpus": len(os.sched_getaffinity(0))}
    shutil.rmtree(data.parent / "cache", ignore_errors=True)

    def measured(kind: str, way: str) -> dict:  # in a fresh process
        environment = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}  # as in a job
        environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **{k: str(v) for k, v in WAYS[way].items()})
        out = subprocess.run([sys.executable, __file__, "--measure", str(data), str(tokenizer_dir), kind],
                             env=environment, cwd=REPO, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    for kind in ("preference", "sft"):
        runs: dict[str, list[dict]] = {way: [] for way in WAYS}
        result[kind] = {"cache_filled_s": measured(kind, "cached")["seconds"]}  # the first run tokenizes
        for _ in range(args.repeats):
            for way in WAYS:  # alternating
                runs[way].append(measured(kind, way))
                print(f"[data_loading] {kind} {way}: {runs[way][-1]['seconds']} s", file=sys.stderr)
        hashes = {r["hash"] for way in WAYS for r in runs[way]}
        assert len(hashes) == 1, f"{kind}: the ways gave different examples: {runs}"
        seconds = {way: round(statistics.median(r["seconds"] for r in runs[way]), 2) for way in WAYS}
        result[kind].update({f"{way}_s": s for way, s in seconds.items()}, examples=runs["batched"][0]["examples"],
                            ratio=round(seconds["batched"] / seconds["one_by_one"], 3),
                            cached_ratio=round(seconds["cached"] / seconds["one_by_one"], 3))
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
