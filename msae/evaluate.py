"""Evaluation of one SAE on a data set: every metric, per k (progressive recovery)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from msae.config import doubling_levels
from msae.data import as_tensor, batches
from msae.metrics import Originals, ReconStats, cknna, decoder_orthogonality
from msae.sae import SAE
from msae.sae.base import topk_relu_dense
from msae.sae.kernels import Entries, SparseRows
from msae.sae.native import kernels


SPARSE_DECODE_DENSITY = 0.05  # 10,000 rows, n 6144, k 32, one thread: 0.93 s dense, about 0.35 s so


def progressive_ks(n: int, start: int = 16) -> list[int]:
    """k = 16, 32, 64, ... up to n (n itself included): the doubling rule of MSAE levels."""
    return list(doubling_levels(min(start, n), n))


def key_of(k: int | None) -> str:
    return "own" if k is None else str(k)


@torch.no_grad()
def evaluate(sae: SAE, data: np.ndarray | torch.Tensor, ks: Sequence[int | None] = (None,),
             batch_size: int = 4096, cknna_rows: int = 1024, cknna_k: int = 10,
             cknna_for: Sequence[int | None] | None = None, orthogonality: bool = True) -> dict[str, dict]:
    """Metrics keyed by k ('own' for the model's own code), computed in original CLIP space, with
    processed-space variants suffixed ``_processed``. CKNNA uses the first ``cknna_rows`` rows (0:
    none), for the ks in ``cknna_for`` (default: every k); ``orthogonality=False`` skips
    ``decoder_orthogonality`` (an n x n x d product: per-epoch evaluations leave both out)."""
    sae.eval()
    for k in ks:
        if k is not None:
            sae._check_k(k)
    device = sae.W_enc.device
    x_all = data if isinstance(data, torch.Tensor) else as_tensor(data, torch.device("cpu"))
    stats = {key_of(k): ReconStats(sae.n) for k in ks}
    with_cknna = {key_of(k) for k in (ks if cknna_for is None else cknna_for)} if cknna_rows > 0 else set()
    sample: dict[str, tuple] = {}
    ortho = decoder_orthogonality(sae.W_dec) if orthogonality else None
    for xb in batches(x_all, batch_size):
        x = xb.to(device, torch.float32)
        xp = sae.preprocess(x)
        pre = sae.pre_activation(xp)
        orig = Originals(x, xp)
        dense_for = {k for k in ks if key_of(k) in with_cknna and key_of(k) not in sample}
        for k, xph, z, code in reconstructions(sae, pre, ks, cknna_rows, dense_for):
            xh = sae.postprocess(xph)
            key = key_of(k)
            stats[key].add(orig, xh, xph, z)
            if code is not None:
                stats[key].update_code(*code[:3])
            if k in dense_for:
                sample[key] = (x[:cknna_rows].cpu(), xh[:cknna_rows].cpu(),
                               z[:cknna_rows].cpu() if z is not None else code[3])
    out = {}
    for key, st in stats.items():
        res = st.result()
        if ortho is not None:
            res["decoder_orthogonality"] = ortho
        if key in sample and sample[key][0].shape[0] >= max(4, cknna_k + 1):
            x, xh, z = sample[key]
            res["cknna_recon"] = cknna(x, xh, cknna_k)
            res["cknna_code"] = cknna(x, z, cknna_k)
            res["cknna_rows"] = x.shape[0]
        out[key] = res
    return out



def reconstructions(sae: SAE, pre: torch.Tensor, ks: Sequence[int | None], first_rows: int = 0,
                    dense_for: set[int | None] = frozenset()):
    """For each k of ``ks`` (None: the model's own code) the processed-space reconstruction of one
    batch's pre-activations, as ``(k, xph, z, code)``: ``z`` the dense code where one was built
    (else None), ``code`` the native path's summary (else None; see :func:`_nested_levels`, which
    makes the dense code of the first ``first_rows`` rows for the ks in ``dense_for``). On the CPU
    several top-k levels come from ONE nested selection and one decode pass."""
    topks = sorted({k for k in ks if k is not None})
    native = (kernels() if len(topks) > 1 and pre.device.type == "cpu" and sae.W_dec.dtype == torch.float32
              else None)
    if native is not None:
        for k, xph, code in _nested_levels(sae, native, pre, topks, first_rows, dense_for):
            yield k, xph, None, code
    for k in ks:
        if native is None or k is None:
            z = sae.activate(pre) if k is None else topk_relu_dense(pre, k)
            yield k, _decode(sae, z), z, None


def _decode(sae: SAE, z: torch.Tensor) -> torch.Tensor:
    """``sae.decode_processed(z)``; a sparse code (under SPARSE_DECODE_DENSITY non-zeros, on the
    CPU) is decoded from its CSR form, which skips the dense [B, n] x [n, d] product."""
    if z.device.type != "cpu" or float((z != 0).sum()) > SPARSE_DECODE_DENSITY * z.numel():
        return sae.decode_processed(z)
    c = z.to_sparse_csr()
    return sae.decode_sparse(SparseRows(c.crow_indices(), c.col_indices(), c.values(), sae.n))


def _nested_levels(sae: SAE, native, pre: torch.Tensor, levels: list[int], first_rows: int, dense_for: set):
    """For each k of ``levels`` (ascending): the processed-space reconstruction of ReLU(top-k of
    ``pre``), and its code's summary (per-row non-zeros, fired latents, the count, sum and sum of
    squares of its values, and, for the ks in ``dense_for``, the dense code of the first
    ``first_rows`` rows), from ONE nested selection and ONE pass of the native decode kernel
    (msae/sae/csrc/msae_cpu.cpp) instead of a top-k, a scatter and a dense GEMM per k. Level c's
    code is chunks 0..c, so every summary is a cumulative sum over per-chunk counts (one pass)."""
    n, d = sae.n, sae.d
    L = len(levels)
    crow, rows, col, chunk, val, _, _ = native.nested_select(pre.contiguous(), torch.tensor(levels))
    e = Entries.build(native, crow, col, n, d, rows, chunk)
    empty = torch.empty(0)
    Q, _ = native.levels_decode(crow, col, chunk, val, sae.W_dec.detach().contiguous(),
                                sae.b_dec.detach().contiguous(), L, e.order, e.off, e.threads, empty, empty)
    B = pre.shape[0]
    ch = chunk.long()
    l0 = torch.bincount(rows.long() * L + ch, minlength=B * L).view(B, L).cumsum(1).to(torch.float64)
    fired = torch.bincount(col.long() * L + ch, minlength=n * L).view(n, L).cumsum(1) > 0
    v = val.to(torch.float64)
    act = torch.stack([torch.bincount(ch, minlength=L).to(torch.float64), torch.bincount(ch, v, minlength=L),
                       torch.bincount(ch, v * v, minlength=L)]).cumsum(1)
    head = int(crow[min(first_rows, B)])
    for c, k in enumerate(levels):
        dense = None
        if k in dense_for:
            first = chunk[:head] <= c
            sub_crow = torch.zeros(min(first_rows, B) + 1, dtype=torch.long)
            torch.cumsum(l0[:min(first_rows, B), c].long(), 0, out=sub_crow[1:])
            dense = SparseRows(sub_crow, col[:head][first], val[:head][first], n).to_dense()
        yield k, Q[:, c], (l0[:, c], fired[:, c], tuple(float(a) for a in act[:, c]), dense)
