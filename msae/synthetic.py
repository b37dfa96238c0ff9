"""CLIP-like synthetic embeddings with a known sparse dictionary (for demos, tests, benchmarks).

x = offset + sum_i a_i f_i + noise: unit feature directions f_i, power-law feature frequencies,
non-negative magnitudes, a large shared mean offset and anisotropic noise, like CLIP embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticData:
    x: np.ndarray  # (N, d) float32
    dictionary: np.ndarray  # (m, d) float32 unit rows
    codes_l0: float  # mean active features per sample


def make_synthetic(n_samples: int = 20000, d: int = 64, n_features: int = 256, active: float = 8.0,
                   offset_norm: float = 10.0, noise: float = 0.05, seed: int = 0) -> SyntheticData:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_features, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    freq = 1.0 / np.arange(1, n_features + 1) ** 0.7
    freq *= active / freq.sum()
    freq = np.clip(freq, 0, 0.9)
    on = rng.random((n_samples, n_features)) < freq
    mags = rng.exponential(1.0, size=(n_samples, n_features)) * on
    offset = rng.standard_normal(d)
    offset *= offset_norm / np.linalg.norm(offset)
    spectrum = np.linspace(2.0, 0.2, d)
    noise_v = rng.standard_normal((n_samples, d)) * spectrum * noise
    x = offset + mags @ feats + noise_v
    return SyntheticData(x.astype(np.float32), feats.astype(np.float32), float(on.sum(1).mean()))
