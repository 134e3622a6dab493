"""Ground-truth quality benchmark: DPO, Beta-DPO and Dynamic-Beta DPO from the same SFT model on
the verifiable reversal task, at several label-noise levels and seeds.

    python bench/quality.py --out runs/quality            # 3 seeds x {0, 0.2, 0.4} noise x 3 methods
    python bench/quality.py --out runs/quality --report   # the table again, from the results on disk

Every run goes through the real CLIs (``dpo-hpc make-data``, ``make-tiny-model``, ``train``,
``evaluate``), so the benchmark measures what users run. One SFT model (trained on the clean
chosen answers and stopped early with ``--sft-steps``, so preference training has room to help or
to hurt) is the start and the reference of every preference run: the comparison between methods
is paired. A seed sets a preference run's train/val split, data order and initialisation
randomness; the noise levels share prompts and answers and differ only in which pairs are flipped.

Held-out prompts are split in two: ``dev`` (for choosing settings: only the SFT length was chosen
on it, with ``--sft-only --split dev``; the preference settings below were fixed in advance) and
``test`` (reported, never used for choices). Reported per run: exact
accuracy of greedy answers on ``test``, the win rate against the SFT model, and the change of the
correct answer's log-prob against the SFT model (negative: preference training made the right
answer less likely, the failure the verifiable-task probe saw).

Re-running skips finished training runs (the trainer does) and finished evaluations (cached).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

METHODS = ("dpo", "beta_dpo", "dynamic_beta_dpo")

SFT = {
    "precision": "fp32",
    "dataset": {"subset": "train", "val_ratio": 0.02, "seed": 42, "max_length": 64, "max_prompt_length": 48},
    "sft_training": {"learning_rate": 2e-3, "batch_size": 64, "epochs": 100, "warmup_steps": 10,
                     "lr_scheduler": "constant", "logging_steps": 50, "eval_steps": 100000, "save_steps": 200},
    "deepspeed": {"zero_stage": 0},
}

DPO_TRAINING = {"learning_rate": 1e-5, "batch_size": 64, "epochs": 100, "warmup_steps": 3,
                "lr_scheduler": "constant", "logging_steps": 10, "eval_steps": 100000, "save_steps": 100000}

DPO = {"dpo_training": {"beta": 0.1}}
BETA_DPO = {"beta_dpo": {"beta_0": 0.1, "m": 0.9, "rho": 0.8, "alpha": 0.6, "min_beta": 0.001}}
# The original framework's defaults, except the warmup and step size: its beta_warmup of 120 updates
# would outlast the whole run, and alpha 0.005 could move beta by at most exp(0.005 * steps).
DYNAMIC_BETA_DPO = {"risk_test": {"delta": 0.1, "lambda": 0.1, "beta_warmup": 5},
                    "beta_update": {"beta_0": 0.1, "alpha": 0.05, "gamma": 2.0, "beta_min": 0.0, "beta_max": 2.0}}
METHOD_SECTIONS = {"dpo": DPO, "beta_dpo": BETA_DPO, "dynamic_beta_dpo": DYNAMIC_BETA_DPO}


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", flush=True)


LOGS: Optional[Path] = None


def run(args: list[str], name: str) -> None:
    """One dpo-hpc CLI call; its output goes to <out>/logs/<name>.log (the tail is shown on failure)."""
    command = [sys.executable, "-m", "dpo_hpc", *args]
    log_path = LOGS / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file:
        result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{log_path.read_text()[-4000:]}")


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def noise_name(noise: float) -> str:
    return f"noise{round(noise * 100):02d}"


def prepare_data(out: Path, noises: list[float], n_train: int, n_dev: int, n_test: int) -> None:
    """One dataset per noise level; same seed, so the same words and answers, only the flips differ."""
    for noise in noises:
        folder = out / "data" / noise_name(noise)
        if (folder / "test.jsonl").exists() and (folder / "dev.jsonl").exists():
            continue
        run(["make-data", str(folder), "--n-train", str(n_train), "--n-test", str(n_dev + n_test), "--seed", "0",
             "--label-noise", str(noise), "--multi-turn-ratio", "0"], "make-data")
        held_out = (folder / "test.jsonl").read_text().splitlines()
        (folder / "dev.jsonl").write_text("\n".join(held_out[:n_dev]) + "\n")
        (folder / "test.jsonl").write_text("\n".join(held_out[n_dev:]) + "\n")


def sft_run(out: Path, seed: int, steps: int) -> Path:
    base, save_dir = out / "base", out / f"sft_{steps}"
    if not (base / "config.json").exists():
        run(["make-tiny-model", str(base), "--seed", str(seed)], "make-tiny-model")
    config = json.loads(json.dumps(SFT))
    config["policy_name"] = str(base)
    config["dataset"]["dataset_name"] = str(out / "data" / noise_name(0.0) / "train.jsonl")
    config["sft_training"].update(max_steps=steps, save_dir=str(save_dir), seed=seed)
    config_path = write_config(out / "configs" / f"sft_{steps}.json", config)
    run(["train", "sft", "--config", str(config_path)], config_path.stem)
    return save_dir


def dpo_run(out: Path, seed: int, noise: float, method: str, sft_dir: Path, steps: int) -> Path:
    save_dir = out / f"from_{sft_dir.name}" / f"seed{seed}" / noise_name(noise) / method
    config = {"policy_name": str(sft_dir), "ref_name": str(sft_dir), "precision": "fp32",
              "dataset": dict(SFT["dataset"], dataset_name=str(out / "data" / noise_name(noise) / "train.jsonl"),
                              seed=42 + seed),
              "dpo_training": dict(DPO_TRAINING, max_steps=steps, save_dir=str(save_dir), seed=seed),
              "deepspeed": {"zero_stage": 1}}
    for section, values in METHOD_SECTIONS[method].items():
        config[section] = dict(config.get(section, {}), **values)
    config_path = write_config(out / "configs" / f"{sft_dir.name}_seed{seed}_{noise_name(noise)}_{method}.json", config)
    run(["train", method.replace("_", "-"), "--config", str(config_path)], config_path.stem)
    return save_dir


def evaluate(out: Path, model: Path, baseline: Optional[Path], split: str) -> dict:
    cache = model / f"quality_eval_{split}.json"
    if not cache.exists():
        run(["evaluate", str(model), "--data", str(out / "data" / noise_name(0.0) / f"{split}.jsonl"),
             *(["--baseline", str(baseline)] if baseline else []), "--out", str(cache)], f"evaluate_{split}")
    return json.loads(cache.read_text())


def apply_override(text: str) -> None:
    """``section.key=JSON`` into the DPO settings (unknown keys are caught by the trainer's strict schema)."""
    key, value = text.split("=", 1)
    section, name = key.split(".", 1)
    if section == "dpo_training":
        DPO_TRAINING[name] = json.loads(value)
        return
    targets = [sections[section] for sections in METHOD_SECTIONS.values() if section in sections]
    if not targets:
        raise SystemExit(f"--set {text}: no method has a '{section}' section")
    for target in targets:
        target[name] = json.loads(value)


def final_train_metrics(run_dir: Path) -> dict:
    """Train time, the final validation metrics, and the beta of the last logged step."""
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    last = json.loads((run_dir / "progress.json").read_text())["train"]
    beta = last.get("dpo/beta", last.get("beta_dpo/beta_used"))
    return {"train_seconds": manifest.get("train_seconds"), "val": manifest.get("final_eval", {}), "final_beta": beta}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(rows: list[dict], split: str) -> str:
    """Markdown table: mean ± sample std over seeds of test accuracy, win rate and answer log-prob change."""
    noises = sorted({r["noise"] for r in rows if r["method"] != "sft"})
    sft = next(r for r in rows if r["method"] == "sft")
    seeds = sorted({r["seed"] for r in rows if r["method"] != "sft"})
    lines = [f"| method | label noise | {split} accuracy | Δ accuracy vs SFT | win rate vs SFT | "
             "Δ log p(correct answer) vs SFT | Δ log p chosen / rejected (val pairs) |",
             "|---|---|---|---|---|---|---|",
             f"| SFT (start and reference) | – | {sft['accuracy']:.3f} | – | – | – | – |"]
    for method in METHODS:
        for noise in noises:
            group = [r for r in rows if r["method"] == method and r["noise"] == noise]
            if not group:
                continue
            chosen = statistics.mean(r["val"]["logps/chosen_change"] for r in group)
            rejected = statistics.mean(r["val"]["logps/rejected_change"] for r in group)
            lines.append(f"| {method} | {noise:.0%} | {mean_std([r['accuracy'] for r in group])} | "
                         f"{mean_std([r['accuracy'] - sft['accuracy'] for r in group])} | "
                         f"{mean_std([r['win_rate_vs_sft'] for r in group])} | "
                         f"{mean_std([r['answer_logp_change'] for r in group])} | {chosen:+.2f} / {rejected:+.2f} |")
    return ("\n".join(lines) + f"\n\nSeeds {seeds}: mean ± sample standard deviation over seeds; "
            f"{sft['prompts']} held-out prompts ({split}).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sft-seed", type=int, default=0, help="seed of the base model and the SFT run")
    parser.add_argument("--sft-steps", type=int, default=650)
    parser.add_argument("--sft-only", action="store_true", help="train and score the SFT model only")
    parser.add_argument("--dpo-steps", type=int, default=40)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-dev", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--split", choices=("dev", "test"), default="test", help="held-out prompts to score")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                        help="override a DPO setting for every method, e.g. dpo_training.learning_rate=2e-5")
    parser.add_argument("--report", action="store_true", help="only print the table from results on disk")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.out)
    global LOGS
    LOGS = out / "logs"
    results_path = out / f"results_{args.split}.json"
    if args.report:
        print(report(json.loads(results_path.read_text())["runs"], args.split))
        return
    for override in args.set:
        apply_override(override)

    started = time.perf_counter()
    prepare_data(out, [0.0, *args.noise], args.n_train, args.n_dev, args.n_test)
    log(f"SFT ({args.sft_steps} steps)")
    sft_dir = sft_run(out, args.sft_seed, args.sft_steps)
    sft_eval = evaluate(out, sft_dir, None, args.split)
    rows = [{"seed": args.sft_seed, "noise": 0.0, "method": "sft", "accuracy": sft_eval["accuracy"],
             "prompts": sft_eval["prompts"], "answer_logp": sft_eval.get("answer_logp"), **final_train_metrics(sft_dir)}]
    log(f"SFT {args.split} accuracy {sft_eval['accuracy']:.3f}")
    if args.sft_only:
        return
    for seed in args.seeds:
        for noise in args.noise:
            for method in args.methods:
                run_dir = dpo_run(out, seed, noise, method, sft_dir, args.dpo_steps)
                result = evaluate(out, run_dir, sft_dir, args.split)
                rows.append({"seed": seed, "noise": noise, "method": method, "accuracy": result["accuracy"],
                             "win_rate_vs_sft": result["win_rate_vs_baseline"],
                             "answer_logp_change": result["answer_logp_change_vs_baseline"],
                             **final_train_metrics(run_dir)})
                log(f"seed {seed} noise {noise:.0%} {method}: accuracy {result['accuracy']:.3f} "
                    f"(SFT {result['baseline_accuracy']:.3f}), log p(correct) change "
                    f"{result['answer_logp_change_vs_baseline']:+.3f}")
    wall = time.perf_counter() - started
    settings = {"sft": SFT, "sft_steps": args.sft_steps, "dpo_training": DPO_TRAINING, "dpo_steps": args.dpo_steps,
                "methods": {m: METHOD_SECTIONS[m] for m in args.methods}}
    results_path.write_text(json.dumps({"split": args.split, "wall_seconds": round(wall, 1), "settings": settings,
                                        "runs": rows}, indent=2) + "\n")
    table = report(rows, args.split)
    (out / f"results_{args.split}.md").write_text(table)
    print(table)
    log(f"done in {wall / 60:.1f} min; results in {results_path}")


if __name__ == "__main__":
    main()
