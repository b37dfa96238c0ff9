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
from msae.sae.kernels import Entries, SparseRows, rect_to_rows
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
    ``decoder_orthogonality`` (per-epoch evaluations leave both out: nobody logs them there)."""
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
    batch's pre-activations, as ``(k, xph, z, code)``: either ``code``, the code's summary (see
    :func:`_nested_levels`; it holds the dense code of the first ``first_rows`` rows for the ks in
    ``dense_for``) and ``z`` None, or the dense code ``z`` and ``code`` None. A top-k code (an int
    k, or an own code that is one: ``sae.code_topk()``) is built sparse; on the CPU several top-k
    levels come from ONE nested selection and one decode pass, the own code among them."""
    own = sae.code_topk() if None in ks else None
    as_k = {k: own if k is None else k for k in ks}  # None -> the own code's k, or None
    topks = sorted({k for k in as_k.values() if k is not None})
    dense_k = {as_k[k] for k in dense_for if k in as_k}
    native = (kernels() if len(topks) > 1 and pre.device.type == "cpu" and sae.W_dec.dtype == torch.float32
              else None)
    if native is not None:
        for level, xph, code in _nested_levels(sae, native, pre, topks, first_rows, dense_k):
            for k in ks:
                if as_k[k] == level:
                    yield k, xph, None, code
    for k in ks:
        if native is not None and as_k[k] is not None:
            continue
        if as_k[k] is None:
            z = sae.activate(pre)
            xph, code = _decode(sae, z, first_rows if k in dense_for else 0)
            yield k, xph, (z if code is None else None), code
        else:
            xph, code = _topk_decode(sae, pre, as_k[k], first_rows if k in dense_for else 0)
            yield k, xph, None, code


def _decode(sae: SAE, z: torch.Tensor, first_rows: int = 0) -> tuple[torch.Tensor, tuple | None]:
    """``sae.decode_processed(z)``, and None; a sparse code (under SPARSE_DECODE_DENSITY non-zeros,
    on the CPU) is decoded from its CSR form, which skips the dense [B, n] x [n, d] product, and
    comes with its summary from that form (the dense code of the first ``first_rows`` rows when
    asked)."""
    if z.device.type != "cpu" or float(torch.count_nonzero(z)) > SPARSE_DECODE_DENSITY * z.numel():
        return sae.decode_processed(z), None
    c = z.to_sparse_csr()
    code = SparseRows(c.crow_indices(), c.col_indices(), c.values(), sae.n)
    return sae.decode_sparse(code), _summary(code, z[:first_rows] if first_rows else None)


def _topk_decode(sae: SAE, pre: torch.Tensor, k: int, first_rows: int = 0) -> tuple[torch.Tensor, tuple]:
    """The reconstruction of ReLU(top-k of ``pre``) and its summary, from the CSR code of the
    selection (never a dense [B, n] code, but for the first ``first_rows`` rows when asked). A
    code denser than SPARSE_DECODE_DENSITY off the CPU goes through a dense decode instead."""
    if pre.device.type != "cpu" or k > SPARSE_DECODE_DENSITY * sae.n:
        z = topk_relu_dense(pre, k)
        xph, code = _decode(sae, z, first_rows)
        if code is None:
            code = _summary(None, z[:first_rows] if first_rows else None, z)
        return xph, code
    vals, idx = pre.topk(k, dim=1, sorted=False)
    crow, col = rect_to_rows(vals, idx)
    code = SparseRows(crow, col, vals[vals > 0], sae.n)
    return sae.decode_sparse(code), _summary(code, code.head(first_rows).to_dense() if first_rows else None)


def _summary(code: SparseRows | None, dense_head: torch.Tensor | None, z: torch.Tensor | None = None) -> tuple:
    """A code's summary as ``ReconStats.update_code`` takes it (per-row non-zeros, fired latents,
    count / sum / sum of squares of the values) and ``dense_head``, from its CSR form or, failing
    that, from the dense code ``z``."""
    if code is None:
        nz = z != 0
        l0, fired, v = nz.sum(1), nz.any(0), z[nz]
    else:
        l0, fired, v = code.crow.diff(), torch.bincount(code.col, minlength=code.n) > 0, code.val
    v = v.detach().to(torch.float64)
    return l0.to(torch.float64), fired, (v.numel(), float(v.sum()), float(v.pow(2).sum())), dense_head


def _nested_levels(sae: SAE, native, pre: torch.Tensor, levels: list[int], first_rows: int, dense_for: set):
    """For each k of ``levels`` (ascending): the processed-space reconstruction of ReLU(top-k of
    ``pre``), and its code's summary (per-row non-zeros, fired latents, the count, sum and sum of
    squares of its values, and, for the ks in ``dense_for``, the dense code of the first
    ``first_rows`` rows), from ONE nested selection and ONE pass of the native decode kernel
    (msae/sae/csrc/msae_cpu.cpp) instead of a top-k, a scatter and a dense GEMM per k. Level c's
    code is chunks 0..c: row b holds min(K_b, k_c) of its K_b entries, the value sums are
    cumulative over the selection's per-chunk sums, and a latent fires at level c when the first
    chunk that holds it is <= c."""
    n, d = sae.n, sae.d
    L = len(levels)
    crow, rows, col, chunk, val, _, counts, sums = native.nested_select(pre.contiguous(), torch.tensor(levels))
    e = Entries.build(native, crow, col, n, d, rows, chunk)
    empty = torch.empty(0)
    Q, _ = native.levels_decode(crow, col, chunk, val, sae.W_dec.detach().contiguous(),
                                sae.b_dec.detach().contiguous(), L, e.order, e.off, e.threads, empty, empty)
    B = pre.shape[0]
    upto = torch.minimum(crow.diff()[:, None], torch.tensor(levels)[None, :])  # [B, L] entries per level
    act = torch.cat([counts[None].to(torch.float64), sums]).cumsum(1).t().tolist()  # [L] x (count, sum, sum sq)
    first = torch.full((n,), L, dtype=torch.int32).scatter_reduce_(0, col, chunk, "amin")
    l0 = upto.to(torch.float64)
    head = int(crow[min(first_rows, B)])
    for c, k in enumerate(levels):
        dense = None
        if k in dense_for:
            keep = chunk[:head] <= c
            sub_crow = torch.zeros(min(first_rows, B) + 1, dtype=torch.long)
            torch.cumsum(upto[:min(first_rows, B), c], 0, out=sub_crow[1:])
            dense = SparseRows(sub_crow, col[:head][keep], val[:head][keep], n).to_dense()
        yield k, Q[:, c], (l0[:, c], first <= c, tuple(act[c]), dense)
