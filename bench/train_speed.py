"""Wall time, throughput and peak memory of the tiny SFT and DPO runs (CPU or GPU).

    python bench/train_speed.py [--steps 40] [--out bench/results.json]

Builds the tiny model and data under a scratch folder, runs `dpo-hpc train sft` then
`dpo-hpc train dpo` (from the SFT result) in fresh processes, and reports per trainer:
median step time and tokens/s over the steps after the first 5 (warm-up excluded), wall time
of the whole command (imports and data included), and peak RSS from the run manifest.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dpo_hpc.config import ALGORITHMS

REPO = Path(__file__).resolve().parents[1]


def scalars(logdir: Path, tag: str) -> list[float]:
    from dpo_hpc.trainers.trackers import read_scalars

    return [value for _, value in read_scalars(logdir)[tag]]


def run(trainer: str, config: dict, scratch: Path) -> dict:
    path = scratch / f"{trainer}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpo_hpc", "train", trainer, "--config", str(path)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    section = ALGORITHMS[trainer].training_section
    run_dir = Path(config[section]["save_dir"])
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    tokens = scalars(run_dir / "tensorboard", "train/tokens_per_sec")[5:]
    batch = config[section]["batch_size"] * config[section].get("gradient_accumulation_steps", 1)
    return {
        "steps": config[section]["max_steps"],
        "global_batch": batch,
        "median_tokens_per_sec": round(statistics.median(tokens)),
        "command_wall_s": round(wall, 1),
        "train_s": manifest["train_seconds"],
        "peak_rss_mb": manifest["peak_rss_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from dpo_hpc.data.verifiable import write_dataset
    from dpo_hpc.tiny_model import make_tiny_model

    scratch = Path(tempfile.mkdtemp(prefix="dpo_hpc_bench_"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # this run's alone, however it ends
    data = write_dataset(scratch / "data", n_train=4000, n_test=10)["train"]
    base = make_tiny_model(scratch / "base")
    dataset = {"dataset_name": str(data), "val_ratio": 0.0, "max_length": 128, "max_prompt_length": 96}
    results = {"device": "cuda" if __import__("torch").cuda.is_available() else "cpu", "threads": os.cpu_count()}
    results["sft"] = run("sft", {"policy_name": str(base), "dataset": dataset, "sft_training": {
        "learning_rate": 2e-3, "batch_size": 64, "max_steps": args.steps, "save_dir": str(scratch / "sft")}}, scratch)
    results["dpo"] = run("dpo", {"policy_name": str(scratch / "sft"), "dataset": dataset, "dpo_training": {
        "learning_rate": 2e-5, "batch_size": 32, "gradient_accumulation_steps": 2, "max_steps": args.steps,
        "save_dir": str(scratch / "dpo")}}, scratch)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
