"""TopK SAE: per sample, ReLU of the k largest pre-activations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from msae.config import SAEConfig, check_k
from msae.sae.base import SAE, StepOutput, fire_counts, topk_relu_dense
from msae.sae.dense import dense_topk
from msae.sae.method import Hyper, Method


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    method: ClassVar[str] = "topk"
    k: int = 64

    def validate(self) -> None:
        super().validate()
        check_k("k", self.k, self.n)

    @property
    def own_k(self) -> int:
        return self.k


class TopKSAE(SAE):
    cfg: TopKConfig

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_relu_dense(pre, self.cfg.k)

    def code_topk(self) -> int:
        return self.cfg.k

    def training_step(self, xp, recon_loss, dead=None) -> StepOutput:
        with torch.no_grad():
            pre = self.pre_activation(xp)
        code = self.sparse_topk_code(xp, pre, self.cfg.k)
        recon = self.decode_sparse(code)
        rec = recon_loss(recon, xp)
        out = StepOutput(rec, recon, fire_counts(code.col, self.n), code.col.numel() / xp.shape[0],
                         {"recon": rec.detach()})
        return self.with_auxk(out, xp, pre, dead)


def dense_loss(sae: TopKSAE, xp: torch.Tensor, recon_loss) -> torch.Tensor:
    pre = (xp - sae.b_dec) @ sae.W_enc + sae.b_enc
    return recon_loss(dense_topk(pre, sae.cfg.k) @ sae.W_dec + sae.b_dec, xp)


K = Hyper("k", "int", "active latents per sample (TopK) or on average (BatchTopK)", low=1, key="k")

METHOD = Method(
    name="topk", summary="TopK SAE: ReLU of the k largest pre-activations of each sample",
    config=TopKConfig, sae=TopKSAE, dense_loss=dense_loss, hypers=(K,),
    default_lr=5e-4, progressive=True, examples={"topk": {"k": 8}})
