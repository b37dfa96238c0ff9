"""Metrics with the paper's definitions and the conventional ones, named plainly.

Pure functions work on one batch; :class:`ReconStats` accumulates over a data set in float64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def fvu_per_sample(x: torch.Tensor, xh: torch.Tensor, var_x: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's FVU per sample: Var_d(x - x^) / Var_d(x)  -> [B] (``var_x``: Var_d(x), when known)."""
    return (x - xh).var(dim=1, unbiased=False) / (sample_var(x) if var_x is None else var_x)


def sample_var(x: torch.Tensor) -> torch.Tensor:
    """Var_d(x) per sample, kept away from zero (the FVU's denominator)."""
    return x.var(dim=1, unbiased=False).clamp_min(1e-30)


def fvu_dataset(x: torch.Tensor, xh: torch.Tensor) -> float:
    """Conventional data-set FVU: sum ||x - x^||^2 / sum ||x - mean(x)||^2."""
    return float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def nmse_per_sample(x: torch.Tensor, xh: torch.Tensor, msq_x: torch.Tensor | None = None) -> torch.Tensor:
    """|x^ - x|^2 / |x|^2 per sample (``msq_x``: mean_d(x^2), when known)."""
    return (xh - x).pow(2).mean(1) / (x.pow(2).mean(1).clamp_min(1e-30) if msq_x is None else msq_x)


def cosine_per_sample(x: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(x, xh, dim=1, eps=1e-12)


def l0_per_sample(z: torch.Tensor) -> torch.Tensor:
    """Count of non-zero latents per sample (the conventional L0)."""
    return (z != 0).sum(1).to(torch.float64)


def zero_fraction(z: torch.Tensor) -> float:
    """Fraction of zero entries: what the reference code calls 'L0' (the paper's '~80% sparsity')."""
    return float((z == 0).to(torch.float64).mean())


def dead_fraction(z: torch.Tensor) -> float:
    """Fraction of latents that never fire on these samples."""
    return float((~(z != 0).any(0)).to(torch.float64).mean())


@torch.no_grad()
def decoder_orthogonality(W_dec: torch.Tensor) -> float:
    """Mean over all n^2 entries of the squared off-diagonal of W_dec W_dec^T, in float64.
    ||W W^T||_F^2 = ||W^T W||_F^2, so the n x n Gram is never formed when d < n (a d x d one,
    n / d times cheaper); the diagonal's part is sum_i |w_i|^4."""
    n, d = W_dec.shape
    W = W_dec.detach().to(torch.float64)
    gram = W.t() @ W if d < n else W @ W.t()
    return (float(gram.pow(2).sum()) - float(W.pow(2).sum(1).pow(2).sum())) / (n * n)


def _hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    m = K.shape[0]
    Kt = K.clone().fill_diagonal_(0)
    Lt = L.clone().fill_diagonal_(0)
    return ((Kt * Lt.t()).sum() + Kt.sum() * Lt.sum() / ((m - 1) * (m - 2))
            - 2 * (Kt.sum(0) @ Lt.sum(1)) / (m - 2)) / (m * (m - 3))  # sum(Kt @ Lt) in O(m^2)


def _cosine_gram(a: torch.Tensor) -> torch.Tensor:
    """a_n a_n^T for the L2-normalised rows a_n of ``a``, in float64; a sparse ``a`` (an SAE code:
    under a tenth non-zero) through its CSR form, which costs its non-zeros instead of m^2 x n."""
    a = F.normalize(a.to(torch.float64), dim=1)
    if a.device.type == "cpu" and int(torch.count_nonzero(a)) < 0.1 * a.numel():
        return (a.to_sparse_csr() @ a.t()).to_dense()
    return a @ a.t()


@torch.no_grad()
def cknna(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mutual k-NN kernel alignment (Huh et al. 2024, 'Platonic Representation'), unbiased HSIC,
    on L2-normalised rows with linear kernels. Depends on the number of rows: fix and record it."""
    if a.shape[0] != b.shape[0] or a.shape[0] < max(4, k + 1):
        raise ValueError("cknna: need the same number of rows, at least max(4, k + 1)")
    K, L = _cosine_gram(a), _cosine_gram(b)
    n = K.shape[0]

    def sim(P, Q):
        mask_p = torch.zeros(n, n, dtype=P.dtype).scatter_(1, P.clone().fill_diagonal_(float("-inf")).topk(k, 1).indices, 1)
        mask_q = torch.zeros(n, n, dtype=P.dtype).scatter_(1, Q.clone().fill_diagonal_(float("-inf")).topk(k, 1).indices, 1)
        mask = mask_p * mask_q
        return _hsic_unbiased(mask * P, mask * Q)

    return float(sim(K, L) / (torch.sqrt(sim(K, K) * sim(L, L)) + 1e-6))


class RowSums(NamedTuple):
    """Per-row sums of a reconstruction ``ah`` against its input ``a`` over the last dimension
    (float64 [B] each): the residual's sum and sum of squares, <a, ah> and |ah|^2. Every
    reconstruction metric of a batch follows from these and the input's own sums."""

    err: torch.Tensor
    err_sq: torch.Tensor
    dot: torch.Tensor
    sq: torch.Tensor

    @classmethod
    def of(cls, a: torch.Tensor, ah: torch.Tensor) -> "RowSums":
        """In the inputs' dtype (the reductions run over d only), the results in float64."""
        e = a - ah
        f = torch.float64
        return cls(e.sum(-1).to(f), torch.linalg.vecdot(e, e).to(f), torch.linalg.vecdot(a, ah).to(f),
                   torch.linalg.vecdot(ah, ah).to(f))


class Originals:
    """One batch's inputs (original ``x`` and processed ``xp``) with what every reconstruction of
    that batch is compared against, computed once (evaluate() measures several ks of one batch)."""

    def __init__(self, x: torch.Tensor, xp: torch.Tensor):
        self.x, self.xp = x, xp
        x64, xp64 = x.to(torch.float64), xp.to(torch.float64)
        self.d = x.shape[1]
        self.var_x, self.var_xp = sample_var(x64), sample_var(xp64)
        self.sq_x, self.sq_xp = x64.pow(2).sum(1), xp64.pow(2).sum(1)
        self.msq_xp = (self.sq_xp / self.d).clamp_min(1e-30)
        self.sum_sq = float(self.sq_x.sum())
        self.sum_x = x64.sum(0).cpu()


def _cosine(dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    """``cosine_per_sample`` from the row sums (the same eps)."""
    return dot / (sq_a * sq_b).clamp_min(1e-24).sqrt()


class ReconStats:
    """Streams reconstruction metrics over batches, in original and processed space."""

    def __init__(self, n: int):
        self.n = n
        self.rows = 0
        self.sums: dict[str, float] = {}
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum_x: torch.Tensor | None = None
        self.fired = torch.zeros(n, dtype=torch.bool)
        self.act = [0.0, 0.0, 0.0]  # count, sum, sum of squares of non-zero code values

    def _add(self, name: str, per_sample: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(per_sample.to(torch.float64).sum())

    @torch.no_grad()
    def update(self, x, xh, xp, xph, z) -> None:
        """Add a batch; ``z`` the dense code, or None when :meth:`update_code` adds the code's part."""
        self.add(Originals(x, xp), xh, xph, z)

    @torch.no_grad()
    def add(self, orig: Originals, xh: torch.Tensor, xph: torch.Tensor, z: torch.Tensor | None) -> None:
        """:meth:`update` against a batch's precomputed :class:`Originals`."""
        self.add_sums(orig, RowSums.of(orig.x, xh), RowSums.of(orig.xp, xph))
        if z is not None:
            nz = z != 0
            v = z[nz].to(torch.float64)
            self.update_code(nz.sum(1).to(torch.float64), nz.any(0), (v.numel(), float(v.sum()), float(v.pow(2).sum())))

    def add_sums(self, orig: Originals, s: RowSums, sp: RowSums) -> None:
        """The reconstruction part of :meth:`add` from its row sums in original (``s``) and
        processed (``sp``) space: the paper's per-sample FVU Var_d(x - x^) / Var_d(x), cosine, the
        processed-space pair, NMSE |x^ - x|^2 / |x|^2 (processed) and the data-set FVU's sums."""
        d = orig.d
        self.rows += s.err.shape[0]
        self._add("fvu", (s.err_sq / d - (s.err / d) ** 2).clamp_min(0) / orig.var_x)
        self._add("cosine", _cosine(s.dot, orig.sq_x, s.sq))
        self._add("fvu_processed", (sp.err_sq / d - (sp.err / d) ** 2).clamp_min(0) / orig.var_xp)
        self._add("cosine_processed", _cosine(sp.dot, orig.sq_xp, sp.sq))
        self._add("nmse", sp.err_sq / d / orig.msq_xp)
        self.sse += float(s.err_sq.sum())
        self.sum_sq += orig.sum_sq
        self.sum_x = orig.sum_x if self.sum_x is None else self.sum_x + orig.sum_x

    def update_code(self, l0: torch.Tensor, fired: torch.Tensor, act: tuple[float, float, float]) -> None:
        """The code's part of :meth:`update` from its summary: per-sample non-zero counts, which
        latents fired in the batch (bool [n]) and the count, sum and sum of squares of its non-zero
        values."""
        self._add("l0", l0)
        self.fired |= fired.cpu()
        for i, a in enumerate(act):
            self.act[i] += a

    def result(self) -> dict[str, float]:
        N = max(self.rows, 1)
        out = {k: v / N for k, v in self.sums.items()}
        centred = self.sum_sq - float(self.sum_x.pow(2).sum()) / N
        out["fvu_dataset"] = self.sse / max(centred, 1e-30)
        out["zero_fraction"] = 1.0 - out["l0"] / self.n
        out["dead_fraction"] = float((~self.fired).to(torch.float64).mean())
        c, s, s2 = self.act
        out["act_mean"] = s / c if c else 0.0
        out["act_std"] = (max(s2 / c - (s / c) ** 2, 0.0)) ** 0.5 if c else 0.0
        out["rows"] = self.rows
        return out
