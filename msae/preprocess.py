"""Preprocessing statistics of the TRAIN set (recipe section 2), in one chunked pass.

The pass also proves the array finite: a NaN or Inf anywhere makes the float64 sums non-finite,
and only then is the array scanned again to name the first bad row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from msae.arrays import first_nonfinite_row
from msae.config import SCALINGS
from msae.errors import MsaeError


@dataclass(frozen=True)
class Preprocessing:
    """x' = (x - mean) * scale. ``scaling``: 'conventional' s = sqrt(d / E||x - mu||^2) (so that
    E||x'||^2 = d), 'reference' s = sqrt(d) / E||x - mu||^2 (the reference code's quirk), 'none'."""

    mean: np.ndarray
    scale: float
    scaling: str
    mean_center: bool

    def record(self) -> dict:
        """How inputs are processed, as recorded in a checkpoint."""
        return {"scaling": self.scaling, "mean_center": self.mean_center, "scale": self.scale}


def fit_preprocessing(x: np.ndarray, scaling: str = "conventional", mean_center: bool = True,
                      chunk: int = 16384, where: str = "train data") -> Preprocessing:
    """Mean and scale of ``x`` (N, d) in one pass: per-chunk float64 column sums, and float32 dot
    products of 4096-row blocks accumulated in float64 for E||x||^2 (memory: one chunk at a time)."""
    if scaling not in SCALINGS:
        raise MsaeError(f"scaling: expected one of {', '.join(SCALINGS)}, got {scaling!r}")
    n, d = x.shape
    total = np.zeros(d, dtype=np.float64)
    sumsq = 0.0
    for s in range(0, n, chunk):
        c = np.ascontiguousarray(x[s:s + chunk], dtype=np.float32)
        total += c.sum(0, dtype=np.float64)
        flat = c.reshape(-1)
        for b in range(0, flat.size, 4096 * d):
            part = flat[b:b + 4096 * d]
            sumsq += float(np.dot(part, part))
    if not (np.isfinite(total).all() and math.isfinite(sumsq)):
        row = first_nonfinite_row(x)
        raise MsaeError(f"{where}: row {row} contains NaN or Inf; expected finite embeddings")
    mu = total / n if mean_center else np.zeros(d)
    msq = max(sumsq / n - (float(mu @ mu) if mean_center else 0.0), 0.0)  # E ||x - mu||^2
    if scaling == "conventional":
        scale = math.sqrt(d / msq) if msq > 0 else 1.0
    elif scaling == "reference":
        scale = math.sqrt(d) / msq if msq > 0 else 1.0
    else:
        scale = 1.0
    return Preprocessing(mu.astype(np.float32), float(scale), scaling, mean_center)
