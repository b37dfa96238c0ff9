"""TopK SAE: per sample, ReLU of the k largest pre-activations."""
from __future__ import annotations

import torch

from msae.sae.base import SAE, StepOutput, fire_counts, topk_relu_dense


class TopKSAE(SAE):
    method = "topk"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_relu_dense(pre, self.cfg.k)

    def training_step(self, xp, recon_loss, dead=None) -> StepOutput:
        with torch.no_grad():
            pre = self.pre_activation(xp)
        code = self.sparse_topk_code(xp, pre, self.cfg.k)
        recon = self.decode_sparse(code)
        rec = recon_loss(recon, xp)
        out = StepOutput(rec, recon, fire_counts(code.col, self.n), code.col.numel() / xp.shape[0],
                         {"recon": rec.detach()})
        return self.with_auxk(out, xp, pre, dead)
