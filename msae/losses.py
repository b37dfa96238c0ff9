"""Reconstruction losses (processed space)."""
from __future__ import annotations

import torch


def nmse(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of  mean_d (recon - x)^2 / mean_d x^2  (per sample)."""
    return ((recon - x).pow(2).mean(1) / x.pow(2).mean(1).clamp_min(1e-12)).mean()


def mse(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Plain mean over all elements."""
    return (recon - x).pow(2).mean()


LOSSES = {"nmse": nmse, "mse": mse}
