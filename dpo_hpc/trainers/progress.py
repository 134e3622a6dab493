"""The resume guard: the checkpoint piece that records how far a run got and what it was trained
with (config, global batch, data fingerprints). Loading it refuses a checkpoint of another run
before anything is restored or written."""

from __future__ import annotations

from typing import Any

from ..checkpoint import CheckpointError
from ..config import ALGORITHMS, ConfigError, to_dict, validate_mapping
from ..config.loader import flagged_keys

RESUMABLE_CHANGES = set().union(*(flagged_keys(a.config, "resumable") for a in ALGORITHMS.values()))
"""Keys that may change between a checkpoint and its resumption (flagged in the schema)."""

ACCEPT_DATA_CHANGE = "accept_data_change"
"""The training key that lets a run resume on data whose fingerprint changed."""


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{prefix}{key}.")
        elif a != b and key not in RESUMABLE_CHANGES:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


class TrainProgress:
    """Checkpoint piece: the step reached, and what it was trained with. ``data`` holds the
    fingerprint of each split (its rows' contents in order, and how they were tokenized): a data
    file regenerated or edited at the same path is another run's data, refused unless the config's
    ``<training section>.accept_data_change`` is set."""

    def __init__(self, trainer: str, config: dict, global_batch: int, data: dict[str, str] | None = None):
        self.trainer, self.config, self.global_batch = trainer, config, global_batch
        self.data = data or {}
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "trainer": self.trainer, "config": self.config, "global_batch": self.global_batch,
                "data": self.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Re-read through today's schema: a key added since (with its default) is not a change.
        try:
            saved = to_dict(validate_mapping(state["config"], state["trainer"], source="the checkpoint's config"))
        except ConfigError as exc:
            raise CheckpointError("its config does not validate any more: " + "; ".join(exc.problems)) from None
        changes = config_changes(saved, self.config)
        if state["global_batch"] != self.global_batch:
            changes.append(f"global batch {state['global_batch']} -> {self.global_batch} (batch_size x "
                           "gradient_accumulation_steps x world size; any split of the same global batch resumes, "
                           "and global_batch_size keeps it on any world size)")
        if changes:
            raise CheckpointError(f"checkpoint at step {state['step']} was written with a different config; "
                                  "refusing to resume: " + "; ".join(changes))
        self.check_data(state)
        self.step = state["step"]

    def check_data(self, state: dict[str, Any]) -> None:
        saved = state.get("data") or {}  # checkpoints written before fingerprints were kept have none
        changed = [f"{split} {saved[split]} -> {self.data[split]}" for split in sorted(saved)
                   if split in self.data and saved[split] != self.data[split]]
        if not changed:
            return
        section = next(a.training_section for a in ALGORITHMS.values() if a.name == self.trainer)
        if self.config[section].get(ACCEPT_DATA_CHANGE):
            return
        raise CheckpointError(
            f"checkpoint at step {state['step']} was trained on other data (fingerprint {'; '.join(changed)}): the "
            f"dataset was changed or regenerated since; refusing to resume. To go on from step {state['step']} on the "
            f"new data anyway, set {section}.{ACCEPT_DATA_CHANGE} = true (--set {section}.{ACCEPT_DATA_CHANGE}=true); "
            "to start over on it, use another save_dir")
