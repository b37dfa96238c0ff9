"""Matryoshka SAE (MSAE): nested TopK levels k_1 < ... < k_L over one dictionary.

Level i's code is the top-k_i of the same pre-activations, so the sets are nested. One training
step makes ONE nested selection (unsorted top-k inside the previous level's set, never a full
sort), keeps only positive entries, splits them into rank chunks (chunk i = level i minus level
i-1), decodes each chunk sparsely once, and forms every level's reconstruction as a cumulative
sum of chunk decodes. Levels above the largest positive count of the batch equal the level below.
"""
from __future__ import annotations

import torch

from msae.sae.base import SAE, StepOutput, fire_counts, topk_relu_dense
from msae.sae.kernels import SparseRows, gather_selected, sparse_decode


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
    method = "msae"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_relu_dense(pre, self.cfg.levels[-1])

    def training_step(self, xp, recon_loss, dead=None) -> StepOutput:
        B, n = xp.shape[0], self.n
        levels, alphas = self.cfg.levels, self.cfg.alphas
        with torch.no_grad():
            pre = self.pre_activation(xp)
            vals, idx, chunk, n_chunks = nested_chunk_ids(pre, levels)
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
        level_losses = [recon_loss(r, xp) for r in recons]
        # Levels past the last non-empty chunk reconstruct exactly like it.
        weights = list(alphas[: n_chunks - 1]) + [sum(alphas[n_chunks - 1 :])]
        loss = sum(w * lv for w, lv in zip(weights, level_losses)) / sum(alphas)
        parts = {"recon": level_losses[-1].detach()}
        parts.update({f"recon_k{k}": level_losses[min(i, n_chunks - 1)].detach() for i, k in enumerate(levels)})
        out = StepOutput(loss, recon, fire_counts(col, n), col.numel() / B, parts)
        return self.with_auxk(out, xp, pre, dead)
