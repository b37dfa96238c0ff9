"""Preprocessing statistics of the TRAIN set (recipe section 2), computed in float64 chunks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """x' = (x - mean) * scale. ``scaling``: 'conventional' s = sqrt(d / E||x - mu||^2) (so that
    E||x'||^2 = d), 'reference' s = sqrt(d) / E||x - mu||^2 (the reference code's quirk), 'none'."""

    mean: np.ndarray
    scale: float
    scaling: str
    mean_center: bool


def fit_preprocessing(x: np.ndarray, scaling: str = "conventional", mean_center: bool = True,
                      chunk: int = 65536) -> Preprocessing:
    n, d = x.shape
    total = np.zeros(d, dtype=np.float64)
    for s in range(0, n, chunk):
        total += x[s:s + chunk].sum(0, dtype=np.float64)
    mu = total / n if mean_center else np.zeros(d)
    sq = 0.0
    for s in range(0, n, chunk):
        diff = x[s:s + chunk].astype(np.float64) - mu
        sq += float(np.einsum("ij,ij->", diff, diff))
    msq = sq / n  # E ||x - mu||^2
    if scaling == "conventional":
        scale = math.sqrt(d / msq) if msq > 0 else 1.0
    elif scaling == "reference":
        scale = math.sqrt(d) / msq if msq > 0 else 1.0
    elif scaling == "none":
        scale = 1.0
    else:
        raise ValueError(f"scaling: unknown mode {scaling!r}")
    return Preprocessing(mu.astype(np.float32), float(scale), scaling, mean_center)
