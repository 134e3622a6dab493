"""What a run ran on, for its manifest: the source (the git commit, and the local edits on top of
it), the Python environment (every installed distribution, not only the main libraries) and the
container image. Each is cheap enough to gather at every start: no large file is read whole."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

LIBRARIES = ("torch", "transformers", "datasets", "deepspeed", "tokenizers", "submitit", "tensorboard", "numpy")
"""Listed by name and version in the manifest; every other distribution counts in its hash."""


def _git(folder: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(folder: Path) -> dict[str, Any]:
    """``git_sha`` of the checkout holding ``folder`` (None outside one, e.g. an installed package
    in a container), ``git_dirty``: whether tracked files differ from it, and ``git_diff_sha256``:
    which edits (two runs with the same hash ran the same source; untracked files are not in it)."""
    sha = _git(folder, "rev-parse", "HEAD")
    if not sha:
        return {"git_sha": None, "git_dirty": None, "git_diff_sha256": None}
    diff = _git(folder, "diff", "HEAD", "--no-ext-diff", "--binary")
    dirty = None if diff is None else bool(diff)
    return {"git_sha": sha.strip(), "git_dirty": dirty,
            "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if dirty else None}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def environment() -> dict[str, Any]:
    """Every installed distribution as ``name==version``, counted and hashed (what ``pip freeze``
    lists): two runs whose hashes match ran on the same packages."""
    from importlib.metadata import distributions

    pins = sorted({f"{d.metadata['Name'].lower()}=={d.version}" for d in distributions() if d.metadata["Name"]})
    return {"packages": len(pins), "sha256": hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]}


def container(env: Optional[dict[str, str]] = None) -> Optional[dict[str, Any]]:
    """The container this process runs in, or None: an Apptainer/Singularity image by its path,
    size and modification time (hashing a multi-GB image at every start would cost seconds), or
    the runtime's name for Docker and Podman."""
    env = os.environ if env is None else env
    image = env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER")
    if image:
        found: dict[str, Any] = {"runtime": "apptainer", "image": image}
        try:
            stat = Path(image).stat()
            found.update(size=stat.st_size,
                         modified=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stat.st_mtime)))
        except OSError:
            pass  # a sandbox folder or an image not visible from inside: its path still says which
        return found
    if Path("/.dockerenv").exists():
        return {"runtime": "docker"}
    if Path("/run/.containerenv").exists():
        return {"runtime": "podman"}
    return None
