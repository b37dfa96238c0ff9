"""The C++ CPU kernels of the Matryoshka step (msae/sae/native.py) against independent references:
the nested selection against a sort, and every path of the MSAE step against the dense oracle."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msae.losses import mse, nmse
from msae.sae import create_sae, kernels as kernels_mod, matryoshka
from msae.sae.matryoshka import MatryoshkaConfig
from msae.sae.native import kernels, status

from conftest import check_step_against_dense


@pytest.fixture(scope="module")
def native():
    module = kernels()
    if module is None and shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip(f"no C++ compiler on this machine: {status()}")
    assert module is not None, f"the C++ kernels did not build although a compiler is present: {status()}"
    return module


def _reference_select(pre: torch.Tensor, levels: list[int]):
    """Per row: the positives ordered by (value descending, latent ascending), cut at the largest
    level; each entry's chunk is the first level its rank falls under."""
    out = []
    for row in pre.tolist():
        pos = sorted(((v, j) for j, v in enumerate(row) if v > 0), key=lambda t: (-t[0], t[1]))[: levels[-1]]
        out.append({(j, next(c for c, k in enumerate(levels) if r < k), v) for r, (v, j) in enumerate(pos)})
    return out


def test_nested_select_is_exact(native):
    """Ties (values on a coarse grid, so many share one value bin and one value), rows without a
    positive, rows with more positives than the largest level, and cuts that fall in one bin."""
    g = torch.Generator().manual_seed(3)
    B, n, levels = 40, 300, [3, 7, 20, 64]
    pre = torch.randn(B, n, generator=g)
    pre[:10] = torch.round(pre[:10] * 4) / 4  # heavy ties
    pre[10:14] = 1.0 + torch.rand(4, n, generator=g) * 1e-3  # every value in one or two bins
    pre[14:17] = -torch.rand(3, n, generator=g)  # no positive at all
    pre[17:20] = torch.where(torch.rand(3, n, generator=g) < 0.03, 1.0, -1.0)  # fewer positives than some levels
    crow, rows, col, chunk, val, used, chunk_counts, chunk_sums = native.nested_select(pre.contiguous(), torch.tensor(levels))
    ref = _reference_select(pre, levels)
    assert crow.tolist() == [0] + torch.tensor([len(r) for r in ref]).cumsum(0).tolist()
    for b in range(B):
        s, e = int(crow[b]), int(crow[b + 1])
        assert rows[s:e].tolist() == [b] * (e - s)
        got = set(zip(col[s:e].tolist(), chunk[s:e].tolist(), val[s:e].tolist()))
        assert got == ref[b], f"row {b}"
        assert chunk[s:e].tolist() == sorted(chunk[s:e].tolist()), "a row's entries are ordered by chunk"
    counts = [sum(c == i for r in ref for _, c, _ in r) for i in range(len(levels))]
    assert chunk_counts.tolist() == counts
    for i in range(len(levels)):
        vals = torch.tensor([v for r in ref for _, c, v in r if c == i], dtype=torch.float64)
        assert chunk_sums[:, i].tolist() == pytest.approx([float(vals.sum()), float(vals.pow(2).sum())], rel=1e-12)
    assert int(used) == max(c for r in ref for _, c, _ in r) + 1
    assert counts[-1] > 0 and all(len(ref[b]) == 0 for b in range(14, 17))


PATHS = {
    "native": {},
    "dense-chunks": {"DENSE_CHUNK_DENSITY": 0.0},  # every chunk by masked GEMM, passed as `extra`
    "mixed-chunks": {"DENSE_CHUNK_DENSITY": 0.02},
    "encoder-native-always": {"NATIVE_ENCODER_DENSITY": 1.0},
    "encoder-native-never": {"NATIVE_ENCODER_DENSITY": 0.0},
    "torch": {},
}


@pytest.mark.parametrize("loss", [nmse, mse], ids=["nmse", "mse"])
@pytest.mark.parametrize("path", list(PATHS))
def test_msae_step_matches_dense_oracle(native, path, loss, monkeypatch):
    """At a shape where segments hold groups of entries (B=96 rows, n=512), every kernel path of
    the step gives the dense oracle's loss and gradients."""
    for name, value in PATHS[path].items():
        monkeypatch.setattr(kernels_mod, name, value)
    if path == "torch":
        monkeypatch.setattr(matryoshka, "kernels", lambda: None)
    d, n, B = 40, 512, 96
    cfg = MatryoshkaConfig(d=d, n=n, levels=(4, 16, 64, 256, 512), weighting="rw")
    cfg.validate()
    sae = create_sae(cfg, seed=2)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(n, generator=g) * 0.05)
        sae.b_dec.add_(torch.randn(d, generator=g) * 0.1)
    x = torch.randn(B, d, generator=g) * 1.5 + 0.2
    calls = []
    if path != "torch":
        monkeypatch.setattr(kernels_mod._NativeLevels, "forward", _counting(kernels_mod._NativeLevels.forward, calls))

    def took_the_path():
        assert len(calls) == (0 if path == "torch" else 1), "the step did not take the path under test"

    out = check_step_against_dense(sae, x, loss, before_dense=took_the_path)
    dense_recon = matryoshka.dense_topk((x - sae.b_dec) @ sae.W_enc + sae.b_enc, 512) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.recon.detach(), dense_recon.detach(), rtol=1e-4, atol=1e-4)


def _counting(forward, calls):
    def wrapped(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)
    return staticmethod(wrapped)


def test_native_disabled_by_environment():
    """MSAE_NATIVE=0 in a fresh interpreter: no build, and status says why."""
    code = "from msae.sae.native import kernels, status; assert kernels() is None; print(status())"
    env = {"MSAE_NATIVE": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "disabled (MSAE_NATIVE=0)"


def test_progressive_evaluation_native_equals_dense(native, monkeypatch):
    """evaluate() decodes every top-k level in one native pass; the per-k dense path is the oracle."""
    from msae import evaluate as evaluate_mod
    from msae.evaluate import evaluate, progressive_ks
    from msae.sae import sae_config
    d, n = 24, 256
    sae = create_sae(sae_config("topk", d, n, k=16), seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(n, generator=g) * 0.1)
    x = torch.randn(700, d, generator=g) * 2 + 1
    ks = [None] + progressive_ks(n)
    fast = evaluate(sae, x, ks, batch_size=256, cknna_rows=200)
    monkeypatch.setattr(evaluate_mod, "kernels", lambda: None)
    slow = evaluate(sae, x, ks, batch_size=256, cknna_rows=200)
    assert fast.keys() == slow.keys() == {"own", "16", "32", "64", "128", "256"}
    for key in slow:
        for metric, value in slow[key].items():
            assert fast[key][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, metric)
    assert slow["16"]["l0"] < slow["256"]["l0"] and slow["256"]["fvu"] < slow["16"]["fvu"]
