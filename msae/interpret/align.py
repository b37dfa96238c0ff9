"""Seed alignment (the reference's alignment metric): how far two SAEs (e.g. two seeds) learned the
same dictionary. Unit-normalised decoder rows (or encoder columns) of both, the full n x n cosine
matrix, the Hungarian assignment that maximises the total matched cosine; the score is the mean
matched cosine (1.0 for a model against itself)."""
from __future__ import annotations

import numpy as np
import torch

from msae.errors import MsaeError

BY = ("decoder", "encoder")


def directions(sae, by: str) -> np.ndarray:
    """[n, d] unit rows: decoder rows, or encoder columns."""
    if by not in BY:
        raise MsaeError(f"--by: expected one of {', '.join(BY)}, got {by!r}")
    W = sae.W_dec.detach() if by == "decoder" else sae.W_enc.detach().T
    W = W.float().cpu()
    return (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


def align(a: np.ndarray, b: np.ndarray, bins: int = 20, chunk: int = 4096) -> dict:
    """Mean matched cosine of two [n, d] unit-row matrices (n may differ: min(n_a, n_b) matches),
    the histogram of matched cosines over [-1, 1], and the matching itself.

    Memory: one float64 [n_a, n_b] matrix (the solver's own type), filled in row blocks with the
    NEGATED cosines so that the solver minimises it in place (``maximize=True`` would copy it)."""
    from scipy.optimize import linear_sum_assignment

    if a.shape[1] != b.shape[1]:
        raise MsaeError(f"align: the models have different dimensions ({a.shape[1]} and {b.shape[1]})")
    neg = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    bt = torch.from_numpy(np.ascontiguousarray(b)).T
    for s in range(0, a.shape[0], chunk):
        neg[s:s + chunk] = (torch.from_numpy(np.ascontiguousarray(a[s:s + chunk])) @ bt).neg_().numpy()
    rows, cols = linear_sum_assignment(neg)
    matched = -neg[rows, cols]
    del neg
    counts, edges = np.histogram(matched, bins=bins, range=(-1.0, 1.0))
    return {"mean_cosine": float(matched.mean()), "matched": int(matched.size),
            "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()},
            "fraction_above_0.9": float((matched > 0.9).mean()), "pairs": np.stack([rows, cols], 1)}
