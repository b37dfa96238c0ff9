"""Reading embedding arrays and serving shuffled batches (no per-sample Python).

Formats: msae feature caches (Arrow IPC, memory-mapped; see msae.cache), ``.npy`` (memory-mapped)
and the reference code's headerless float32 row-major files named ``..._{N}_{D}.npy``. Every array is validated when opened (2-D, finite) and returned as a
read-only float32 array without a private copy when the file is float32 already.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from msae.arrays import check_embeddings, to_float32
from msae.cache import cache_info, is_cache, open_cache
from msae.errors import MsaeError

_REFERENCE_NAME = re.compile(r"_(\d+)_(\d+)\.npy$")


def load_array(path: str | os.PathLike, expect_dim: int | None = None, check_finite: bool = True,
               min_rows: int = 1) -> np.ndarray:
    """Open an embedding file as an (N, d) float32 array (memory-mapped where possible).
    ``min_rows``: fewer rows are refused (training needs at least 2 to compute statistics)."""
    p = Path(path)
    if not p.is_file():
        raise MsaeError(f"{p}: no such file")
    if is_cache(p):
        arr = open_cache(p, expect_dim=expect_dim, check_finite=check_finite).embeddings
    else:
        arr = _open(p)
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise MsaeError(f"{p}: expected a 2-D array of embeddings (N, d), got shape {list(arr.shape)}")
        if expect_dim is not None and arr.shape[1] != expect_dim:
            raise MsaeError(f"{p}: expected embeddings of dimension {expect_dim}, got {arr.shape[1]}")
        if arr.dtype == np.float32 and check_finite:
            check_embeddings(arr, str(p))
        arr = to_float32(arr, str(p))
    if arr.shape[0] < min_rows:
        raise MsaeError(f"{p}: {arr.shape[0]} row(s); expected at least {min_rows}")
    return arr


def mappable(path: str | os.PathLike) -> bool:
    """Whether :func:`load_array` returns a view of the file's own pages (float32 stored as such),
    so that processes on one machine share it through the page cache without a copy."""
    p = Path(path)
    if is_cache(p):
        return cache_info(p).dtype == "float32"
    return _open(p).dtype == np.float32


def _open(p: Path) -> np.ndarray:
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "magic" not in str(e).lower() and "pickle" not in str(e).lower():
            raise MsaeError(f"{p}: unreadable .npy file ({e})") from e
    except (OSError, EOFError) as e:
        if not _REFERENCE_NAME.search(p.name):
            raise MsaeError(f"{p}: unreadable file ({e})") from e
    m = _REFERENCE_NAME.search(p.name)
    if not m:
        raise MsaeError(f"{p}: not a .npy file, and the name does not end in _N_D.npy "
                        "(the reference code's headerless float32 format)")
    n, d = int(m.group(1)), int(m.group(2))
    size = p.stat().st_size
    if size != n * d * 4:
        raise MsaeError(f"{p}: headerless float32 file should hold {n}x{d} values ({n * d * 4} bytes), "
                        f"found {size} bytes")
    return np.memmap(p, dtype=np.float32, mode="r", shape=(n, d))


def fingerprint(arr: np.ndarray, rows: int = 1024) -> str:
    """Sampled fingerprint of a data array: its shape, dtype and up to ``rows`` evenly spaced rows."""
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype}".encode())
    idx = np.unique(np.linspace(0, arr.shape[0] - 1, num=min(rows, arr.shape[0])).astype(np.int64))
    h.update(np.ascontiguousarray(arr[idx]).tobytes())
    return "sha256-sampled:" + h.hexdigest()[:32]


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; an explicit device must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MsaeError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise MsaeError(f"--device {name}: no such CUDA device here ({count} available); use auto or cpu")
    elif device.type != "cpu":
        raise MsaeError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def to_tensor(x, device: torch.device | str) -> torch.Tensor:
    """A tensor of a tensor, numpy array or nested list (read-only arrays without a warning or a copy on CPU)."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, np.ndarray):
        return as_tensor(x, torch.device("cpu")).to(device)
    return torch.as_tensor(x, device=device)


def as_tensor(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """The whole array as a tensor: zero-copy on CPU, one transfer on a GPU when it fits."""
    if device.type == "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmap: we never write to it
            return torch.from_numpy(np.asarray(arr))
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device)


class ShuffledBatches:
    """Per-epoch shuffled batches by one vectorised index gather from a contiguous tensor."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def __len__(self) -> int:
        return -(-self.data.shape[0] // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.data.shape[0], generator=gen).to(self.data.device)
        for s in range(0, perm.numel(), self.batch_size):
            yield self.data.index_select(0, perm[s:s + self.batch_size])


def batches(data: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """In-order batches (evaluation)."""
    for s in range(0, data.shape[0], batch_size):
        yield data[s:s + batch_size]
