"""Metrics against values computed by hand on tiny arrays."""
import math

import numpy as np
import pytest
import torch

from msae import metrics as M
from msae.evaluate import progressive_ks
from msae.preprocess import fit_preprocessing


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


X = t([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
XH = t([[1.0, 2.0, 2.0], [0.0, 1.0, 4.0]])


def test_fvu_paper_per_sample():
    # row 0: residual (0,0,1): var = 2/9; x var = 2/3  -> 1/3
    # row 1: residual (0,-1,0): var = 2/9; x var = 32/9 -> 1/16
    got = M.fvu_per_sample(X, XH)
    assert got.tolist() == pytest.approx([1 / 3, 1 / 16])


def test_fvu_dataset():
    # sse = 1 + 1 = 2; mean = (0.5, 1, 3.5); centred ss = 0.25*2 + 1*2 + 0.25*2 = 3
    assert M.fvu_dataset(X, XH) == pytest.approx(2 / 3)


def test_nmse_cosine_l0():
    assert M.nmse_per_sample(X, XH).tolist() == pytest.approx([(1 / 3) / (14 / 3), (1 / 3) / (16 / 3)])
    assert M.cosine_per_sample(X, XH).tolist() == pytest.approx([11 / math.sqrt(14 * 9), 16 / math.sqrt(16 * 17)])
    z = t([[0, 1.5, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0]])
    assert M.l0_per_sample(z).tolist() == [2, 0, 1]
    assert M.zero_fraction(z) == pytest.approx(9 / 12)
    assert M.dead_fraction(z) == pytest.approx(1 / 4)  # latent 2 never fires


def test_decoder_orthogonality():
    W = t([[1, 0], [0, 1], [1, 0]])
    # Gram off-diagonal: (0,2) and (2,0) are 1, others 0 -> 2 / 9
    assert M.decoder_orthogonality(W) == pytest.approx(2 / 9)
    assert M.decoder_orthogonality(torch.eye(4)) == 0.0
    for n, d in ((40, 7), (7, 40)):  # the d x d Gram (d < n) and the n x n one, against the definition
        V = torch.randn(n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        G = V @ V.t()
        off = (G - torch.diag(torch.diag(G))).pow(2).mean()
        assert M.decoder_orthogonality(V.float()) == pytest.approx(float(off), rel=1e-6)


def _cknna_numpy(a, b, k):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    K, L = a @ a.T, b @ b.T
    n = len(a)

    def knn_mask(S):
        S = S.copy()
        np.fill_diagonal(S, -np.inf)
        m = np.zeros_like(S)
        for i in range(n):
            m[i, np.argsort(-S[i])[:k]] = 1
        return m

    def hsic(P, Q):
        P, Q = P.copy(), Q.copy()
        np.fill_diagonal(P, 0)
        np.fill_diagonal(Q, 0)
        return ((P * Q.T).sum() + P.sum() * Q.sum() / ((n - 1) * (n - 2)) - 2 * (P @ Q).sum() / (n - 2)) / (n * (n - 3))

    def sim(P, Q):
        m = knn_mask(P) * knn_mask(Q)
        return hsic(m * P, m * Q)

    return sim(K, L) / (np.sqrt(sim(K, K) * sim(L, L)) + 1e-6)


def test_cknna_against_independent_numpy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 5))
    b = a + 0.3 * rng.standard_normal((20, 5))
    assert M.cknna(torch.from_numpy(a), torch.from_numpy(a), k=4) == pytest.approx(1.0, abs=1e-4)
    got = M.cknna(torch.from_numpy(a), torch.from_numpy(b), k=4)
    assert got == pytest.approx(_cknna_numpy(a, b, 4), rel=1e-9)
    unrelated = M.cknna(torch.from_numpy(a), torch.from_numpy(rng.standard_normal((20, 5))), k=4)
    assert unrelated < got
    code = np.where(rng.random((20, 400)) < 0.03, rng.random((20, 400)), 0.0)  # a sparse code: the CSR gram
    code[:, 0] = 0.5  # no empty row
    assert M.cknna(torch.from_numpy(a), torch.from_numpy(code), k=4) == pytest.approx(_cknna_numpy(a, code, 4), rel=1e-9)


def test_recon_stats_streaming_equals_batch_formulas():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((50, 6)) + 2)
    xh = x + 0.1 * torch.from_numpy(rng.standard_normal((50, 6)))
    z = torch.from_numpy(np.maximum(rng.standard_normal((50, 8)), 0))
    st = M.ReconStats(8)
    for s in range(0, 50, 16):
        st.update(x[s:s + 16], xh[s:s + 16], x[s:s + 16], xh[s:s + 16], z[s:s + 16])
    r = st.result()
    assert r["fvu"] == pytest.approx(float(M.fvu_per_sample(x, xh).mean()))
    assert r["fvu_dataset"] == pytest.approx(M.fvu_dataset(x, xh))
    assert r["cosine"] == pytest.approx(float(M.cosine_per_sample(x, xh).mean()))
    assert r["fvu_processed"] == pytest.approx(float(M.fvu_per_sample(x, xh).mean()))
    assert r["nmse"] == pytest.approx(float(M.nmse_per_sample(x, xh).mean()))
    assert r["cosine_processed"] == pytest.approx(float(M.cosine_per_sample(x, xh).mean()))
    assert r["l0"] == pytest.approx(float(M.l0_per_sample(z).mean()))
    assert r["zero_fraction"] == pytest.approx(M.zero_fraction(z))
    assert r["dead_fraction"] == pytest.approx(M.dead_fraction(z))
    nz = z[z != 0]
    assert r["act_mean"] == pytest.approx(float(nz.mean()))
    assert r["act_std"] == pytest.approx(float(nz.std(unbiased=False)))


def test_preprocessing_modes():
    x = np.array([[1.0, 1.0], [3.0, 3.0]], dtype=np.float32)  # mean (2,2); E||x-mu||^2 = 2
    conv = fit_preprocessing(x, "conventional")
    assert conv.mean.tolist() == [2.0, 2.0] and conv.scale == pytest.approx(math.sqrt(2 / 2))
    ref = fit_preprocessing(x, "reference")
    assert ref.scale == pytest.approx(math.sqrt(2) / 2)
    raw = fit_preprocessing(x, "none", mean_center=False)
    assert raw.scale == 1.0 and raw.mean.tolist() == [0.0, 0.0]
    y = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32) * 5 + 3
    pp = fit_preprocessing(y, chunk=100)
    proc = (y - pp.mean) * pp.scale
    assert float((proc ** 2).sum(1).mean()) == pytest.approx(16, rel=1e-4)


def test_progressive_ks():
    assert progressive_ks(128) == [16, 32, 64, 128]
    assert progressive_ks(6144)[-3:] == [2048, 4096, 6144]


def test_evaluate_rejects_k_beyond_n():
    from msae.errors import MsaeError
    from msae.evaluate import evaluate
    from msae.sae import create_sae, sae_config
    sae = create_sae(sae_config("topk", 8, 16, k=4))
    with pytest.raises(MsaeError, match=r"k: expected an integer between 1 and n=16 \(the number of latents\), got 17"):
        evaluate(sae, np.zeros((5, 8), dtype=np.float32), ks=[None, 17])


@pytest.mark.parametrize("native_levels", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("example", [(m.name, name, values) for m in __import__("msae.sae", fromlist=["REGISTRY"]).REGISTRY.values()
                                     for name, values in m.examples.items()], ids=lambda e: e[1])
def test_evaluate_equals_the_definitions(example, native_levels, monkeypatch):
    """Every metric evaluate() streams (row sums, sparse codes, nested levels) against the batch
    formulas above on the dense code, for every method's example, at its own code and two top-k
    levels (one small enough for the sparse top-k path, one not), over several batches."""
    from msae import evaluate as evaluate_mod
    from msae.evaluate import evaluate
    from msae.sae import create_sae, sae_config
    from msae.sae.base import topk_relu_dense
    method, _, values = example
    d, n = 16, 512
    sae = create_sae(sae_config(method, d, n, **values), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(n, generator=g) * 0.2)
        sae.set_preprocessing(torch.randn(d, generator=g), 0.7)
    x = torch.randn(300, d, generator=g) * 1.5 + 0.5
    if not native_levels:
        monkeypatch.setattr(evaluate_mod, "kernels", lambda: None)
    got = evaluate(sae, x, [None, 4, 32], batch_size=128, cknna_rows=0, orthogonality=False)
    with torch.no_grad():
        xp = sae.preprocess(x)
        pre = sae.pre_activation(xp)
        for key, z in (("own", sae.activate(pre)), ("4", topk_relu_dense(pre, 4)), ("32", topk_relu_dense(pre, 32))):
            xph = z @ sae.W_dec + sae.b_dec
            xh = sae.postprocess(xph)
            x64, xh64, xp64, xph64 = (t.double() for t in (x, xh, xp, xph))
            nz = z[z != 0].double()
            want = {"fvu": M.fvu_per_sample(x64, xh64).mean(), "cosine": M.cosine_per_sample(x64, xh64).mean(),
                    "fvu_processed": M.fvu_per_sample(xp64, xph64).mean(),
                    "cosine_processed": M.cosine_per_sample(xp64, xph64).mean(),
                    "nmse": M.nmse_per_sample(xp64, xph64).mean(), "fvu_dataset": M.fvu_dataset(x64, xh64),
                    "l0": M.l0_per_sample(z).mean(), "zero_fraction": M.zero_fraction(z),
                    "dead_fraction": M.dead_fraction(z), "act_mean": nz.mean(), "act_std": nz.std(unbiased=False)}
            assert 0 < float(want["l0"]) < n
            for metric, value in want.items():
                assert got[key][metric] == pytest.approx(float(value), rel=1e-4, abs=1e-6), (key, metric)
            assert got[key]["rows"] == 300
