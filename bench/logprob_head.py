"""Memory and time of the log-prob head: full-vocabulary logits vs the chunked head at loss
positions only (dpo_hpc.algorithms.logprobs.target_logps), its elementwise work eager or
compiled (as ``torch_compile`` runs it), forward + backward, on this machine.

    python bench/logprob_head.py [--vocab 32000 128256] [--dtype float32 bfloat16] [--rows 16]
                                 [--seq 256] [--hidden 1024]

Each (vocab, dtype, path) runs in a fresh process; after one untimed pass (which compiles) it
reports the peak RSS above the inputs (weights, hidden states and their gradients) and the
median time of 3 passes. Half of every row is prompt, half completion (the loss positions), as
in a DPO batch of 8 pairs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


PATHS = ("full", "chunked", "chunked_compiled")


def one(path: str, vocab: int, dtype_name: str, rows: int, seq: int, hidden_size: int, threads: int) -> dict:
    import torch

    from dpo_hpc.algorithms.logprobs import EAGER, compiled_chunk_math, sequence_logps, target_logps

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    math = compiled_chunk_math() if path == "chunked_compiled" else EAGER
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, seq, hidden_size, generator=g).mul_(0.02).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=g).mul_(0.02).to(dtype).requires_grad_()
    input_ids = torch.randint(0, vocab, (rows, seq), generator=g)
    loss_mask = torch.zeros(rows, seq, dtype=torch.long)
    loss_mask[:, seq // 2:] = 1

    def forward_backward():
        if path == "full":
            logps = sequence_logps(hidden @ weight.T, input_ids, loss_mask)
        else:
            rows_of, positions = loss_mask[:, 1:].nonzero(as_tuple=True)  # hidden states that predict loss
            token = target_logps(hidden[rows_of, positions], weight, input_ids[rows_of, positions + 1], math=math)
            logps = torch.zeros(rows).index_add(0, rows_of, token)
        logps.sum().backward()

    (hidden.sum() + weight.sum()).backward()  # allocate the gradients before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    forward_backward()  # compiles, where compiled
    times = []
    for _ in range(3):
        start = time.perf_counter()
        forward_backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": path, "vocab": vocab, "dtype": dtype_name, "median_s": round(statistics.median(times), 3),
            "peak_above_inputs_mb": round((peak - base) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("PATH", "VOCAB", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, vocab, dtype = args.one
        print(json.dumps(one(path, int(vocab), dtype, args.rows, args.seq, args.hidden, args.threads)))
        return
    results = []
    for vocab in args.vocab:
        for dtype in args.dtype:
            for path in PATHS:
                out = subprocess.run([sys.executable, __file__, "--one", path, str(vocab), dtype, "--rows", str(args.rows),
                                      "--seq", str(args.seq), "--hidden", str(args.hidden), "--threads",
                                      str(args.threads)], capture_output=True, text=True, check=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"rows": args.rows, "seq": args.seq, "hidden": args.hidden, "threads": args.threads,
                      "results": results}))


if __name__ == "__main__":
    main()
