"""Sparse training kernels shared by the TopK-style methods.

A sparse code is kept as CSR rows (``crow`` [B+1], ``col`` [nnz], ``val`` [nnz]): row b owns
entries ``crow[b]:crow[b+1]``. Two autograd functions make a training step touch only the
selected latents:

* :func:`gather_selected` returns the pre-activations at the selected entries; its backward
  builds the encoder gradients from the selected entries only (CSR matmul for ``W_enc``,
  ``index_add`` for ``b_enc``, and ``b_dec``'s gradient from their column sums).
* :func:`sparse_decode` returns ``sum_j val_j * W_dec[col_j]`` per row (``embedding_bag``);
  its backward uses a sampled matmul for the value gradients and a CSR matmul for ``W_dec``.

Both agree with dense autograd to float32 rounding (see tests/test_kernels.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")

# Above this fraction of non-zeros a dense GEMM beats the sparse encoder backward on CPU.
DENSE_BACKWARD_DENSITY = 0.125


@dataclass
class SparseRows:
    """CSR rows of a [B, n] code; ``val`` may carry autograd history."""

    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    n: int

    @property
    def batch(self) -> int:
        return self.crow.numel() - 1

    def head(self, rows: int) -> "SparseRows":
        """The first ``rows`` rows."""
        rows = min(rows, self.batch)
        end = int(self.crow[rows])
        return SparseRows(self.crow[:rows + 1], self.col[:end], self.val[:end], self.n)

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.batch, self.n, dtype=self.val.dtype, device=self.val.device)
        out[_rows_of(self.crow), self.col] = self.val
        return out


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


# Rows of nnz x d scratch per chunk on the gather path (bounds its memory to about 256 MB fp32).
GATHER_CHUNK = 1 << 16


def use_gather_path(t: torch.Tensor) -> bool:
    """CUDA uses plain gathers and index_add (chunked); CPU uses CSR kernels. Tests force the
    gather path on CPU through this function to check its arithmetic."""
    return t.is_cuda


def _rows_of(crow: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow[1:] - crow[:-1])


def _csr_t_matmul(crow, col, val, shape, dense: torch.Tensor) -> torch.Tensor:
    """(S^T @ dense) for S = CSR(crow, col, val) of ``shape`` [B, n]; returns [n, dense.shape[1]]."""
    out = torch.zeros(shape[1], dense.shape[1], dtype=dense.dtype, device=dense.device)
    if val.numel() == 0:
        return out
    if use_gather_path(dense):
        rows = _rows_of(crow)
        for s in range(0, col.numel(), GATHER_CHUNK):
            sl = slice(s, s + GATHER_CHUNK)
            out.index_add_(0, col[sl], val[sl, None] * dense[rows[sl]])
        return out
    return _csr(crow, col, val, shape).t().to_sparse_csr() @ dense


def _sampled_dot(crow, col, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """For every CSR entry (b, j): G[b] . W[j]  (the value gradient of a sparse decode)."""
    if col.numel() == 0:
        return torch.zeros(0, dtype=G.dtype, device=G.device)
    if use_gather_path(G):
        rows = _rows_of(crow)
        return torch.cat([(G[rows[s:s + GATHER_CHUNK]] * W[col[s:s + GATHER_CHUNK]]).sum(-1)
                          for s in range(0, col.numel(), GATHER_CHUNK)])
    S = _csr(crow, col, torch.ones(col.numel(), dtype=G.dtype, device=G.device), (crow.numel() - 1, W.shape[0]))
    return torch.sparse.sampled_addmm(S, G, W.t(), beta=0.0).values()


class _GatherSelected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, crow, col, pre_val, entries):  # noqa: D401
        ctx.save_for_backward(x, b_dec, W_enc, crow, col)
        ctx.entries = entries
        return pre_val  # computed without autograd, owned by this call: no copy needed

    @staticmethod
    def backward(ctx, g):
        x, b_dec, W_enc, crow, col = ctx.saved_tensors
        B, n = x.shape[0], W_enc.shape[1]
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        e = ctx.entries
        dense = None
        if e is not None and g.numel() > NATIVE_ENCODER_DENSITY * B * n:  # one parallel pass writes both
            dense, col_sum = e.native.dense_rows(crow, col, g.contiguous(), n, e.threads)
        else:
            col_sum = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, col, g)
        if ctx.needs_input_grad[3]:
            grad_b_enc = col_sum
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ col_sum)
        if dense is not None:
            xc = x - b_dec
            if ctx.needs_input_grad[2]:
                grad_W = xc.t() @ dense
            if ctx.needs_input_grad[0]:
                grad_x = dense @ W_enc.t()
        elif e is not None and ctx.needs_input_grad[2] and not ctx.needs_input_grad[0]:
            xc = (x - b_dec).contiguous()
            grad_W = e.native.grad_weight(e.rows, col, e.chunk[:0], g.contiguous(), xc, n, 1, e.order, e.off,
                                          e.threads).t()
        elif ctx.needs_input_grad[2] or ctx.needs_input_grad[0]:
            xc = x - b_dec
            if g.numel() > DENSE_BACKWARD_DENSITY * B * n or use_gather_path(x):
                dense = torch.zeros(B, n, dtype=g.dtype, device=g.device)
                dense[_rows_of(crow), col] = g
                if ctx.needs_input_grad[2]:
                    grad_W = xc.t() @ dense
                if ctx.needs_input_grad[0]:
                    grad_x = dense @ W_enc.t()
            else:
                if ctx.needs_input_grad[2]:
                    grad_W = _csr_t_matmul(crow, col, g, (B, n), xc).t().contiguous()
                if ctx.needs_input_grad[0]:
                    grad_x = _csr(crow, col, g, (B, n)) @ W_enc.t()
        return grad_x, grad_b_dec, grad_W, grad_b_enc, None, None, None, None


def gather_selected(x, b_dec, W_enc, b_enc, pre: torch.Tensor, crow, col, entries: Entries | None = None,
                    pre_val: torch.Tensor | None = None) -> torch.Tensor:
    """Values of ``pre = (x - b_dec) @ W_enc + b_enc`` at CSR entries, differentiable w.r.t. the
    parameters; ``pre`` is the already computed (detached) pre-activation matrix (``pre_val``: its
    values at the entries, when already gathered). With native ``entries`` the encoder's weight
    gradient of a sparse enough code goes through the native kernel."""
    if pre_val is None:
        pre_val = pre[_rows_of(crow), col]
    return _GatherSelected.apply(x, b_dec, W_enc, b_enc, crow, col, pre_val, entries)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, crow, col, val, W_dec):
        ctx.save_for_backward(crow, col, val, W_dec)
        return F.embedding_bag(col, W_dec, crow[:-1], mode="sum", per_sample_weights=val)

    @staticmethod
    def backward(ctx, G):
        crow, col, val, W_dec = ctx.saved_tensors
        shape = (crow.numel() - 1, W_dec.shape[0])
        G = G.contiguous()
        grad_val = grad_W = None
        if ctx.needs_input_grad[2]:
            grad_val = _sampled_dot(crow, col, G, W_dec)
        if ctx.needs_input_grad[3]:
            grad_W = _csr_t_matmul(crow, col, val.detach(), shape, G)
        return None, None, grad_val, grad_W


def sparse_decode(code: SparseRows, W_dec: torch.Tensor) -> torch.Tensor:
    """``code @ W_dec`` for a CSR code, without materialising the dense [B, n] code."""
    return _SparseDecode.apply(code.crow, code.col, code.val, W_dec)


# ---------------------------------------------------------------- the native (C++) CPU kernels
# (msae/sae/native.py builds msae/sae/csrc/msae_cpu.cpp). Their products visit entries by blocks of
# latents (a power of two) whose weight rows fill about this many bytes, so those rows stay in a
# core's cache: the best of 384..3072 latents at d = 768 on the project's CPU (AMD EPYC, 1 MB L2 per core)
# was 1024-1536.
BLOCK_BYTES = 1024 * 768 * 4


def block_shift(d: int) -> int:
    """log2 of the latents per block: the largest power of two whose rows fit in BLOCK_BYTES."""
    latents = max(32, BLOCK_BYTES // (4 * d))
    return latents.bit_length() - 1
# A Matryoshka chunk holding more than this fraction of all [B, n] entries is decoded by a masked
# dense GEMM instead (3 GEMMs against 3 native passes of about 30 ns per entry: break-even near 26%
# of the entries on the project's CPU; the paper's level lists never reach it).
DENSE_CHUNK_DENSITY = 0.26
# The encoder's weight gradient goes through the native kernel below this density of the code, a
# scatter and a dense GEMM above it (about 30 ns per entry against 0.28 s at the paper's shape).
NATIVE_ENCODER_DENSITY = 0.3


@dataclass
class Entries:
    """A code's entries as the native kernels take them: row-ordered CSR (``crow``, ``col``), the
    row of every entry (int32), optional chunk ids (int32), and the (latent block x row range)
    segments."""

    native: object
    crow: torch.Tensor
    rows: torch.Tensor
    col: torch.Tensor
    chunk: torch.Tensor  # empty: a single chunk
    order: torch.Tensor
    off: torch.Tensor
    threads: int
    n: int
    fired: torch.Tensor  # [n] entries per latent (the firing counts)

    @classmethod
    def build(cls, native, crow, col, n: int, d: int, rows=None, chunk=None) -> "Entries":
        threads = max(1, torch.get_num_threads())
        order, off, fired = native.segments(crow, col, n, block_shift(d), threads)
        if rows is None:
            rows = _rows_of(crow).to(torch.int32)
        empty = torch.empty(0, dtype=torch.int32)
        return cls(native, crow, rows, col, empty if chunk is None else chunk, order, off, threads, n, fired)

    @property
    def batch(self) -> int:
        return self.crow.numel() - 1

    def subset(self, keep: torch.Tensor, d: int) -> "Entries":
        crow = torch.zeros(self.batch + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(self.rows[keep], minlength=self.batch), 0, out=crow[1:])
        chunk = self.chunk[keep] if self.chunk.numel() else None
        return Entries.build(self.native, crow, self.col[keep], self.n, d, self.rows[keep], chunk)


_EMPTY = torch.empty(0)


class _NativeLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, val, W_dec, b_dec, x, extra, entries: Entries, C: int):  # noqa: D401
        e = entries
        Q, sq = e.native.levels_decode(e.crow, e.col, e.chunk, val.contiguous(), W_dec.contiguous(),
                                       b_dec.detach().contiguous(), C, e.order, e.off, e.threads, x.contiguous(),
                                       _EMPTY if extra is None else extra.contiguous())
        ctx.save_for_backward(val, W_dec, x, Q)
        ctx.entries, ctx.C = e, C
        ctx.mark_non_differentiable(Q)
        ctx.set_materialize_grads(False)  # Q's gradient is never used: no [B, C, d] of zeros
        return sq, Q

    @staticmethod
    def backward(ctx, g, _):
        if g is None:  # the squared errors were not used
            return None, None, None, None, None, None, None
        val, W_dec, x, Q = ctx.saved_tensors
        e, C, d = ctx.entries, ctx.C, W_dec.shape[1]
        S = e.native.level_grads(Q, x.contiguous(), g.contiguous())  # [B, C, d]: chunk c's gradient
        grad_x = -S[:, 0] if ctx.needs_input_grad[3] else None
        grad_b = S[:, 0].sum(0) if ctx.needs_input_grad[2] else None
        grad_extra = None
        if ctx.needs_input_grad[4]:  # d sq / d Q, per level (not accumulated over chunks)
            grad_extra = 2 * g[..., None] * (Q - x[:, None])
        grad_val = grad_W = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_val, grad_W = e.native.grad_val_weight(e.rows, e.col, e.chunk, val.detach().contiguous(), S.view(-1, d),
                                                        W_dec.contiguous(), C, e.order, e.off, e.threads)
        return grad_val, grad_W, grad_b, grad_x, grad_extra, None, None


def native_level_errors(val: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, x: torch.Tensor,
                        entries: Entries, C: int = 1,
                        chunk_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels' squared errors E [B, C] (differentiable) and reconstructions Q [B, C, d] (not):
    Q[b, c] = b_dec + sum of val_e * W_dec[col_e] over row b's entries of chunks <= c, and
    E[b, c] = |Q[b, c] - x[b]|^2, in one native pass. Chunks denser than DENSE_CHUNK_DENSITY go
    through a masked dense GEMM instead, the rest through the native kernels (``chunk_counts``: the
    entries per chunk, when known)."""
    B, (n, d) = entries.batch, W_dec.shape
    chunk = entries.chunk
    dense = []
    if C > 1:
        counts = chunk_counts if chunk_counts is not None else torch.bincount(chunk, minlength=C)
        dense = [c for c in range(C) if int(counts[c]) > DENSE_CHUNK_DENSITY * B * n]
    if not dense:
        return _NativeLevels.apply(val, W_dec, b_dec, x, None, entries, C)
    in_dense = torch.isin(chunk, torch.tensor(dense, dtype=chunk.dtype))
    keep = (~in_dense).nonzero().squeeze(1)
    parts = []
    for c in range(C):
        if c in dense:
            sel = (chunk == c).nonzero().squeeze(1)
            Z = torch.zeros(B, n, dtype=val.dtype).index_put((entries.rows[sel].long(), entries.col[sel]), val[sel])
            parts.append(Z @ W_dec)
        else:
            parts.append(torch.zeros(B, d, dtype=val.dtype))
    extra = torch.stack(parts, dim=1).cumsum(1)
    return _NativeLevels.apply(val[keep], W_dec, b_dec, x, extra, entries.subset(keep, d), C)


def rect_to_rows(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangular per-row selections [B, w] -> CSR (crow, col) of the positive values only."""
    mask = vals > 0
    crow = torch.zeros(idx.shape[0] + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(mask.sum(1), 0, out=crow[1:])
    return crow, idx[mask]
