"""BatchTopK SAE: the k*B largest activations over the batch during training; at inference a
learned threshold (running estimate of the smallest kept value), so that a sample's code never
depends on the rest of its batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from msae.config import SAEConfig, check_k, check_number
from msae.errors import MsaeError
from msae.sae.base import SAE, StepOutput, fire_counts, topk_relu_dense
from msae.sae.kernels import SparseRows, gather_selected
from msae.sae.method import Hyper, Method
from msae.sae.topk import K


@dataclass(frozen=True)
class BatchTopKConfig(SAEConfig):
    method: ClassVar[str] = "batchtopk"
    k: int = 32
    threshold_decay: float = 0.99  # EMA decay of the inference threshold, per training step

    def validate(self) -> None:
        super().validate()
        check_k("k", self.k, self.n)
        if not 0 <= check_number("threshold_decay", self.threshold_decay, 0.0) < 1:
            raise MsaeError(f"threshold_decay: expected a number in [0, 1), got {self.threshold_decay!r}")

    @property
    def own_k(self) -> int:
        return self.k


class BatchTopKSAE(SAE):
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, generator: torch.Generator | None = None):
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
                    self.threshold.lerp_(smallest, 1 - self.cfg.threshold_decay)
        val = gather_selected(xp, self.b_dec, self.W_enc, self.b_enc, pre, crow, col)
        code = SparseRows(crow, col, val, n)
        recon = self.decode_sparse(code)
        rec = recon_loss(recon, xp)
        out = StepOutput(rec, recon, fire_counts(col, n), col.numel() / B, {"recon": rec.detach(),
                         "threshold": self.threshold.clone()})
        return self.with_auxk(out, xp, pre, dead)


def dense_loss(sae: BatchTopKSAE, xp: torch.Tensor, recon_loss) -> torch.Tensor:
    pre = (xp - sae.b_dec) @ sae.W_enc + sae.b_enc
    flat = torch.relu(pre).flatten()
    top = torch.topk(flat, sae.cfg.k * xp.shape[0])
    z = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
    return recon_loss(z @ sae.W_dec + sae.b_dec, xp)


METHOD = Method(
    name="batchtopk", summary="BatchTopK SAE: the k*B largest activations of a batch; a learned threshold at inference",
    config=BatchTopKConfig, sae=BatchTopKSAE, dense_loss=dense_loss,
    hypers=(K, Hyper("threshold_decay", "float", "EMA decay of the inference threshold", low=0.0, sweep=False)),
    default_lr=5e-4, progressive=True, examples={"batchtopk": {"k": 8}})
