"""The table that ends bench/gpu_session.sh: one row per benchmark in its results.jsonl.

    python bench/gpu_summary.py results.jsonl

speedup is TRL's step time over ours at the same micro-batch (above 1: we are faster); memory
is peak CUDA memory and, after the slash, the peak above what stays between steps (weights,
gradients, optimizer state), i.e. what activations and temporaries cost.
"""

from __future__ import annotations

import json
import sys


def memory(side: dict) -> str:
    if "peak_cuda_gib" not in side:
        return "-"
    return f"{side['peak_cuda_gib']:.1f}/{side.get('peak_above_resident_gib', float('nan')):.1f}"


def mfu(side: dict) -> str:
    """dpo-hpc's own count where it logged one (right when an option changes the batches, as length
    grouping does), else the benchmark's count from the batches both sides train on."""
    value = side.get("logged_by_dpo_hpc", {}).get("median_mfu", side.get("mfu"))
    return "-" if value is None else f"{value:.1%}"


def row(step: str, result: dict) -> list[str]:
    ours, trl = result["dpo_hpc"], result.get("trl", {})
    return [step, str(result["batch_pairs"]), "yes" if result["precompute_ref_log_probs"] else "no",
            " ".join(o.split(".", 1)[-1] for o in result["dpo_hpc_overrides"]) or "-",
            f"{ours['pairs_per_s']:.1f}", f"{trl['pairs_per_s']:.1f}" if trl else "-",
            f"{trl['median_step_s'] / ours['median_step_s']:.2f}" if trl else "-",
            mfu(ours), mfu(trl),
            memory(ours), memory(trl) if trl else "-",
            {True: "passed", False: "FAILED"}.get(result.get("gate", {}).get("passed"), "-")]


def main() -> None:
    header = ["step", "pairs", "precomputed", "override", "ours pairs/s", "TRL pairs/s", "speedup", "ours MFU",
              "TRL MFU", "ours GiB", "TRL GiB", "gate"]
    rows = [header] + [row(r["step"], r["result"]) for r in map(json.loads, open(sys.argv[1]))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(r, widths)))


if __name__ == "__main__":
    main()
