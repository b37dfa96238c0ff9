"""ReLU SAE with an L1 penalty normalised by the input norm."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from msae.config import SAEConfig, check_number
from msae.sae.base import SAE, StepOutput
from msae.sae.method import Hyper, Method


@dataclass(frozen=True)
class ReLUConfig(SAEConfig):
    method: ClassVar[str] = "relu"
    l1: float = 0.003  # lambda: loss = recon + l1 * mean_b(||z_b||_1 / ||x'_b||_2)

    def validate(self) -> None:
        super().validate()
        check_number("l1", self.l1, 0.0)


def l1_penalty(z: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
    """mean over the batch of ||z_b||_1 / ||x'_b||_2."""
    return (z.abs().sum(1) / xp.norm(dim=1).clamp_min(1e-12)).mean()


class ReLUSAE(SAE):
    cfg: ReLUConfig

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def training_step(self, xp, recon_loss, dead=None) -> StepOutput:
        pre = self.pre_activation(xp)
        z = torch.relu(pre)
        recon = self.decode_processed(z)
        rec = recon_loss(recon, xp)
        sparsity = l1_penalty(z, xp)
        loss = rec + self.cfg.l1 * sparsity
        nz = z > 0
        out = StepOutput(loss, recon, nz.sum(0), float(nz.sum(1).float().mean()),
                         {"recon": rec.detach(), "l1": sparsity.detach()})
        return self.with_auxk(out, xp, pre.detach(), dead)


def dense_loss(sae: ReLUSAE, xp: torch.Tensor, recon_loss) -> torch.Tensor:
    """Reference-style: dense code, dense decode, plain autograd."""
    z = torch.relu((xp - sae.b_dec) @ sae.W_enc + sae.b_enc)
    return recon_loss(z @ sae.W_dec + sae.b_dec, xp) + sae.cfg.l1 * (z.abs().sum(1) / xp.norm(dim=1)).mean()


METHOD = Method(
    name="relu", summary="ReLU SAE with an L1 penalty (normalised by the input norm)",
    config=ReLUConfig, sae=ReLUSAE, dense_loss=dense_loss,
    hypers=(Hyper("l1", "float", "L1 coefficient lambda", low=0.0, key="l1"),),
    default_lr=5e-5, progressive=False, examples={"relu": {"l1": 0.003}})
