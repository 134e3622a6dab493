"""Host memory of each rank while a ZeRO-3 run loads its model: whole on every rank (as before),
or built straight into each rank's slice (``engine.partitioned_loading``, what runs do now).

    python bench/zero3_loading.py [--hidden 1536] [--layers 16] [--ranks 4] [--out bench/results_zero3_loading.json]

Writes a random-init Llama of the given shape (fp32 safetensors). Then for each way, in fresh
processes started as srun starts ranks (rank in the environment, gloo), each rank loads the
model as the trainer loads its policy (``load_causal_lm``: fp32 master weights from the bf16
file, ZeRO-3 config) and reports the weights it keeps and how much its private memory (RssAnon:
not the file's pages, which the kernel may drop) grew, after handing freed memory back to the
system (malloc_trim: on a CPU the slices' transients stay in glibc's heap, for later use, rather
than being held). Loading only: under training, DeepSpeed's
buffers on a CPU (on a GPU they are device memory) would hide what the loading costs. The last
line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANK_MAIN = """
import sys
from dpo_hpc.runtime import init_distributed
from dpo_hpc.config.schema import DeepSpeedConfig, TrainingConfig
from dpo_hpc.trainers.engine import deepspeed_config, load_causal_lm


def anonymous_mb():  # private memory: weights converted on load; not the file's pages, which the kernel may drop
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssAnon"].split()[0]) / 1024


dist = init_distributed()
ds = deepspeed_config(TrainingConfig(learning_rate=1e-4, batch_size=1, save_dir="unused"),
                      DeepSpeedConfig(zero_stage=3), "fp32", dist.world_size)
before = anonymous_mb()
model = load_causal_lm(sys.argv[1], "fp32", trainable=True, partition_with=ds if sys.argv[2] == "partitioned" else None)
kept = [getattr(p, "ds_tensor", p) for p in model.parameters()]  # ZeRO-3: this rank's slice
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what is held, not what the allocator keeps of freed transients
print("LOADED", anonymous_mb() - before, sum(t.numel() * t.element_size() for t in kept) / 2**20, flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_on_ranks(model: Path, way: str, ranks: int) -> list[tuple[float, float]]:
    """(private memory growth MB, MB of weights it keeps) per rank."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_MAIN, str(model), way], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
                                   "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"})
             for r in range(ranks)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(outs[0][-4000:])
    found = [next(line for line in out.splitlines() if line.startswith("LOADED")).split()[1:] for out in outs]
    return [(float(grew), float(held)) for grew, held in found]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "bench/results_zero3_loading.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="dpo-hpc-zero3-") as work:
        result = measure(Path(work), args)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


def measure(work: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_hpc.tiny_model import make_tiny_model

    model = make_tiny_model(work / "model", hidden_size=args.hidden, num_layers=args.layers,
                            num_heads=max(1, args.hidden // 64), intermediate_size=args.hidden * 11 // 4)
    # stored in bf16 as released models are: the trained policy loads in fp32 (DeepSpeed's master weights)
    AutoModelForCausalLM.from_pretrained(model).to(torch.bfloat16).save_pretrained(model)
    size_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
    result = {"model_bf16_file_mb": round(size_mb, 1), "ranks": args.ranks}
    for way in ("whole", "partitioned"):
        per_rank = load_on_ranks(model, way, args.ranks)
        result[way] = {"private_memory_growth_mb_per_rank": [round(g, 1) for g, _ in per_rank],
                       "weights_kept_mb_per_rank": [round(h, 1) for _, h in per_rank]}
        print(f"[zero3_loading] {way}: {result[way]}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
