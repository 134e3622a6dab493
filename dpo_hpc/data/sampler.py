"""The step-indexed sampler: which rows each rank reads at each optimizer step, as a pure
function of (seed, step). Resuming therefore needs no sampler state, and 1 rank x GA 2 sees the
same global batch as 2 ranks x GA 1."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .sources import DataError


def num_batches(n: int, batch: int) -> int:
    return math.ceil(n / batch)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Whole global batches in an epoch of ``n`` rows (the incomplete tail is skipped)."""
    if n < global_batch:
        raise DataError(f"the training split has {n} rows, fewer than one global batch ({global_batch})")
    return n // global_batch


LENGTH_GROUP = 50
"""Global batches sorted by length together when grouping by length (the HF Trainer's 50)."""


def global_batch_indices(
    n: int, step: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int,
    lengths: Optional[np.ndarray] = None,
) -> list[list[int]]:
    """This rank's micro-batches (``grad_accum`` lists of indices) for optimizer step ``step``.

    The data order is a function of (seed, step) alone: epoch e is a permutation of all rows
    drawn from ``seed + e``, cut into global batches of micro_batch x grad_accum x world_size
    (the incomplete tail of an epoch is skipped). Micro-step k on rank r reads rows
    ``[(k * world_size + r) * micro_batch, ... + micro_batch)`` of the global batch, so the
    global batch is the same set of rows for 1 rank x 2 accumulation steps and 2 ranks x 1,
    and resuming at any step needs no saved sampler state.

    With ``lengths`` (group by length), each run of ``LENGTH_GROUP`` global batches of the
    permutation is sorted by length, longest first, before it is cut: global batches and the
    micro-batches within them hold rows of similar length, so less of each is padding.
    """
    global_batch = micro_batch * grad_accum * world_size
    epoch, within = divmod(step, steps_per_epoch(n, global_batch))
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if lengths is None:
        batch = order[within * global_batch:(within + 1) * global_batch]
    else:
        group, offset = divmod(within, LENGTH_GROUP)
        span = LENGTH_GROUP * global_batch
        members = order[group * span:(group + 1) * span][: (n // global_batch - group * LENGTH_GROUP) * global_batch]
        members = members[np.argsort(-lengths[members], kind="stable")]
        batch = members[offset * global_batch:(offset + 1) * global_batch]
    out = []
    for k in range(grad_accum):
        start = (k * world_size + rank) * micro_batch
        out.append(batch[start:start + micro_batch].tolist())
    return out


def eval_batch_indices(n: int, batch: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's evaluation micro-batches; every rank gets the same number (ZeRO-3 forwards are
    collective), so trailing batches may be empty and are skipped in the sums but still run."""
    per_round = batch * world_size
    rounds = num_batches(n, per_round)
    out = []
    for b in range(rounds):
        start = b * per_round + rank * batch
        out.append(list(range(start, min(start + batch, n))))
    return out


def kl_partners(n: int, micro_batch: int, seed: int) -> np.ndarray:
    """KTO: the example whose completion each training example's prompt is scored with for the KL
    estimate. Within each micro-batch of the first epoch (the chunks of ``micro_batch`` rows of its
    permutation, whatever the world size and accumulation) completions rotate by one, as TRL does
    within its batches: the KL sequences of such a micro-batch are its own completions after other
    prompts. The pairing is fixed for the run (later epochs, length grouping and a precomputed
    reference table keep it)."""
    order = np.random.default_rng([seed, 0]).permutation(n)
    return rotated_within(order, micro_batch)


def rotated_within(order: np.ndarray, size: int) -> np.ndarray:
    """``partner[order[j]] = order[j - 1]`` within each chunk of ``size`` of ``order`` (cyclic: a
    chunk's first takes its last; a chunk of one is its own partner)."""
    partner = np.empty(len(order), dtype=np.int64)
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        partner[chunk] = np.roll(chunk, 1)
    return partner
