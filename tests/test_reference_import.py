"""Importer for reference-code .pth checkpoints, written here in the format of recipe section 11."""
import os

import numpy as np
import pytest
import torch

from msae.cli import main
from msae.errors import MsaeError
from msae.reference import import_reference, parse_name

D, N = 16, 64


def _write_reference(path, seed=0, softmax_pickle=False):
    g = torch.Generator().manual_seed(seed)
    model = {"pre_bias": torch.randn(D, generator=g) * 0.1, "encoder": torch.randn(D, N, generator=g) * 0.2,
             "latent_bias": torch.randn(N, generator=g) * 0.05, "decoder": torch.randn(N, D, generator=g) * 0.2,
             "latents_activation_frequency": torch.zeros(N, dtype=torch.int64)}
    obj = {"model": model, "mean_center": torch.randn(D, generator=g), "scaling_factor": 0.7,
           "target_norm": np.float64(4.0)}
    torch.save(obj, path)
    return obj


def _reference_forward(obj, x, k):
    """The reference model, independently: pre = ((x - mu) * s - b_pre) @ E + b_lat; TopK; decode."""
    m = obj["model"]
    xp = (x - obj["mean_center"]) * obj["scaling_factor"]
    pre = (xp - m["pre_bias"]) @ m["encoder"] + m["latent_bias"]
    top = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    return z, (z @ m["decoder"] + m["pre_bias"]) / obj["scaling_factor"] + obj["mean_center"]


def test_parse_names():
    r = parse_name("6144_768_TopKReLU_64_RW_False_False_0.0_cc3m_ViT-L~14_train_image_2905936_768.pth")
    assert (r.n, r.d, r.k, r.weighting) == (6144, 768, 64, "RW")
    cfg = r.config
    assert cfg.method == "msae" and cfg.levels == (64, 128, 256, 512, 1024, 2048, 4096, 6144)
    assert cfg.alphas == (8, 7, 6, 5, 4, 3, 2, 1)
    assert parse_name("6144_768_TopKReLU_64_False_False_0.0_x.pth").config.method == "topk"
    assert parse_name("6144_768_ReLU_False_False_0.0_x.pth").config.method == "relu"
    assert parse_name("6144_768_BatchTopKReLU_32_False_False_0.0_x.pth").config.k == 32
    with pytest.raises(MsaeError, match="file name"):
        parse_name("model.pth")


def test_import_msae_matches_reference_forward(tmp_path):
    path = tmp_path / f"{N}_{D}_TopKReLU_8_UW_False_False_0.0_synthetic_train_100_{D}.pth"
    obj = _write_reference(path)
    sae, info = import_reference(path)
    assert sae.cfg.method == "msae" and sae.cfg.levels == (8, 16, 32, 64) and sae.cfg.alphas == (1, 1, 1, 1)
    assert info["target_norm"] == 4.0
    x = torch.randn(20, D) * 2
    for k in (8, 16, 64):
        z_ref, xh_ref = _reference_forward(obj, x, k)
        torch.testing.assert_close(sae.encode(x, k=k), z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x, k=k), xh_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x), _reference_forward(obj, x, 64)[0], rtol=1e-5, atol=1e-5)


def test_cli_import_then_evaluate(tmp_path):
    path = tmp_path / f"{N}_{D}_TopKReLU_4_False_False_0.0_train.pth"
    obj = _write_reference(path, seed=3)
    out = tmp_path / "imported"
    assert main(["import-reference", str(path), str(out)]) == 0
    import msae
    sae = msae.load(out)
    assert sae.cfg.method == "topk" and sae.cfg.k == 4
    x = torch.randn(5, D)
    torch.testing.assert_close(sae(x), _reference_forward(obj, x, 4)[1], rtol=1e-5, atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / f"{N}_{D}_TopKReLU_4_False_False_0.0_train.pth"
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(MsaeError, match="not a loadable reference checkpoint"):
        import_reference(path)
    out = tmp_path / "never"
    assert main(["import-reference", str(path), str(out)]) == 2
    assert not out.exists()


def test_wrong_shapes_rejected(tmp_path):
    path = tmp_path / f"{N}_{D + 1}_TopKReLU_4_False_False_0.0_train.pth"
    _write_reference(path)
    with pytest.raises(MsaeError, match=r"model.pre_bias should be a tensor of shape \[17\]"):
        import_reference(path)
