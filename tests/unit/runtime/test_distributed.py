"""The process group: what its start sets before CUDA starts, and the order of work across ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.parametrize("preset, expected", [(None, "expandable_segments:True"),
                                              ("max_split_size_mb:128", "max_split_size_mb:128")])
def test_the_cuda_allocator_grows_segments_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if preset is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = preset
    code = ("import os; from dpo_hpc.runtime import init_distributed; init_distributed(); "
            "print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == expected


def _rank(rank: int, folder: str, fail_on_main: bool) -> None:
    """One of two gloo ranks: rank 0 leaves a file that rank 1's work must already find."""
    import torch.distributed as dist

    from dpo_hpc.runtime import DistEnv, main_rank_first

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    made = Path(folder) / "made_by_rank_0"
    meetings, broadcast = [], dist.broadcast_object_list

    def counted(*args, **kwargs):  # the real broadcast, counted
        meetings.append(1)
        return broadcast(*args, **kwargs)

    dist.broadcast_object_list = counted

    def work():
        if rank == 0:
            time.sleep(0.5)  # several polls: the ranks meet in short broadcasts meanwhile
            if fail_on_main:
                raise ValueError("rank 0's data is bad")
            made.write_text("tokenized")
        (Path(folder) / f"rank_{rank}").write_text("found" if made.exists() else "not there")
        return rank

    try:
        assert main_rank_first(DistEnv(rank, rank, 2), work, poll_s=0.05) == rank
    except ValueError:
        (Path(folder) / f"rank_{rank}").write_text("raised")
    (Path(folder) / f"meetings_{rank}").write_text(str(len(meetings)))
    dist.barrier()  # the ranks still meet afterwards: nobody was left waiting
    dist.destroy_process_group()


@pytest.mark.parametrize("fail_on_main", [False, True])
def test_main_rank_first_runs_rank_0_then_the_others_and_never_strands_them(tmp_path, fail_on_main):
    import torch.multiprocessing as mp

    mp.start_processes(_rank, args=(str(tmp_path), fail_on_main), nprocs=2, start_method="spawn", join=True)
    states = [(tmp_path / f"rank_{r}").read_text() for r in (0, 1)]
    assert states == (["raised", "not there"] if fail_on_main else ["found", "found"])
    # rank 0's 0.5 s of work at polls of 0.05 s: many short meetings, not one long wait
    assert all(int((tmp_path / f"meetings_{r}").read_text()) >= 5 for r in (0, 1))
