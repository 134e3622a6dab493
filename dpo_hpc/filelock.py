"""A lock file that works on shared filesystems: created with O_EXCL (atomic on local disks and
NFSv3+), holding who holds it (host, pid, Slurm job), kept fresh by a heartbeat, and reclaimed
with a message when its holder stopped refreshing it (a node that died holds no lock forever)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class FileLock:
    def __init__(self, path: str | Path, stale_after_s: float = 600.0, heartbeat_s: float = 30.0):
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self._stop: Optional[threading.Event] = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"{info['host']}:{info['pid']}" + (f" (Slurm job {info['job']})" if info.get("job") else "")
        except (OSError, ValueError, KeyError):
            return "an unknown holder"

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or stale); never blocks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                "time": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), daemon=True).start()
        return True

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def is_stale(self) -> bool:
        """No heartbeat for ``stale_after_s``; or a holder on this host whose process is gone; or
        an earlier run of this same Slurm job (requeued: same job id, a new process)."""
        try:
            if time.time() - self.path.stat().st_mtime > self.stale_after_s:
                return True
            info = json.loads(self.path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return False  # being written right now: not stale
        if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
            return True
        job = os.environ.get("SLURM_JOB_ID")
        return bool(job) and info.get("job") == job and (info.get("host"), info.get("pid")) != \
            (socket.gethostname(), os.getpid())

    def reclaim_if_stale(self, say: Callable[[str], None]) -> None:
        if self.is_stale():
            say(f"lock {self.path} held by {self.holder()} went stale (no heartbeat for "
                f"{self.stale_after_s:.0f} s); reclaiming it")
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            self.path.unlink(missing_ok=True)
