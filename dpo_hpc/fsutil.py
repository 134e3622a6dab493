"""Durable file writes: write aside, fsync, rename. A crash leaves the old file or the new one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def aside_suffix() -> str:
    """What makes a writer's temporary name its own, on a filesystem nodes share (pids repeat)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def umask_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask. Read from /proc: os.umask
    can only be read by setting it, which races with other threads creating files."""
    try:
        with open("/proc/self/status") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):  # not Linux, or a kernel before 4.7
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def as_umask_allows(path: str | Path) -> None:
    """Give a file we wrote the mode the umask allows: some writers (safetensors >= 0.8) create
    files 0600 whatever the umask, and a lab sharing a project folder could not read the model.
    A courtesy: where the filesystem refuses modes (some FUSE and SMB mounts), the write goes on."""
    try:
        os.chmod(path, umask_mode())
    except OSError:
        pass


def write_aside(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a file beside ``path``, fsync it, rename it over ``path``: a reader sees the
    old file or the whole new one (for writers that take a path, such as a profiler's trace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{aside_suffix()}")
    try:
        write(tmp)
        as_umask_allows(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also leave our half-written file behind
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    write_aside(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_identity(folder: str | Path) -> list:
    """Name, size and modification time of every file of a folder (a model's, a tokenizer's):
    what a cache of values computed from it is keyed by."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())


def model_identity(name: str) -> list | str:
    """What names a model in a key of values computed with it: a local folder's files
    (``files_identity``: retrained in place, it is another model), else its hub name."""
    return files_identity(name) if Path(name).is_dir() else name


def seal_tree(root: Path) -> None:
    """Before publishing a tree by rename: fsync every file and folder under root, each file with
    the mode the umask allows (``as_umask_allows``)."""
    for folder, _, files in os.walk(root):
        for name in files:
            as_umask_allows(os.path.join(folder, name))
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def looks_local(name: str, file_suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is a path rather than a hub id (``org/name``), as the hub loaders tell them
    apart when no such path exists: it starts with ``.``, ``/`` or ``~``, has more than one ``/``,
    or ends with one of ``file_suffixes`` (a data file's)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or bool(file_suffixes) and name.lower().endswith(file_suffixes))


def existing_ancestor(folder: str | Path) -> Path:
    """``folder`` if it exists, else its nearest ancestor that does."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def blocking_file(folder: str | Path) -> Path | None:
    """The file (not a folder) that stands where ``folder`` or one of its parents must be, if any:
    creating ``folder`` would fail on it."""
    probe = existing_ancestor(folder)
    return None if probe.is_dir() else probe


def remove_tree(path: str | Path) -> None:
    """Remove a folder (or file) this program wrote. A symbolic link standing at its place is
    removed as a link and never followed: what it points to is not ours."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
