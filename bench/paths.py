"""What each data, loss, adapter and tracking path costs, on the tiny model (CPU or GPU).

    python bench/paths.py [--steps 40] [--repeats 2] [--out bench/results_paths.json]

Makes the tiny model and the reversal data (HH text and the same rows in TRL's conversational
form) under a scratch folder, then trains DPO once per variant, each in a fresh process and in
alternating rounds (``--repeats``), one option changed from the plain run at a time: median
step time and real tokens/s from the run manifest (the steps after the first), and peak RSS. The
final JSON line has every variant's medians and its ratio to the plain run.
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
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, dict] = {
    "plain (HH text rows, sigmoid, full fine-tune, TensorBoard)": {},
    "conversational rows (chat template)": {"dataset": {"format": "conversational"}},
    "loss_type = ipo": {"dpo_training": {"loss_type": "ipo"}},
    "loss_type = robust, label_smoothing = 0.1": {"dpo_training": {"loss_type": "robust", "label_smoothing": 0.1}},
    "rpo_alpha = 0.2": {"dpo_training": {"rpo_alpha": 0.2}},
    "lora r = 16 (reference: adapters off)": {"lora": {"r": 16, "alpha": 32}},
    "report_to = tensorboard + wandb (offline)": {"dpo_training": {"report_to": ["tensorboard", "wandb"]}},
    "torch_dtype = bfloat16 (pure bf16)": {"torch_dtype": "bfloat16"},
}


def merged(base: dict, change: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, values in change.items():
        if isinstance(values, dict):
            out.setdefault(section, {}).update(values)
        else:
            out[section] = values
    return out


def run(config: dict, scratch: Path, name: str) -> dict:
    path = scratch / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-m", "dpo_hpc", "train", "dpo", "--config", str(path)], check=True, env=env,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    manifest = json.loads((Path(config["dpo_training"]["save_dir"]) / "run_manifest.json").read_text())
    return {"step_s": manifest["median_step_seconds"], "tokens_per_s": manifest["median_tokens_per_sec"],
            "peak_rss_mb": manifest["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from dpo_hpc.data.verifiable import write_dataset
    from dpo_hpc.tiny_model import make_tiny_model

    scratch = Path(tempfile.mkdtemp(prefix="dpo_hpc_paths_"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # this run's alone, however it ends
    text = write_dataset(scratch / "text", n_train=2000, n_test=1)["train"]
    chat = write_dataset(scratch / "chat", n_train=2000, n_test=1, data_format="conversational")["train"]
    base = make_tiny_model(scratch / "base")
    plain = {"policy_name": str(base), "precision": "fp32",
             "dataset": {"dataset_name": str(text), "val_ratio": 0.0, "max_length": 160, "max_prompt_length": 128},
             "dpo_training": {"learning_rate": 1e-4, "batch_size": 32, "max_steps": args.steps, "logging_steps": 1000}}
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for k, (name, change) in enumerate(VARIANTS.items()):
            config = merged(plain, change)
            if config["dataset"].get("format") == "conversational":
                config["dataset"]["dataset_name"] = str(chat)
            config["dpo_training"]["save_dir"] = str(scratch / f"run-{k}-{repeat}")
            runs[name].append(run(config, scratch, f"v{k}-{repeat}"))
            print(json.dumps({"repeat": repeat, "variant": name, **runs[name][-1]}), flush=True)
    summary = {}
    for name, results in runs.items():
        summary[name] = {key: round(statistics.median(r[key] for r in results), 4)
                         for key in ("step_s", "tokens_per_s", "peak_rss_mb")}
    reference = summary[next(iter(VARIANTS))]
    for values in summary.values():
        values["step_ratio"] = round(values["step_s"] / reference["step_s"], 3)
        values["rss_ratio"] = round(values["peak_rss_mb"] / reference["peak_rss_mb"], 3)
    result = {"device": "cuda" if __import__("torch").cuda.is_available() else "cpu", "threads": os.cpu_count(),
              "steps": args.steps, "repeats": args.repeats, "batch_pairs": 32, "variants": summary}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
