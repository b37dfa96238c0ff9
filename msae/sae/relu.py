"""ReLU SAE with an L1 penalty normalised by the input norm."""
from __future__ import annotations

import torch

from msae.sae.base import SAE, StepOutput


class ReLUSAE(SAE):
    method = "relu"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def training_step(self, xp, recon_loss, dead=None) -> StepOutput:
        pre = self.pre_activation(xp)
        z = torch.relu(pre)
        recon = self.decode_processed(z)
        rec = recon_loss(recon, xp)
        sparsity = (z.abs().sum(1) / xp.norm(dim=1).clamp_min(1e-12)).mean()
        loss = rec + self.cfg.l1 * sparsity
        nz = z > 0
        out = StepOutput(loss, recon, nz.sum(0), float(nz.sum(1).float().mean()),
                         {"recon": rec.detach(), "l1": sparsity.detach()})
        return self.with_auxk(out, xp, pre.detach(), dead)
