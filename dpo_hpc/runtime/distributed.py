"""Process-group setup for one process, torchrun, the deepspeed launcher or srun.

Rank and world size come from RANK/WORLD_SIZE (torchrun, deepspeed) or SLURM_PROCID/SLURM_NTASKS
(srun); a lone process gets an in-memory rendezvous. DeepSpeed's CPU accelerator uses gloo, CUDA nccl.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, tensor):
        """``all_gather_cat``: what the beta policies' ``Collective`` asks for (every rank calls)."""
        return all_gather_cat(tensor)


def launched_ranks() -> DistEnv:
    """This process's rank, local rank and world size as its launcher set them (torchrun and the
    deepspeed launcher: RANK/WORLD_SIZE; srun: SLURM_PROCID/SLURM_NTASKS; else a lone process)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank = int(env["RANK"])
        return DistEnv(rank, int(env.get("LOCAL_RANK", rank)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistEnv(0, 0, 1)


def _export_env() -> DistEnv:
    env = os.environ
    launched = launched_ranks()
    rank, world, local = launched.rank, launched.world_size, launched.local_rank
    if world > 1 and not ("RANK" in env and "WORLD_SIZE" in env):  # srun's
        env.setdefault("MASTER_ADDR", "127.0.0.1")  # the HPC layer sets the first node of the job
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 40000))
    elif world == 1:
        # DeepSpeed checks that these exist; nothing binds the port: a lone process rendezvouses
        # in memory (see init_distributed).
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    return DistEnv(rank, local, world)


def _skip_cpu_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory allreduce op (~100 s of g++) on first CPU use.

    It only speeds up CPU allreduce, which is not where CPU runs spend time. Set
    DPO_HPC_DS_SHM=1 to keep it. ``deepspeed.comm.torch`` must be patched through sys.modules:
    the attribute of that name on ``deepspeed.comm`` is the torch package.
    """
    if os.environ.get("DPO_HPC_DS_SHM") == "1":
        return
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed() -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (idempotent); call on every rank.

    The backend follows DeepSpeed's accelerator, not ``torch.cuda.is_available()``: a GPU machine
    running with ``DS_ACCELERATOR=cpu`` (the test suite) must use gloo, or every collective on a
    CPU tensor fails with "No backend type associated with device type cpu".
    """
    # Before CUDA starts: segments that grow in place instead of a cache that fragments as batch
    # shapes vary, then frees everything and retries near the memory limit (slow steps; perf.md
    # section 7 saw 4-5 s first steps). A setting of the user's wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    dist_env = _export_env()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_gpu = get_accelerator().device_name() == "cuda"
    if on_gpu:
        torch.cuda.set_device(dist_env.local_rank)
    else:
        _skip_cpu_shm_build()
    backend = "nccl" if on_gpu else "gloo"
    if not torch.distributed.is_initialized():
        if dist_env.world_size == 1:
            # An in-memory store: no TCP port to race other jobs for (a free port picked, released
            # and re-bound can be taken in between, seen as EADDRINUSE with jobs sharing a node).
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist_env


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def main_rank_first(dist: DistEnv, work: Callable[[], T], poll_s: float = 5.0) -> T:
    """``work()`` on rank 0, then on the other ranks once it has ended: what rank 0 leaves in a
    shared cache, the others read instead of all doing the same work at once.

    Meanwhile the ranks meet every ``poll_s`` in a short broadcast, never in one long collective
    (a GPU collective's watchdog ends a wait of many minutes). A failure on rank 0 raises there
    once the others know it ended; they then meet it themselves."""
    if dist.world_size == 1:
        return work()
    import torch.distributed

    outcome: dict = {}
    worker = None
    if dist.is_main:
        def run() -> None:
            try:
                outcome["value"] = work()
            except BaseException as exc:  # raised again on this rank's own thread below
                outcome["error"] = exc

        worker = threading.Thread(target=run, name="main-rank-first", daemon=True)
        worker.start()
    while True:
        ended = [worker is not None and not worker.is_alive()]
        torch.distributed.broadcast_object_list(ended, src=0)
        if ended[0]:
            break
        if worker is not None:
            worker.join(poll_s)  # the other ranks wait in the next broadcast meanwhile
    if not dist.is_main:
        return work()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def all_reduce_sum(tensor):
    """In-place SUM across ranks (no-op without a process group); returns the tensor."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown() -> None:
    """Tear the process group down; avoids an abort at exit seen with gloo + ZeRO-3."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_cat(tensor):
    """Concatenate a 1-D tensor from every rank, in rank order (collective; equal sizes required)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    size = torch.tensor([tensor.numel()], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    if len({int(s) for s in sizes}) != 1:
        raise RuntimeError(f"ranks hold different batch sizes {[int(s) for s in sizes]}; global statistics need equal ones")
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
