"""Names inside a run's ``checkpoints/`` folder: the one place that knows them. No torch here, so
status listings on a login node use it too.

::

    checkpoints/
      step_00000040/            a published checkpoint (renamed in only when complete)
        manifest.json           format version, step, size and sha256 of every file (written last)
        trainer_state.json      shared state pieces (JSON), step, world size
        engine/                 DeepSpeed's engine, optimizer and scheduler state
        ranks/rank_00000.pt     per-rank state pieces (RNG, objective), tensors and numbers only
        replicated/<name>.safetensors   a piece of tensors identical on every rank (TR-DPO's moved
                                reference), written once by rank 0
      .tmp-step_00000048/       a save in progress (removed by the next save if it was interrupted)
      .reshard-step_00000040/   step_00000040's engine state in DeepSpeed's universal format, while a
                                run on another world size loads it (removed once loaded)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

FORMAT_VERSION = 2
"""Version 1 (no ``format_version`` in the manifest) kept one unnamed objective state per rank;
it is still read."""
MANIFEST = "manifest.json"
SHARED_STATE = "trainer_state.json"
ENGINE_TAG = "engine"
RANKS = "ranks"
REPLICATED = "replicated"

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SCRATCH_DIR = re.compile(r"^\.(tmp|reshard)-step_(\d{8})$")


class CheckpointError(Exception):
    """A checkpoint cannot be written or resumed from; the message names it and says why."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir_name(step: int) -> str:
    return f".tmp-{step_dir_name(step)}"


def reshard_dir_name(step_dir: str) -> str:
    return f".reshard-{step_dir}"


def is_scratch_dir(name: str) -> bool:
    """A save in progress or a universal form being loaded: left behind only by a process that died."""
    return _SCRATCH_DIR.match(name) is not None


def step_of(path: str | Path) -> Optional[int]:
    """The step of a published checkpoint folder, None for anything else."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def rank_file(rank: int) -> str:
    return f"{RANKS}/rank_{rank:05d}.pt"


def replicated_file(name: str) -> str:
    return f"{REPLICATED}/{name}.safetensors"


def published_checkpoints(root: str | Path) -> list[Path]:
    """Published checkpoint folders (``step_N``, not ``.tmp-step_N``) under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if (step := step_of(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]
