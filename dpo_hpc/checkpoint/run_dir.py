"""The run directory: resolved config, data report, manifest, TensorBoard events, checkpoints, model.

::

    <save_dir>/
      config.resolved.json   the validated config with every default filled in
      data_report.json       rows kept and dropped per split, by reason
      run_manifest.json      provenance and status (running / preempted / completed)
      progress.json          latest step and metrics (what ``dpo_hpc.status`` shows)
      requeues.jsonl         one line per requeue (Slurm job, cause, step; see dpo_hpc.launch.requeue)
      tensorboard/           event files
      samples/step_*.jsonl   the policy's completions of validation prompts (generate_during_eval)
      checkpoints/step_*/    resumable training state (see dpo_hpc.checkpoint.layout)
      config.json, model.safetensors, tokenizer files   the final model (save_pretrained)
      README.md              its model card (see dpo_hpc.checkpoint.model_card)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..config import ConfigError, to_dict, to_identity
from ..fsutil import atomic_write_json, blocking_file
from . import provenance

MANIFEST = "run_manifest.json"
RESOLVED_CONFIG = "config.resolved.json"
DATA_REPORT = "data_report.json"
SAMPLES = "samples"
PROGRESS = "progress.json"
MODEL_CONFIG, ADAPTER_CONFIG = "config.json", "adapter_config.json"
SAVED_MODEL_FILES = (MODEL_CONFIG, ADAPTER_CONFIG)
"""A folder is a saved model when it holds one of these (a full model's config, a LoRA adapter's)."""
MERGED = "merged"
"""Subfolder of a LoRA run's directory with the merged model (beside the adapter, transformers
would load the adapter from the same folder)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST")


def is_adapter_folder(name: str) -> bool:
    """Whether ``name`` is a folder holding a LoRA adapter alone (no model of its own)."""
    path = Path(name)
    return path.is_dir() and (path / ADAPTER_CONFIG).exists() and not (path / MODEL_CONFIG).exists()


def config_hash(cfg) -> str:
    """Hash of the run's identity (its non-default values; see ``config.to_identity``)."""
    blob = json.dumps(to_identity(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    """The file's JSON object, or None when it is missing, torn (files written atomically are
    never torn) or not an object (written by something else)."""
    try:
        found = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return found if isinstance(found, dict) else None


def other_run(manifest: dict[str, Any], run_id: str) -> Optional[str]:
    """The id of another run whose record ``manifest`` is, else None (the record is this run's,
    records no id, or is empty). A scoring's folder is its stage's, whatever its settings: its
    manifest's id says which settings it was made with."""
    recorded = manifest.get("run_id")
    return recorded if recorded not in (None, run_id) else None


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def check_location(self) -> None:
        """Refuse a run directory that cannot be made: a file stands where it or a parent must be."""
        blocked = blocking_file(self.root)
        if blocked:
            raise ConfigError([f"save_dir '{self.root}': {blocked} is a file, not a folder; choose another save_dir"])

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def samples(self, step: int) -> Path:
        """Where the sample generations of an evaluation at ``step`` go (8 digits, as checkpoints)."""
        return self.root / SAMPLES / f"step_{step:08d}.jsonl"

    def latest_samples(self) -> list[dict[str, Any]]:
        """The records of the last sample generations written (``generate_during_eval``), or []."""
        for path in sorted((self.root / SAMPLES).glob("step_*.jsonl"), reverse=True):
            try:
                return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue  # not ours (our files are written whole): an older one
        return []

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        return _read_json(self.manifest_path)

    def other_run(self, run_id: str) -> Optional[str]:
        """``other_run`` of this folder's manifest."""
        return other_run(self.read_manifest() or {}, run_id)

    def start(self, cfg, trainer: str, world_size: int, device: str = "") -> dict[str, Any]:
        """Create the folder, write the resolved config and a 'running' manifest (rank 0 only);
        ``device`` names where it runs (device and process-group backend)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / RESOLVED_CONFIG, {"trainer": trainer, **to_dict(cfg)})
        previous = self.read_manifest() or {}
        manifest = {
            "status": "running",
            "trainer": trainer,
            "config_hash": config_hash(cfg),
            "package_version": __version__,
            **provenance.git_state(Path(__file__).resolve().parent),
            "libraries": provenance.library_versions(),
            "environment": provenance.environment(),
            "container": provenance.container(),
            "python": platform.python_version(),
            "seed": cfg.training.seed,
            "world_size": world_size,
            "device": device,
            "hostname": socket.gethostname(),
            "slurm": {k: os.environ[k] for k in _SLURM_VARS if k in os.environ},
            "first_start_time": previous.get("first_start_time", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "starts": previous.get("starts", 0) + 1,
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    @property
    def progress_path(self) -> Path:
        return self.root / PROGRESS

    def read_progress(self) -> dict[str, Any] | None:
        return _read_json(self.progress_path)

    def write_progress(self, step: int, total_steps: int, train: dict[str, float], eval: dict[str, float]) -> None:
        """The latest step and metrics, for ``dpo_hpc.status`` (cheaper than reading TensorBoard)."""
        atomic_write_json(self.progress_path, {"step": step, "total_steps": total_steps, "time": time.time(),
                                               "train": train, "eval": eval})

    def mark(self, manifest: dict[str, Any], status: str, **extra: Any) -> None:
        manifest.update(extra, status=status, stop_time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_json(self.manifest_path, manifest)

    def annotate(self, **extra: Any) -> None:
        """Add facts to the manifest as it is on disk (after the trainer has let go of it)."""
        atomic_write_json(self.manifest_path, {**(self.read_manifest() or {}), **extra})

    def finish(self, manifest: dict[str, Any], **extra: Any) -> None:
        manifest.update(extra, status="completed", end_time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_json(self.manifest_path, manifest)


def not_loadable(name: str, what: str, files: tuple[str, ...]) -> Optional[str]:
    """Why the local folder ``name`` cannot be loaded as a ``what`` (it holds none of ``files``), or
    None (it holds one, or it is not a local folder). The usual cause is a run directory whose run
    has not finished, and the line says so; transformers' own error there is about sentencepiece."""
    folder = Path(name).expanduser()
    if not folder.is_dir() or any((folder / file).exists() for file in files):
        return None
    manifest = RunDir(folder).read_manifest()
    if manifest is not None and manifest.get("status") != "completed":
        return (f"{what} '{name}' is the directory of a {manifest.get('trainer', '')} run that has not finished "
                f"(status {manifest.get('status')!r}): its model is written there when the run completes; "
                "finish that run first")
    return f"{what} '{name}' is a folder without {' or '.join(files[:2])} (not a saved {what})"
