"""Atomic writes: every file and folder msae writes goes through here.

A file is written to a temporary name in its destination folder and renamed into place, so a
reader never sees half of it. A folder is built under a temporary name and renamed into place,
or swapped in so that at every moment either the old or the new folder is complete.
JSON is written strictly: NaN and infinities become null (JSON has no such numbers).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _mkstemp(path: Path, suffix: str) -> tuple[int, str]:
    """mkstemp beside ``path``, with the permissions a plain open() would give (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def check_output_folder(path: str | os.PathLike, what: str, overwrite: bool,
                        replaces: str = "msae's own files") -> Path:
    """An output folder may be new or empty; one that holds files needs ``overwrite`` (and then only
    ``replaces`` are written there: the caller's promise, named in the error)."""
    from msae.errors import MsaeError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MsaeError(f"{what} {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise MsaeError(f"{what} {path}: exists and is not empty; choose a new folder, or pass --overwrite to "
                        f"replace {replaces} in it (other files are kept)")
    return path


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), fsync)


def plain(obj: Any) -> Any:
    """JSON-ready copy: numpy and torch scalars/arrays as Python values, tuples as lists, and
    non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return plain(obj.item())
    if hasattr(obj, "tolist") and hasattr(obj, "detach"):  # torch tensors
        return plain(obj.detach().cpu().tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(plain(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, fsync: bool = False) -> Path:
    """Atomic, strict JSON (non-finite numbers become null)."""
    return write_text(path, dumps(obj) + "\n", fsync)


def append_line(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and fsync it (a line cut off by a crash is skipped by readers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(dumps(obj, indent=None) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: str | os.PathLike) -> list[Any]:
    """The JSON lines of ``path`` (none when it is missing), skipping a line cut off by a crash."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def temp_dir_beside(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's are 0700
    return tmp


@contextmanager
def new_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it is renamed to ``path``, which must
    not exist or be an empty folder. On failure nothing is left behind."""
    path = Path(path)
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)  # an empty folder at ``path`` is replaced; a non-empty one raises
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replaced_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it replaces ``path`` whole
    (:func:`swap_dir`). On failure ``path`` is as it was and nothing is left behind."""
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        swap_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Replace folder ``path`` (ours) with the complete folder ``new``: at every moment either the
    old folder (at ``path`` or ``.NAME.old``) or the new one is in place (see :func:`latest_dir`)."""
    new, path = Path(new), Path(path)
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def latest_dir(path: str | os.PathLike, marker: str) -> Path | None:
    """``path`` if it holds ``marker`` (complete), else the previous folder a cut-short
    :func:`swap_dir` left at ``.NAME.old``, else None."""
    path = Path(path)
    for d in (path, path.with_name(f".{path.name}.old")):
        if (d / marker).is_file():
            return d
    return None


@contextmanager
def new_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (Arrow, safetensors);
    renamed to ``path`` when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp(path, suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def scratch_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` (staging data), always removed when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".scratch", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
