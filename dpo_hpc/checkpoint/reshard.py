"""Loading an engine checkpoint written at another data-parallel world size.

ZeRO 1-3 (and DeepSpeed's bf16 optimizer) keep each rank's slice of the fp32 weights and Adam
moments in that rank's own file, so a checkpoint saved by 4 ranks does not load on 2: a job
requeued onto fewer GPUs, or a run moved to another partition, would have to start over.
DeepSpeed's universal checkpoint format holds every parameter's state whole; its converter
(``deepspeed.checkpoint.ds_to_universal``) writes it from the sliced files, and an engine loads it
at any world size. Here rank 0 converts into a scratch folder beside the checkpoints (ours, so it is
removed after loading, or by the next attempt if this one dies), and every rank loads from it.

DeepSpeed's converter and its universal loader call ``torch.load(weights_only=False)`` directly;
both run under ``tensors_only``, which routes every such call through the weights-only unpickler
(``safe_load``), so nothing in a run directory is unpickled as code on this path either.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..fsutil import remove_tree
from ..runtime import DistEnv, barrier, main_rank_first
from ..runtime.failures import disk_full, no_space
from . import layout
from .layout import CheckpointError
from .safe_load import load_tensors_only


def sliced(engine_dir: Path) -> bool:
    """Whether the engine state in ``engine_dir`` is cut by rank (ZeRO 1-3, bf16 optimizer). A
    ZeRO-0 fp32 checkpoint keeps the optimizer whole in the model-states file: it loads anywhere."""
    return any(engine_dir.glob("*optim_states.pt"))


@contextlib.contextmanager
def tensors_only() -> Iterator[None]:
    """Every ``torch.load`` in this block loads tensors and plain containers only (DeepSpeed's
    converter and universal loader ask for ``weights_only=False``; they are not given it)."""
    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        return load_tensors_only(f, map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert(engine_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's universal checkpoint of ``engine_dir`` in ``out_dir`` (one process: its worker
    pool would not inherit ``tensors_only``)."""
    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    args = argparse.Namespace(input_folder=str(engine_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with tensors_only():
        to_universal(args)


def load_resharded(engine, path: Path, dist: DistEnv, saved_world: int, strict: bool,
                   log: Callable[[str], None]) -> None:
    """Load checkpoint ``path``'s engine state, written by ``saved_world`` ranks, on this world."""
    scratch = path.parent / layout.reshard_dir_name(path.name)

    def universal_form() -> None:  # rank 0 writes it; the others then find it
        if dist.is_main:
            log(f"checkpoint {path.name} was written with world size {saved_world}, this run has {dist.world_size}: "
                f"converting its ZeRO state to DeepSpeed's universal format in {scratch}")
            started = time.perf_counter()
            remove_tree(scratch)  # what an interrupted conversion left
            try:
                convert(path / layout.ENGINE_TAG, scratch / layout.ENGINE_TAG)
            except Exception as exc:
                full = disk_full(exc, path.parent)  # before the cleanup frees space again
                remove_tree(scratch)
                if full:
                    raise no_space(path.parent, f"converting checkpoint {path.name} for world size "
                                                f"{dist.world_size}") from exc
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"{path}: DeepSpeed could not convert it for world size {dist.world_size} "
                                      f"({type(exc).__name__}: {exc}); resume it with world size "
                                      f"{saved_world}") from exc
            log(f"converted in {time.perf_counter() - started:.0f} s")
        elif not (scratch / layout.ENGINE_TAG).is_dir():
            raise CheckpointError(f"{path}: rank 0 did not convert it for world size {dist.world_size} (see its log)")

    main_rank_first(dist, universal_form)  # minutes for a large model: no collective waits that long
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads it at each load: off again below
    try:
        with tensors_only():
            loaded, _ = engine.load_checkpoint(str(scratch), tag=layout.ENGINE_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True, load_module_strict=strict)
    finally:
        engine._config.load_universal_checkpoint = False
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load the universal form of {path} from {scratch}")
    unshare_step_counters(engine.optimizer)
    barrier()
    if dist.is_main:
        remove_tree(scratch)


def unshare_step_counters(optimizer) -> None:
    """Give every parameter group its own Adam step tensor. DeepSpeed's ZeRO-3 universal loader
    hands one step tensor to every group, and torch's Adam increments it in place, once per group:
    the step count, hence the bias correction, would run ahead after the resume."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
