"""Checks of embedding arrays, shared by every reader and writer (bottom of the import graph)."""
from __future__ import annotations

import numpy as np

from msae.errors import MsaeError

CHUNK_ROWS = 65536


def first_nonfinite_row(arr: np.ndarray, chunk: int = CHUNK_ROWS) -> int | None:
    """The first row holding NaN or Inf, or None (scanned in chunks: no whole-array temporaries)."""
    for s in range(0, arr.shape[0], chunk):
        ok = np.isfinite(arr[s:s + chunk]).all(axis=1)
        if not ok.all():
            return s + int(np.argmin(ok))
    return None


def first_row_beyond(arr: np.ndarray, limit: float, chunk: int = CHUNK_ROWS) -> int | None:
    """The first row with a finite value of magnitude above ``limit``, or None."""
    for s in range(0, arr.shape[0], chunk):
        with np.errstate(invalid="ignore"):
            bad = (np.abs(arr[s:s + chunk]) > limit).any(axis=1)
        if bad.any():
            return s + int(np.argmax(bad))
    return None


def check_embeddings(arr: np.ndarray, where: str, dtype: str = "float32") -> None:
    """Refuse (one line naming ``where`` and the row) NaN/Inf values and values that the storage
    ``dtype`` cannot hold (they would become Inf)."""
    bad = first_nonfinite_row(arr)
    if bad is not None:
        raise MsaeError(f"{where}: row {bad} contains NaN or Inf; expected finite embeddings")
    limit = float(np.finfo(np.dtype(dtype)).max)
    if np.dtype(arr.dtype).itemsize > np.dtype(dtype).itemsize or not np.issubdtype(arr.dtype, np.floating):
        row = first_row_beyond(arr, limit)
        if row is not None:
            raise MsaeError(f"{where}: row {row} holds a value beyond the {dtype} range (+-{limit:.6g}); "
                            f"expected embeddings that {dtype} can store")


def to_float32(arr: np.ndarray, where: str, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """``arr`` as float32: itself when it is float32, else a checked copy converted chunk by chunk."""
    if arr.dtype == np.float32:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise MsaeError(f"{where}: expected floating-point embeddings, got dtype {arr.dtype}")
    check_embeddings(arr, where, "float32")
    out = np.empty(arr.shape, dtype=np.float32)
    for s in range(0, arr.shape[0], chunk):
        out[s:s + chunk] = arr[s:s + chunk]
    return out
