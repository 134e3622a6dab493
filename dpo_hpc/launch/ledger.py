"""The submission ledger: one JSON line per submitted run (run id -> Slurm job id), appended
under ``<experiment root>/.submit/``. With the run directories it tells a re-submission which
runs are done, queued or running, and which failed and may be submitted again."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class Ledger:
    def __init__(self, path: Path):
        self.path = path

    def record(self, entries: list[dict[str, Any]]) -> None:
        """Append entries (each with run_id, job_id, stage, backend); fsynced before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with open(self.path, "a", encoding="utf-8") as f:
            for entry in entries:
                f.write(json.dumps({"time": stamp, **entry}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def latest(self) -> dict[str, dict[str, Any]]:
        """The most recent submission of each run."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return out
        for line_no, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a torn last line after a crash: the rest is still valid
                print(f"[dpo-hpc] {self.path}:{line_no}: unreadable ledger line skipped")
                continue
            out[entry["run_id"]] = entry
        return out
