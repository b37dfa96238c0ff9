"""Matryoshka SAE (MSAE): nested TopK levels k_1 < ... < k_L over one dictionary.

Level i's code is the top-k_i of the same pre-activations, so the sets are nested. One training
step makes ONE nested selection (unsorted top-k inside the previous level's set, never a full
sort), keeps only positive entries, splits them into rank chunks (chunk i = level i minus level
i-1), decodes each chunk sparsely once, and forms every level's reconstruction as a cumulative
sum of chunk decodes. Levels above the largest positive count of the batch equal the level below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from msae.config import SAEConfig, check_k, doubling_levels
from msae.errors import MsaeError
from msae.sae.base import SAE, StepOutput, fire_counts, topk_relu_dense
from msae.sae.dense import dense_topk
from msae.sae.kernels import Entries, SparseRows, gather_selected, native_level_errors, sparse_decode
from msae.sae.native import kernels
from msae.sae.method import Hyper, Method

WEIGHTINGS = ("uw", "rw")


def weighting_alphas(weighting: str, n_levels: int) -> tuple[float, ...]:
    """UW: all ones. RW: L, L-1, ..., 1 for ascending k (the smallest k weighs most)."""
    if weighting == "uw":
        return tuple(1.0 for _ in range(n_levels))
    if weighting == "rw":
        return tuple(float(n_levels - i) for i in range(n_levels))
    raise MsaeError(f"weighting: expected 'uw' or 'rw', got {weighting!r}")


@dataclass(frozen=True)
class MatryoshkaConfig(SAEConfig):
    method: ClassVar[str] = "msae"
    levels: tuple[int, ...] = ()  # ascending k_1 < ... < k_L
    alphas: tuple[float, ...] | None = None  # one weight per level; None: from ``weighting``
    weighting: str | None = None  # 'uw', 'rw' (default) or 'custom' (explicit alphas)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.levels, (tuple, list)) or not self.levels:
            raise MsaeError("levels: method msae needs a list of levels")
        for k in self.levels:
            check_k("levels", k, self.n)
        levels = tuple(self.levels)
        if any(b <= a for a, b in zip(levels, levels[1:])):
            raise MsaeError(f"levels: must be strictly ascending, got {list(levels)}")
        object.__setattr__(self, "levels", levels)
        if self.alphas is None:
            weighting = self.weighting or "rw"
            object.__setattr__(self, "alphas", weighting_alphas(weighting, len(levels)))
            object.__setattr__(self, "weighting", weighting)
            return
        if not isinstance(self.alphas, (tuple, list)) or any(
                isinstance(a, bool) or not isinstance(a, (int, float)) for a in self.alphas):
            raise MsaeError(f"alphas: expected a list of numbers, got {self.alphas!r}")
        alphas = tuple(float(a) for a in self.alphas)
        if len(alphas) != len(levels):
            raise MsaeError(f"alphas: expected {len(levels)} weights (one per level), got {len(alphas)}")
        if any(not math.isfinite(a) or a < 0 for a in alphas) or sum(alphas) <= 0:
            raise MsaeError(f"alphas: expected non-negative weights with a positive sum, got {list(alphas)}")
        object.__setattr__(self, "alphas", alphas)
        if self.weighting is None:
            object.__setattr__(self, "weighting", "custom")

    @property
    def own_k(self) -> int:
        return self.levels[-1]


def nested_chunk_ids(pre: torch.Tensor, levels: tuple[int, ...]):
    """Select the nested top-k sets of ``pre`` rows.

    Returns (idx [B, K], chunk [B, K], n_chunks): for each row the K selected latent indices
    (K <= k_L, enough to hold every positive entry of the batch) and the chunk of each, where
    chunk c holds the entries in level c but not in level c-1. Chunks past ``n_chunks - 1`` are
    empty of positive entries and are not represented.
    """
    B, n = pre.shape
    npos = int((pre > 0).sum(1).max()) if pre.numel() else 0
    j = next((i for i, k in enumerate(levels) if k >= npos), len(levels) - 1)
    K = max(1, min(levels[j], npos))
    if K >= n:
        vals, idx = pre, None
    else:
        vals, idx = pre.topk(K, dim=1, sorted=False)
    chunk = torch.full(vals.shape, j, dtype=torch.int8, device=pre.device)
    cur_v, cur_pos = vals, None
    for i in reversed(range(j)):
        v, p = cur_v.topk(levels[i], dim=1, sorted=False)
        pos = p if cur_pos is None else cur_pos.gather(1, p)
        chunk.scatter_(1, pos, i)
        cur_v, cur_pos = v, pos
    if idx is None:
        idx = torch.arange(n, device=pre.device).expand(B, n)
    return vals, idx, chunk, j + 1


class MatryoshkaSAE(SAE):
    cfg: MatryoshkaConfig

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_relu_dense(pre, self.cfg.levels[-1])

    def code_topk(self) -> int:
        return self.cfg.levels[-1]

    def training_step(self, xp, recon_loss, dead=None) -> StepOutput:
        with torch.no_grad():
            pre = self.pre_activation(xp)
        native = kernels() if xp.device.type == "cpu" and xp.dtype == torch.float32 else None
        if native is not None:
            sq, recons, entries = self._native_levels(xp, pre, native)
            fired, count = entries.fired, entries.col.numel()
            level_losses = recon_loss.from_squares(sq, xp)  # [n_chunks]
        else:
            recons, col = self._torch_levels(xp, pre)
            fired, count = fire_counts(col, self.n), col.numel()
            level_losses = recon_loss(recons, xp)
        B, levels, alphas = xp.shape[0], self.cfg.levels, self.cfg.alphas
        n_chunks = recons.shape[1]
        # Levels past the last non-empty chunk reconstruct exactly like it.
        weights = list(alphas[: n_chunks - 1]) + [sum(alphas[n_chunks - 1 :])]
        loss = (level_losses * level_losses.new_tensor(weights)).sum() / sum(alphas)
        per_level = level_losses.detach().unbind()
        parts = {"recon": per_level[-1]}
        parts.update({f"recon_k{k}": per_level[min(i, n_chunks - 1)] for i, k in enumerate(levels)})
        out = StepOutput(loss, recons[:, -1], fired, count / B, parts)
        return self.with_auxk(out, xp, pre, dead)

    def _native_levels(self, xp, pre, native) -> tuple[torch.Tensor, torch.Tensor, Entries]:
        """Each non-empty chunk's cumulative reconstruction's squared error [B, chunks] and the
        reconstructions [B, chunks, d], with the C++ kernels: one nested selection (no sort), one
        decode pass writing every (row, chunk) partial sum and its error, and a backward that
        visits every entry once per product, each chunk taking the gradient of its own level and
        of every level above it."""
        levels = torch.tensor(self.cfg.levels, dtype=torch.long)
        with torch.no_grad():
            crow, rows, col, chunk, pre_val, used, chunk_counts, _ = native.nested_select(pre.contiguous(), levels)
            entries = Entries.build(native, crow, col, self.n, self.d, rows, chunk)
        C = max(int(used), 1)
        val = gather_selected(xp, self.b_dec, self.W_enc, self.b_enc, pre, crow, col, entries, pre_val)
        sq, recons = native_level_errors(val, self.W_dec, self.b_dec, xp, entries, C, chunk_counts)
        return sq, recons, entries

    def _torch_levels(self, xp, pre) -> tuple[torch.Tensor, torch.Tensor]:
        """The same with torch kernels (CUDA, or a CPU without the C++ kernels): per chunk, a CSR
        decode added to the running reconstruction."""
        B, n = xp.shape[0], self.n
        with torch.no_grad():
            vals, idx, chunk, n_chunks = nested_chunk_ids(pre, self.cfg.levels)
            positive = vals > 0
            crow = torch.zeros(B + 1, dtype=torch.long, device=xp.device)
            torch.cumsum(positive.sum(1), 0, out=crow[1:])
            col = idx[positive]
            chunk_flat = chunk[positive]
        val = gather_selected(xp, self.b_dec, self.W_enc, self.b_enc, pre, crow, col)
        recon = self.b_dec.expand_as(xp)
        recons = []
        for c in range(n_chunks):
            with torch.no_grad():
                sel = (chunk_flat == c).nonzero().squeeze(1)
                ccrow = torch.zeros(B + 1, dtype=torch.long, device=xp.device)
                torch.cumsum((positive & (chunk == c)).sum(1), 0, out=ccrow[1:])
            if sel.numel():
                recon = recon + sparse_decode(SparseRows(ccrow, col[sel], val[sel], n), self.W_dec)
            recons.append(recon)
        return torch.stack(recons, 1), col


def dense_loss(sae: MatryoshkaSAE, xp: torch.Tensor, recon_loss) -> torch.Tensor:
    """Reference-style: one sorted top-k and one dense decode per level."""
    pre = (xp - sae.b_dec) @ sae.W_enc + sae.b_enc
    total = 0.0
    for k, a in zip(sae.cfg.levels, sae.cfg.alphas):
        total = total + a * recon_loss(dense_topk(pre, k) @ sae.W_dec + sae.b_dec, xp)
    return total / sum(sae.cfg.alphas)


def build(d: int, n: int, values: dict[str, Any]) -> MatryoshkaConfig:
    """Levels from an explicit list, else doubling from ``levels_from`` (default 64, at most n) up to n."""
    levels = values.get("levels") or doubling_levels(values.get("levels_from") or min(64, n), n)
    return MatryoshkaConfig(d=d, n=n, levels=tuple(levels), alphas=values.get("alphas"),
                            weighting=values.get("weighting"))


METHOD = Method(
    name="msae", summary="Matryoshka SAE: nested TopK levels k_1 < ... < k_L over one dictionary",
    config=MatryoshkaConfig, sae=MatryoshkaSAE, dense_loss=dense_loss,
    hypers=(Hyper("levels_from", "int", "levels double from this k up to n, then n (default 64)", low=1, key="from"),
            Hyper("levels", "int_list", "explicit ascending level list", low=1, key="levels"),
            Hyper("weighting", "choice", "level weighting: uw (uniform) or rw (reverse: smallest k weighs most; "
                  "default)", choices=WEIGHTINGS, key=""),
            Hyper("alphas", "float_list", "explicit level weights, one per level", low=0.0, sweep=False)),
    exclusive=(("weighting", "alphas"),), one_of=(("levels_from", "levels"),),
    build=build, default_lr=1e-4, progressive=True,
    examples={"msae-rw": {"levels_from": 4, "weighting": "rw"},
              "msae-uw-partial": {"levels": [4, 8, 16], "weighting": "uw"}})
