"""What resuming on another world size costs: rank 0 converts a ZeRO checkpoint written by 2 ranks
into DeepSpeed's universal format once, before the run goes on (``dpo_hpc.checkpoint.reshard``).

    python bench/reshard.py [--hidden 1024] [--layers 8] [--zero 2] [--out bench/results_reshard.json]

Trains a random-init Llama of the given shape (SFT, fp32, 2 steps) on 2 CPU ranks under torchrun,
keeping the checkpoint of step 1; then, in this process, times the conversion of that checkpoint
as the resuming run does it, and finally resumes the run on 1 rank (the trainer converts again,
loads, and trains step 2), timing that start. The last line is a JSON object: parameters,
checkpoint and universal sizes, the conversion's seconds and the 1-rank resume's wall seconds
(``--out`` keeps one such object per ZeRO stage).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--out", default=str(REPO / "bench/results_reshard.json"))
    args = parser.parse_args()

    from dpo_hpc.checkpoint import layout
    from dpo_hpc.checkpoint.reshard import convert
    from dpo_hpc.data.verifiable import write_dataset
    from dpo_hpc.tiny_model import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="dpo-hpc-reshard-"))
    try:
        model = make_tiny_model(work / "model", hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=max(1, args.hidden // 64), intermediate_size=args.hidden * 11 // 4)
        write_dataset(work / "data", n_train=64, n_test=8, seed=0, label_noise=0.0)
        run = work / "run"
        config = {"policy_name": str(model), "precision": "fp32",
                  "dataset": {"dataset_name": str(work / "data/train.jsonl"), "val_ratio": 0.0, "max_length": 64},
                  "deepspeed": {"zero_stage": args.zero},
                  "sft_training": {"learning_rate": 1e-4, "batch_size": 2, "global_batch_size": 4, "max_steps": 2,
                                   "save_steps": 1, "checkpoints_at_end": "all", "save_dir": str(run)}}
        path = work / "sft.yaml"
        path.write_text(yaml.safe_dump(config))
        print(f"[reshard] training 2 steps on 2 ranks (hidden {args.hidden}, {args.layers} layers, ZeRO-{args.zero})",
              flush=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "dpo_hpc", "train", "sft", "--config", str(path)],
                       cwd=REPO, env=child_env(), check=True, capture_output=True)
        checkpoint = run / "checkpoints" / layout.step_dir_name(1)
        params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"])
                     .load_file(run / "model.safetensors").values())

        universal = work / "universal" / layout.ENGINE_TAG
        started = time.perf_counter()
        convert(checkpoint / layout.ENGINE_TAG, universal)
        convert_s = time.perf_counter() - started

        # The run as if stopped after step 1 (the end saves no checkpoint), resumed on 1 rank.
        for name in ("run_manifest.json", "model.safetensors"):
            (run / name).unlink()
        started = time.perf_counter()
        resumed = subprocess.run([sys.executable, "-m", "dpo_hpc", "train", "sft", "--config", str(path)], cwd=REPO,
                                 env=child_env(), capture_output=True, text=True)
        resume_s = time.perf_counter() - started
        if resumed.returncode != 0 or "converting its ZeRO state" not in resumed.stdout:
            print(resumed.stdout[-2000:] + resumed.stderr[-3000:], file=sys.stderr)
            return 1
        said = next(line for line in resumed.stdout.splitlines() if "converted in" in line)
        result = {"parameters": params, "zero_stage": args.zero, "from_ranks": 2, "to_ranks": 1,
                  "checkpoint_engine_mb": round(folder_bytes(checkpoint / layout.ENGINE_TAG) / 2**20, 1),
                  "universal_mb": round(folder_bytes(universal) / 2**20, 1), "convert_s": round(convert_s, 2),
                  "resume_on_1_rank_wall_s": round(resume_s, 1), "trainer_said": said.strip()}
        out = Path(args.out)
        kept = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**kept, f"zero_{args.zero}": result}, indent=1, sort_keys=True) + "\n")
        print(json.dumps(result))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
