"""The SAE base class: parameters, preprocessing, the public encode/decode interface."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch
from torch import nn

from msae.config import SAEConfig, check_k
from msae.data import to_tensor
from msae.errors import MsaeError
from msae.losses import ReconLoss
from msae.sae.kernels import SparseRows, gather_selected, rect_to_rows, sparse_decode


@dataclass
class StepOutput:
    """What one training forward returns: the loss to minimise and what the trainer logs."""

    loss: torch.Tensor
    recon: torch.Tensor  # reconstruction of the model's own (largest) code, processed space
    fire_counts: torch.Tensor  # [n] int64, samples in which each latent fired
    l0: float  # mean non-zeros per sample of the model's own code
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars (no device sync)


class SAE(nn.Module):
    """One dictionary of n latents over d-dimensional inputs (SAELens parameter names).

    Public methods take and return tensors in ORIGINAL CLIP space (numpy arrays are accepted too);
    the ``*_processed`` methods work in the preprocessed space x' = (x - mean) * scale that the
    model is trained in.
    """

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d, cfg.n
        self.W_enc = nn.Parameter(torch.empty(d, n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("scale", torch.ones(()))
        self.reset_parameters(generator)

    # ---- initialisation -------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows: Kaiming-uniform directions at L2 norm 0.1; encoder = decoder^T."""
        n, d = self.W_dec.shape
        bound = math.sqrt(6.0 / d)  # kaiming_uniform_ with a=0, fan_in = d
        w = torch.rand(n, d, generator=generator) * (2 * bound) - bound
        w = 0.1 * w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def rescale_latents(self, norms: torch.Tensor) -> None:
        """Decoder rows were divided by ``norms``: scale what produces each latent by the same
        factor, so that a ReLU SAE computes the same function (recipe section 5, step 2)."""
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)

    # ---- preprocessing ----------------------------------------------------------------
    def set_preprocessing(self, mean: torch.Tensor, scale: float) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.scale.fill_(float(scale))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale

    def postprocess(self, xp: torch.Tensor) -> torch.Tensor:
        return xp / self.scale + self.mean

    # ---- the model's function ---------------------------------------------------------
    @property
    def d(self) -> int:
        return self.cfg.d

    @property
    def n(self) -> int:
        return self.cfg.n

    def pre_activation(self, xp: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, xp - self.b_dec, self.W_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The model's own code from pre-activations (dense [B, n]); per method."""
        raise NotImplementedError

    def code_topk(self) -> int | None:
        """k when the model's own code is ReLU of each row's top-k pre-activations (evaluation then
        builds it sparse, and shares it with that k's progressive level), else None."""
        return None

    def encode_processed(self, xp: torch.Tensor, k: int | None = None) -> torch.Tensor:
        pre = self.pre_activation(xp)
        if k is None:
            return self.activate(pre)
        return topk_relu_dense(pre, self._check_k(k))

    def decode_processed(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def encode(self, x, k: int | None = None) -> torch.Tensor:
        """Codes [B, n] of embeddings in original CLIP space. k=None: the model's own code (for an
        MSAE its largest level); an int k: ReLU(pre) restricted to its top-k."""
        return self.encode_processed(self.preprocess(self._check_input(x)), k)

    def decode(self, z) -> torch.Tensor:
        """Reconstructions in original CLIP space."""
        z = to_tensor(z, self.W_dec.device)
        if z.ndim != 2 or z.shape[1] != self.n:
            raise MsaeError(f"codes: expected shape [B, {self.n}], got {list(z.shape)}")
        return self.postprocess(self.decode_processed(z.to(self.W_dec.dtype)))

    def forward(self, x, k: int | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, k))

    def _check_k(self, k: int) -> int:
        check_k("k", k, self.n)
        return k

    def _check_input(self, x) -> torch.Tensor:
        x = to_tensor(x, self.W_enc.device)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise MsaeError(f"input: expected embeddings of shape [B, {self.d}], got {list(x.shape)}")
        return x.to(self.W_enc.dtype)

    # ---- training ---------------------------------------------------------------------
    def training_step(self, xp: torch.Tensor, recon_loss: ReconLoss, dead: torch.Tensor | None = None) -> StepOutput:
        """Loss of one batch in processed space (fast path); ``dead`` marks latents for AuxK."""
        raise NotImplementedError

    def sparse_topk_code(self, xp: torch.Tensor, pre: torch.Tensor, k: int) -> SparseRows:
        """Differentiable CSR code of ReLU(top-k(pre)), positives only."""
        vals, idx = pre.topk(k, dim=1, sorted=False)
        crow, col = rect_to_rows(vals, idx)
        val = gather_selected(xp, self.b_dec, self.W_enc, self.b_enc, pre, crow, col)
        return SparseRows(crow, col, val, self.n)

    def decode_sparse(self, code: SparseRows) -> torch.Tensor:
        return sparse_decode(code, self.W_dec) + self.b_dec

    def auxk_loss(self, xp, pre, recon, dead) -> torch.Tensor | None:
        """AuxK (Gao et al. 2024): reconstruct the residual from the top-k_aux dead latents."""
        if self.cfg.auxk is None or dead is None or not bool(dead.any()):
            return None
        k_aux = min(self.cfg.auxk, int(dead.sum()))
        masked = pre.masked_fill(~dead, float("-inf"))
        code = self.sparse_topk_code(xp, masked, k_aux)
        residual = (xp - recon).detach()
        aux = sparse_decode(code, self.W_dec)
        denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return self.cfg.auxk_coef * (aux - residual).pow(2).sum() / denom

    def with_auxk(self, out: StepOutput, xp, pre, dead) -> StepOutput:
        aux = self.auxk_loss(xp, pre, out.recon, dead)
        if aux is not None:
            out.loss = out.loss + aux
            out.parts["auxk"] = aux.detach()
        return out


def topk_relu_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense [B, n] code: ReLU of the k largest pre-activations per row, zeros elsewhere."""
    vals, idx = pre.topk(k, dim=1, sorted=False)
    return torch.zeros_like(pre).scatter_(1, idx, vals.clamp_min(0))


def fire_counts(col: torch.Tensor, n: int) -> torch.Tensor:
    """Samples in which each latent fired, from the columns of a CSR code."""
    return torch.bincount(col, minlength=n)
