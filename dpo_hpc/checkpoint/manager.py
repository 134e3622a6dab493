"""Atomic, verified checkpoints of a DeepSpeed engine plus named pieces of trainer state.

A checkpoint is written into ``checkpoints/.tmp-step_N``, fsynced, given a ``manifest.json``
(sha256 and size of every file) written last, then published by renaming it to ``step_N``.
Older checkpoints are removed only after that rename, so a crash at any instant leaves the
last published checkpoint usable. Loading takes the newest ``step_*`` whose manifest verifies;
a corrupt one is reported and skipped. This module knows nothing about DPO: trainers hand it a
dict of plain state (numbers, strings, tensors) and get the same dict back.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..fsutil import atomic_write_json, fsync_dir, fsync_tree, sha256_file
from ..run_dir import published_checkpoints
from ..trainers.distributed import DistEnv, barrier

ENGINE_TAG = "engine"
MANIFEST = "manifest.json"
_TMP_DIR = re.compile(r"^\.tmp-step_(\d{8})$")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(Exception):
    pass


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int, dist_env: DistEnv):
        self.root = Path(root)
        self.keep = max(1, keep)
        self.dist = dist_env

    # ----- listing and verification -------------------------------------------------------
    def published(self) -> list[Path]:
        """Published checkpoint folders, newest first."""
        return published_checkpoints(self.root)

    @staticmethod
    def verify(path: Path) -> Optional[str]:
        """None if every file listed in the manifest has its recorded size and sha256, else why not."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return "no manifest"
        except json.JSONDecodeError as exc:
            return f"unreadable manifest ({exc})"
        for rel, meta in manifest["files"].items():
            file = path / rel
            if not file.is_file():
                return f"missing {rel}"
            if file.stat().st_size != meta["size"]:
                return f"{rel} has {file.stat().st_size} bytes, manifest says {meta['size']}"
            if sha256_file(file) != meta["sha256"]:
                return f"{rel} checksum mismatch"
        return None

    def latest_valid(self, log=print) -> Optional[Path]:
        for path in self.published():
            problem = self.verify(path)
            if problem is None:
                return path
            log(f"checkpoint {path} is not usable ({problem}); trying an older one")
        return None

    # ----- save -----------------------------------------------------------------------------
    def save(self, engine, step: int, state: dict[str, Any], rank_state: dict[str, Any] | None = None) -> Path:
        """Write and publish checkpoint ``step``. Every rank calls this (ZeRO saves are collective).

        ``state`` is JSON-able trainer state shared by all ranks; ``rank_state`` (numbers and
        tensors, e.g. algorithm controllers) is stored per rank next to that rank's RNG.
        """
        name = f"step_{step:08d}"
        tmp = self.root / f".tmp-{name}"
        final = self.root / name
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.iterdir():
                if _TMP_DIR.match(stale.name):
                    shutil.rmtree(stale)  # an interrupted save of ours
            tmp.mkdir()
        barrier()
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
        (tmp / "ranks").mkdir(exist_ok=True)
        torch.save({"rng": rng_state(), "state": rank_state or {}}, tmp / "ranks" / f"rank_{self.dist.rank:05d}.pt")
        barrier()
        if self.dist.is_main:
            atomic_write_json(tmp / "trainer_state.json", {**state, "step": step, "world_size": self.dist.world_size})
            fsync_tree(tmp)
            files = {}
            for folder, _, names in os.walk(tmp):
                for file_name in names:
                    file = Path(folder) / file_name
                    files[str(file.relative_to(tmp))] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
            atomic_write_json(tmp / MANIFEST, {"step": step, "files": dict(sorted(files.items()))})
            if final.exists():  # same step saved before (e.g. a final save after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            for old in self.published()[self.keep:]:
                if (old / MANIFEST).exists():
                    shutil.rmtree(old)
        barrier()
        return final

    # ----- load -----------------------------------------------------------------------------
    def load(self, engine, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore engine (weights, optimizer, scheduler) and this rank's RNG; return the shared
        trainer state and this rank's ``rank_state`` (rank 0's when the world size changed)."""
        state = json.loads((path / "trainer_state.json").read_text())
        load_path, _ = engine.load_checkpoint(
            str(path), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the engine state from {path}")
        same_world = state["world_size"] == self.dist.world_size
        rank_file = path / "ranks" / f"rank_{self.dist.rank if same_world else 0:05d}.pt"
        saved = torch.load(rank_file, weights_only=True)
        if same_world:
            set_rng_state(saved["rng"])
        return state, saved["state"]
