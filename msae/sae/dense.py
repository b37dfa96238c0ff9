"""Straightforward dense implementations of every method's training loss, written the way the
reference code is (a top-k per level, a dense scatter, one dense decode per level, plain
autograd). The parity oracle for the fast paths in tests, and the baseline in bench/."""
from __future__ import annotations

import torch

from msae.sae.base import SAE, ReconLoss


def _dense_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = torch.topk(pre, k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


def dense_training_loss(sae: SAE, xp: torch.Tensor, recon_loss: ReconLoss) -> torch.Tensor:
    cfg = sae.cfg
    pre = (xp - sae.b_dec) @ sae.W_enc + sae.b_enc
    if cfg.method == "relu":
        z = torch.relu(pre)
        l1 = (z.abs().sum(1) / xp.norm(dim=1)).mean()
        return recon_loss(z @ sae.W_dec + sae.b_dec, xp) + cfg.l1 * l1
    if cfg.method == "topk":
        return recon_loss(_dense_topk(pre, cfg.k) @ sae.W_dec + sae.b_dec, xp)
    if cfg.method == "batchtopk":
        flat = torch.relu(pre).flatten()
        top = torch.topk(flat, cfg.k * xp.shape[0])
        z = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
        return recon_loss(z @ sae.W_dec + sae.b_dec, xp)
    if cfg.method == "msae":
        total = 0.0
        for k, a in zip(cfg.levels, cfg.alphas):
            total = total + a * recon_loss(_dense_topk(pre, k) @ sae.W_dec + sae.b_dec, xp)
        return total / sum(cfg.alphas)
    raise ValueError(cfg.method)
