"""The sparse autograd kernels against dense autograd, on both backward branches."""
import pytest
import torch

from msae.sae import kernels
from msae.sae.kernels import SparseRows, gather_selected, rect_to_rows, sparse_decode
from msae.sae.matryoshka import nested_chunk_ids


@pytest.mark.parametrize("gather_path", [False, True], ids=["csr-kernels", "gather-path"])
@pytest.mark.parametrize("k", [3, 40], ids=["sparse-branch", "dense-branch"])
def test_gather_selected_and_decode_match_dense(k, gather_path, monkeypatch):
    """Both kernel families (CSR on CPU; chunked gathers, used on CUDA) against dense autograd."""
    if gather_path:
        monkeypatch.setattr(kernels, "use_gather_path", lambda t: True)
        monkeypatch.setattr(kernels, "GATHER_CHUNK", 5)  # several chunks even on tiny inputs
    torch.manual_seed(0)
    B, d, n = 12, 7, 48
    x = torch.randn(B, d)
    b_dec = torch.randn(d, requires_grad=True)
    W_enc = torch.randn(d, n, requires_grad=True)
    b_enc = torch.randn(n, requires_grad=True)
    W_dec = torch.randn(n, d, requires_grad=True)
    G = torch.randn(B, d)
    with torch.no_grad():
        pre = torch.addmm(b_enc, x - b_dec, W_enc)
    vals, idx = pre.topk(k, dim=1, sorted=False)
    crow, col = rect_to_rows(vals, idx)
    assert (k * B > kernels.DENSE_BACKWARD_DENSITY * B * n) == (k == 40)
    val = gather_selected(x, b_dec, W_enc, b_enc, pre, crow, col)
    out = sparse_decode(SparseRows(crow, col, val, n), W_dec)
    (out * G).sum().backward()
    fast = [t.grad.clone() for t in (b_dec, W_enc, b_enc, W_dec)]
    for t in (b_dec, W_enc, b_enc, W_dec):
        t.grad = None
    pre_d = (x - b_dec) @ W_enc + b_enc
    mask = torch.zeros(B, n, dtype=torch.bool).scatter_(1, idx, True) & (pre_d > 0)
    ((torch.where(mask, pre_d, 0.0) @ W_dec) * G).sum().backward()
    torch.testing.assert_close(out, torch.where(mask, pre_d, 0.0).detach() @ W_dec.detach(), rtol=1e-5, atol=1e-5)
    for f, t in zip(fast, (b_dec, W_enc, b_enc, W_dec)):
        torch.testing.assert_close(f, t.grad, rtol=1e-5, atol=1e-5)


def test_sparse_rows_to_dense_and_empty_rows():
    crow = torch.tensor([0, 2, 2, 3])
    col = torch.tensor([4, 1, 0])
    val = torch.tensor([1.0, 2.0, 3.0])
    dense = SparseRows(crow, col, val, 5).to_dense()
    assert dense.tolist() == [[0, 2, 0, 0, 1], [0] * 5, [3, 0, 0, 0, 0]]
    W = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(sparse_decode(SparseRows(crow, col, val, 5), W), dense @ W)


def test_nested_chunks_are_exact_rank_chunks():
    torch.manual_seed(1)
    pre = torch.randn(9, 40)
    levels = (2, 4, 8, 16, 40)
    vals, idx, chunk, n_chunks = nested_chunk_ids(pre, levels)
    rank = pre.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each latent per row
    for b in range(9):
        pos = vals[b] > 0
        ranks = rank[b, idx[b][pos]]
        c = chunk[b][pos].long()
        lower = torch.tensor((0,) + levels)[c]
        upper = torch.tensor(levels)[c]
        assert bool(((ranks >= lower) & (ranks < upper)).all())
    assert n_chunks <= len(levels)
    npos = int((pre > 0).sum(1).max())
    assert int((vals > 0).sum(1).max()) == npos
