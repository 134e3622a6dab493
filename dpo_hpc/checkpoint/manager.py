"""Atomic, verified checkpoints of a DeepSpeed engine plus named pieces of state.

The checkpointer gathers Stateful pieces by name (anything with ``state_dict()`` /
``load_state_dict()``): *shared* pieces, identical on every rank and JSON-able (the trainer's
counters and config), *per-rank* pieces (the objective's controllers; this process's RNG is
always added), and *replicated* pieces, tensors identical on every rank (a moved reference model),
written once as safetensors. It owns the save interval, so the trainer only says which step it
finished.

A checkpoint is written into ``.tmp-step_N``, fsynced, given a ``manifest.json`` (format
version, sha256 and size of every file) written last, then published by renaming it to
``step_N``. Older checkpoints are removed only after that rename, so a crash at any instant
leaves the last published checkpoint usable. Loading takes the newest ``step_*`` whose manifest
verifies; a corrupt one is reported and skipped. Nothing here knows about DPO.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..fsutil import atomic_write_json, fsync_dir, remove_tree, seal_tree, sha256_file
from ..runtime import DistEnv, barrier
from ..runtime.failures import disk_full, no_space
from . import layout, reshard
from .layout import CheckpointError
from .safe_load import load_tensors_only, tensor_only_engine


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """This process's RNG states as tensors and plain numbers (loadable with weights_only=True)."""

    def state_dict(self) -> dict[str, Any]:
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


RNG = "rng"


def _manifest_problem(manifest: Any) -> Optional[str]:
    """Why a manifest that parsed as JSON is not one of ours (None if it has our shape)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return "manifest is not an object with a 'files' table"
    if not isinstance(manifest.get("format_version", 1), int):
        return "manifest format_version is not a number"
    for rel, meta in manifest["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"manifest lists {rel!r}, outside the checkpoint"
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            return f"manifest entry of {rel!r} lacks its size and sha256"
    return None


def verify(path: Path) -> Optional[str]:
    """None if the checkpoint is one of ours, whole: a real folder (not a link) whose manifest
    has our shape and lists every file in it with its size and sha256; else why not."""
    if path.is_symlink():
        return "a symbolic link, not a checkpoint this run wrote"
    try:
        manifest = json.loads((path / layout.MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        return f"unreadable manifest ({exc})"
    problem = _manifest_problem(manifest)
    if problem:
        return problem
    version = manifest.get("format_version", 1)
    if version > layout.FORMAT_VERSION:
        return f"format version {version} is newer than this dpo-hpc reads ({layout.FORMAT_VERSION})"
    on_disk = {str(Path(folder, name).relative_to(path)) for folder, _, names in os.walk(path) for name in names}
    unlisted = sorted(on_disk - set(manifest["files"]) - {layout.MANIFEST})
    if unlisted:
        return f"{unlisted[0]} is not in the manifest"
    for rel, meta in manifest["files"].items():
        file = path / rel
        if file.is_symlink():
            return f"{rel} is a symbolic link"
        if not file.is_file():
            return f"missing {rel}"
        if file.stat().st_size != meta["size"]:
            return f"{rel} has {file.stat().st_size} bytes, manifest says {meta['size']}"
        if sha256_file(file) != meta["sha256"]:
            return f"{rel} checksum mismatch"
    return None


def shared_state(path: Path) -> dict[str, Any]:
    """The shared state of checkpoint ``path``: {step, world_size, pieces: {name: state}} (format 1
    read too). A manifest or shared state of another shape is a CheckpointError."""
    manifest = json.loads((path / layout.MANIFEST).read_text())
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    version = manifest.get("format_version", 1)
    shared = json.loads((path / layout.SHARED_STATE).read_text())
    if not isinstance(shared, dict):
        raise CheckpointError(f"{path}: {layout.SHARED_STATE} is not an object")
    if version == 1:
        shared = {"step": shared["step"], "world_size": shared["world_size"],
                  "pieces": {"progress": {k: v for k, v in shared.items() if k != "world_size"}}}
    return shared


def peek_shared(root: Path, name: str) -> Optional[tuple[Path, Any]]:
    """(checkpoint, its shared piece ``name``) of the newest checkpoint whose shared state reads,
    without loading anything else: for checks that must run before a run directory is touched."""
    for path in layout.published_checkpoints(root):
        try:
            return path, shared_state(path)["pieces"][name]
        except (OSError, ValueError, KeyError, TypeError, CheckpointError):
            continue  # not usable: the full verification names it when the run resumes
    return None


class Checkpointer:
    def __init__(self, root: str | Path, dist_env: DistEnv, engine, *, interval: int, keep: int,
                 shared: dict[str, Stateful], per_rank: dict[str, Stateful],
                 replicated: Optional[dict[str, Stateful]] = None, exclude_frozen: bool = False):
        """``interval``: save every this many steps (0: only when asked); ``keep``: published
        checkpoints kept. ``shared`` pieces must return JSON-able state; ``replicated`` pieces a
        dict of tensors on rank 0 (every rank calls their ``state_dict``: it may be a collective;
        an empty one writes no file and loads as {}). ``exclude_frozen``: leave frozen weights out
        of the engine state (LoRA: they are the base model, loaded by name)."""
        self.root = Path(root)
        self.dist = dist_env
        self.engine = engine
        self.interval = interval
        self.keep = max(1, keep)
        self.shared = shared
        self.per_rank = {**per_rank, RNG: RNGState()}
        self.replicated = replicated or {}
        self.exclude_frozen = exclude_frozen
        if type(getattr(engine, "checkpoint_engine", None)).__name__ == "TorchCheckpointEngine":
            engine.checkpoint_engine = tensor_only_engine()  # never unpickle code from a run directory
        self.last_saved_step: Optional[int] = None
        self.last_save_seconds = 0.0  # how long the last save took (the stop deadline keeps room for one)
        self._verified: dict[Path, Optional[str]] = {}  # path -> why unusable (None: usable), checked once

    # ----- listing -------------------------------------------------------------------------
    def published(self) -> list[Path]:
        """Published checkpoint folders, newest first."""
        return layout.published_checkpoints(self.root)

    def problem(self, path: Path) -> Optional[str]:
        """Why ``path`` is not usable (None if it is), verified once per process."""
        if path not in self._verified:
            self._verified[path] = verify(path)
        return self._verified[path]

    def latest_valid(self, log: Callable[[str], None] = print) -> Optional[Path]:
        """The newest usable checkpoint; None when there is none. Checkpoints that all fail
        verification stop the run (a silent fresh start would train over them)."""
        unusable = []
        for path in self.published():
            problem = self._verified[path] = verify(path)  # always read afresh before a resume
            if problem is None:
                return path
            log(f"checkpoint {path} is not usable ({problem}); trying an older one")
            unusable.append(f"{path.name} ({problem})")
        if unusable:
            raise CheckpointError(f"no usable checkpoint in {self.root}: {'; '.join(unusable)}; to start this run "
                                  f"over, move them aside (mv {self.root} {self.root}.unusable) and run again")
        return None

    # ----- save -----------------------------------------------------------------------------
    def maybe_save(self, step: int, total_steps: int) -> Optional[Path]:
        """Save if ``step`` is on the interval (the end of the run saves the model instead)."""
        if self.interval and step % self.interval == 0 and step < total_steps:
            return self.save(step)
        return None

    def save(self, step: int) -> Path:
        """Write and publish checkpoint ``step`` (at most once per step). Every rank calls this:
        ZeRO saves are collective."""
        final = self.root / layout.step_dir_name(step)
        if self.last_saved_step == step:
            return final
        tmp = self.root / layout.tmp_dir_name(step)
        started = time.perf_counter()
        try:
            self._write(tmp, final, step)
        except Exception as exc:
            full = disk_full(exc, self.root)  # before the cleanup frees space again
            if self.dist.is_main:
                remove_tree(tmp)
            if full:
                raise no_space(self.root, f"saving checkpoint step {step}") from exc
            raise
        self.last_saved_step = step
        self.last_save_seconds = time.perf_counter() - started
        return final

    def _write(self, tmp: Path, final: Path, step: int) -> None:
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.iterdir():
                if layout.is_scratch_dir(stale.name):
                    remove_tree(stale)  # an interrupted save or load of ours
            tmp.mkdir()
        barrier()
        self.engine.save_checkpoint(str(tmp), tag=layout.ENGINE_TAG, save_latest=False,
                                    exclude_frozen_parameters=self.exclude_frozen)
        rank_path = tmp / layout.rank_file(self.dist.rank)
        rank_path.parent.mkdir(exist_ok=True)
        torch.save({name: piece.state_dict() for name, piece in self.per_rank.items()}, rank_path)
        for name, piece in self.replicated.items():
            state = piece.state_dict()
            if self.dist.is_main and state:
                (tmp / layout.REPLICATED).mkdir(exist_ok=True)
                save_file({k: v.contiguous() for k, v in state.items()}, tmp / layout.replicated_file(name))
        barrier()
        if self.dist.is_main:
            self._publish(tmp, final, step)
        barrier()

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        shared = {name: piece.state_dict() for name, piece in self.shared.items()}
        atomic_write_json(tmp / layout.SHARED_STATE, {"step": step, "world_size": self.dist.world_size,
                                                      "pieces": shared})
        seal_tree(tmp)
        files = {}
        for folder, _, names in os.walk(tmp):
            for file_name in names:
                file = Path(folder) / file_name
                files[str(file.relative_to(tmp))] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
        atomic_write_json(tmp / layout.MANIFEST, {"format_version": layout.FORMAT_VERSION, "step": step,
                                                  "files": dict(sorted(files.items()))})
        if final.exists() or final.is_symlink():  # same step saved by an earlier attempt
            remove_tree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        self._verified[final] = None  # written and checksummed just now
        self.prune(self.keep)

    def prune(self, keep: int) -> list[Path]:
        """Keep the ``keep`` newest usable checkpoints and remove the other published ones (rank 0;
        only folders that are ours: they hold our manifest). A corrupt checkpoint never counts as
        kept, so the newest usable one survives. Returns what was removed."""
        removed, kept = [], 0
        for path in self.published():
            if kept < keep and self.problem(path) is None:
                kept += 1
                continue
            if (path / layout.MANIFEST).exists() and not path.is_symlink():
                shutil.rmtree(path)
                self._verified.pop(path, None)
                removed.append(path)
        return removed

    # ----- load -----------------------------------------------------------------------------
    def load(self, path: Path, log: Callable[[str], None] = print) -> int:
        """Restore every piece from ``path`` and return its step. Shared pieces load first (a
        piece may refuse the checkpoint before the engine is touched). When the world size changed,
        a sliced engine state is resharded (``reshard``) and per-rank pieces come from rank 0's
        file (they are the same on every rank; the RNG is then left as seeded)."""
        shared = shared_state(path)
        for name, piece in self.shared.items():
            try:
                piece.load_state_dict(shared["pieces"][name])
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
        same_world = shared["world_size"] == self.dist.world_size
        if same_world or not reshard.sliced(path / layout.ENGINE_TAG):
            load_path, _ = self.engine.load_checkpoint(str(path), tag=layout.ENGINE_TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True,
                                                       load_module_strict=not self.exclude_frozen)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load the engine state from {path}")
        else:
            reshard.load_resharded(self.engine, path, self.dist, shared["world_size"], not self.exclude_frozen, log)
        saved = load_tensors_only(path / layout.rank_file(self.dist.rank if same_world else 0))
        if "objective" not in saved and "state" in saved:  # format 1: one unnamed objective state
            saved = {RNG: saved["rng"], "objective": saved["state"]}
        if not same_world:
            saved.pop(RNG)
        for name, piece in self.per_rank.items():
            if name in saved:
                piece.load_state_dict(saved[name])
        for name, piece in self.replicated.items():
            file = path / layout.replicated_file(name)
            piece.load_state_dict(load_file(file) if file.is_file() else {})  # safetensors: tensors only, never code
        self.last_saved_step = shared["step"]
        return shared["step"]

    def resume(self, log: Callable[[str], None] = print) -> tuple[int, Optional[Path]]:
        """Load the newest usable checkpoint: (its step, its path), or (0, None) for a fresh start."""
        latest = self.latest_valid(log)
        if latest is None:
            return 0, None
        return self.load(latest, log), latest
