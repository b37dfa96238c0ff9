"""Bias analysis on an attribute (paper Section 5, its CelebA study): which latents fire more, or
less, on rows that have the attribute?

Per latent, in each group (attribute 1 / 0): the firing rate and the mean activation (the model's
own code), and the standardised difference of activations (Cohen's d: difference of group means
over the pooled standard deviation) with a percentile confidence interval from a Poisson
bootstrap (each row weighted by a Poisson(1) draw per replicate, seeded), computed from weighted
sums in one pass over the data, so memory stays O(replicates x n).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from msae.data import to_tensor
from msae.errors import MsaeError


@dataclass(frozen=True)
class Bias:
    rate: np.ndarray  # [2, n] firing rate without / with the attribute
    mean: np.ndarray  # [2, n] mean activation without / with
    effect: np.ndarray  # [n] Cohen's d (with - without)
    ci: np.ndarray  # [2, n] confidence interval of the effect (low, high)
    counts: tuple[int, int]  # rows without / with


def _cohen(s: torch.Tensor, ss: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Effect from per-group sums [..., 2, n], sums of squares and counts [..., 2, 1]."""
    m = s / c
    var = (ss - c * m * m) / (c - 1).clamp_min(1)
    pooled = (((c[..., 0, :] - 1) * var[..., 0, :] + (c[..., 1, :] - 1) * var[..., 1, :])
              / (c[..., 0, :] + c[..., 1, :] - 2).clamp_min(1)).clamp_min(0).sqrt()
    return (m[..., 1, :] - m[..., 0, :]) / pooled.clamp_min(1e-12)


@torch.no_grad()
def attribute_bias(sae, data: np.ndarray, attribute: np.ndarray, *, replicates: int = 100, level: float = 0.95,
                   seed: int = 0, batch_size: int = 4096) -> Bias:
    a = np.asarray(attribute).astype(bool)
    if a.shape != (data.shape[0],):
        raise MsaeError(f"bias: {a.size} attribute values for {data.shape[0]} rows")
    counts = (int((~a).sum()), int(a.sum()))
    if min(counts) < 2:
        raise MsaeError(f"bias: the attribute splits the rows {counts[1]} / {counts[0]}; expected at least 2 in each group")
    g = torch.Generator().manual_seed(seed)
    n, R = sae.n, replicates
    S = torch.zeros(R + 1, 2, n, dtype=torch.float64)  # replicate 0: the data itself
    SS, C = torch.zeros_like(S), torch.zeros(R + 1, 2, 1, dtype=torch.float64)
    fires = torch.zeros(2, n, dtype=torch.float64)
    for s in range(0, data.shape[0], batch_size):
        xb = to_tensor(np.asarray(data[s:s + batch_size], dtype=np.float32), "cpu")
        z = sae.encode(xb).cpu().double()
        grp = torch.from_numpy(a[s:s + batch_size]).long()
        w = torch.cat([torch.ones(1, z.shape[0], dtype=torch.float64),
                       torch.poisson(torch.ones(R, z.shape[0], dtype=torch.float64), generator=g)])
        for k in (0, 1):
            sel = grp == k
            wk, zk = w[:, sel], z[sel]
            S[:, k] += wk @ zk
            SS[:, k] += wk @ (zk * zk)
            C[:, k, 0] += wk.sum(1)
            fires[k] += (zk > 0).sum(0).double()
    effect = _cohen(S, SS, C)  # [R + 1, n]
    q = (1 - level) / 2
    ci = torch.quantile(effect[1:], torch.tensor([q, 1 - q], dtype=torch.float64), dim=0)
    cnt = torch.tensor(counts, dtype=torch.float64)[:, None]
    return Bias(rate=(fires / cnt).numpy(), mean=(S[0] / C[0]).numpy(), effect=effect[0].numpy(), ci=ci.numpy(),
                counts=counts)
