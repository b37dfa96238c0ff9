"""Reconstruction losses (processed space).

A loss is a function of each sample's squared error ``sq = |recon - x|^2`` (summed over d) and of
``x``: :meth:`ReconLoss.from_squares` takes ``sq`` [B] (or [B, L], one column per level, as the
Matryoshka step computes them in its decode kernel) and returns a scalar (or the L per-level
losses). Calling the loss on ``recon`` [B, d] (or [B, L, d]) and ``x`` [B, d] computes ``sq`` first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class ReconLoss:
    name: str
    from_squares: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        diff = recon - (x.unsqueeze(1) if recon.dim() == 3 else x)
        return self.from_squares(diff.pow(2).sum(-1), x)


def _per_sample(t: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """A [B] vector shaped to divide ``sq`` ([B] or [B, L]) row-wise."""
    return t.view(-1, *([1] * (sq.dim() - 1)))


def _nmse(sq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of  mean_d (recon - x)^2 / mean_d x^2  (per sample)."""
    norm = x.pow(2).sum(-1).clamp_min(1e-12 * x.shape[-1])
    return (sq / _per_sample(norm, sq)).mean(0)


def _mse(sq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Plain mean over all elements (of each level)."""
    return sq.mean(0) / x.shape[-1]


nmse = ReconLoss("nmse", _nmse)
mse = ReconLoss("mse", _mse)
LOSSES = {"nmse": nmse, "mse": mse}
