"""BatchTopK SAE: the k*B largest activations over the batch during training; at inference a
learned threshold (running estimate of the smallest kept value), so that a sample's code never
depends on the rest of its batch."""
from __future__ import annotations

import torch

from msae.config import SAEConfig
from msae.sae.base import SAE, StepOutput, fire_counts, topk_relu_dense
from msae.sae.kernels import SparseRows, gather_selected


class BatchTopKSAE(SAE):
    method = "batchtopk"
    threshold_decay = 0.99

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        # Negative means "not learned yet": inference then falls back to per-sample TopK(k).
        self.register_buffer("threshold", torch.full((), -1.0))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if float(self.threshold) < 0:
            return topk_relu_dense(pre, self.cfg.k)
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def training_step(self, xp, recon_loss, dead=None) -> StepOutput:
        B, n = xp.shape[0], self.n
        with torch.no_grad():
            pre = self.pre_activation(xp)
            vals, flat = torch.relu(pre).flatten().topk(min(self.cfg.k * B, B * n), sorted=False)
            keep = vals > 0
            flat = flat[keep].sort().values
            rows, col = flat // n, flat % n
            crow = torch.zeros(B + 1, dtype=torch.long, device=xp.device)
            torch.cumsum(torch.bincount(rows, minlength=B), 0, out=crow[1:])
            if bool(keep.any()):
                smallest = vals[keep].min()
                if float(self.threshold) < 0:
                    self.threshold.copy_(smallest)
                else:
                    self.threshold.lerp_(smallest, 1 - self.threshold_decay)
        val = gather_selected(xp, self.b_dec, self.W_enc, self.b_enc, pre, crow, col)
        code = SparseRows(crow, col, val, n)
        recon = self.decode_sparse(code)
        rec = recon_loss(recon, xp)
        out = StepOutput(rec, recon, fire_counts(col, n), col.numel() / B, {"recon": rec.detach(),
                         "threshold": self.threshold.clone()})
        return self.with_auxk(out, xp, pre, dead)
