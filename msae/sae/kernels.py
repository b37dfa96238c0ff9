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
    def forward(ctx, x, b_dec, W_enc, b_enc, crow, col, pre_val):  # noqa: D401
        ctx.save_for_backward(x, b_dec, W_enc, crow, col)
        return pre_val.clone()

    @staticmethod
    def backward(ctx, g):
        x, b_dec, W_enc, crow, col = ctx.saved_tensors
        B, n = x.shape[0], W_enc.shape[1]
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        col_sum = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, col, g)
        if ctx.needs_input_grad[3]:
            grad_b_enc = col_sum
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ col_sum)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[0]:
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
        return grad_x, grad_b_dec, grad_W, grad_b_enc, None, None, None


def gather_selected(x, b_dec, W_enc, b_enc, pre: torch.Tensor, crow, col) -> torch.Tensor:
    """Values of ``pre = (x - b_dec) @ W_enc + b_enc`` at CSR entries, differentiable w.r.t. the
    parameters; ``pre`` is the already computed (detached) pre-activation matrix."""
    return _GatherSelected.apply(x, b_dec, W_enc, b_enc, crow, col, pre[_rows_of(crow), col])


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


def rect_to_rows(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangular per-row selections [B, w] -> CSR (crow, col) of the positive values only."""
    mask = vals > 0
    crow = torch.zeros(idx.shape[0] + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(mask.sum(1), 0, out=crow[1:])
    return crow, idx[mask]
