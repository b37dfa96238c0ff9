"""Synthetic CLIP-like data: statistics, hierarchy, modalities, recovery score, `msae synth`."""
import json

import numpy as np
import pytest

from msae.cache import open_cache
from msae.cli import main
from msae.errors import MsaeError
from msae.synthetic import GroundTruth, make_world, recovery_score, sample


@pytest.fixture(scope="module")
def world():
    return make_world(d=64, roots=32, branching=(3, 2), active_roots=3.0, seed=0)


@pytest.fixture(scope="module")
def image(world):
    return sample(world, 20000, "image", seed=1)


def test_dictionary_and_hierarchy_shape(world):
    t = world.truth
    assert t.dictionary.shape == (32 + 96 + 192, 64)
    assert np.allclose(np.linalg.norm(t.dictionary, axis=1), 1.0, atol=1e-6)
    assert [int((t.level == lvl).sum()) for lvl in range(3)] == [32, 96, 192]
    assert (t.parent[t.level == 0] == -1).all()
    children = t.level > 0
    assert (t.level[t.parent[children]] == t.level[children] - 1).all()
    # a child leans towards its parent: cosine 0.4 by construction
    cos = (t.dictionary[children] * t.dictionary[t.parent[children]]).sum(1)
    assert np.allclose(cos, 0.4, atol=1e-5)


def test_sparsity_hierarchy_and_power_law(image, world):
    on = image.codes > 0
    t = image.truth
    children = np.flatnonzero(t.level > 0)
    assert not (on[:, children] & ~on[:, t.parent[children]]).any(), "a child fired without its parent"
    assert (image.codes >= 0).all()
    roots_active = on[:, t.level == 0].sum(1).mean()
    assert roots_active == pytest.approx(3.0, rel=0.05)
    assert 7.0 < image.codes_l0 < 11.0 and on.mean() < 0.05  # sparse: about 9 of 320 features
    f = on[:, t.level == 0].mean(0)
    assert f[0] / f[15] == pytest.approx(16 ** 0.8, rel=0.15)  # power law, exponent 0.8
    assert f[0] > f[7] > f[31]


def test_clip_like_geometry_and_modality_gap(world, image):
    text = sample(world, 20000, "text", seed=3)
    mean_i, mean_t = image.x.mean(0), text.x.mean(0)
    spread = np.linalg.norm(image.x - mean_i, axis=1).mean()
    assert np.linalg.norm(mean_i) > 2 * spread  # a large shared offset dominates, as in CLIP
    assert np.linalg.norm(mean_i - mean_t) == pytest.approx(4.0, rel=0.1)
    ev = np.linalg.eigvalsh(np.cov((image.x - image.codes @ image.dictionary).T))
    assert ev[-1] / ev[0] > 20  # anisotropic noise


def test_recovery_score_true_random_and_shuffled(image):
    t = image.truth
    exact = recovery_score(t.dictionary * 3.0, t)  # scale does not matter
    assert exact["recovery"] == pytest.approx(1.0, abs=1e-6)
    assert set(exact) == {"recovery", "recovery_level0", "recovery_level1", "recovery_level2"}
    rand = recovery_score(np.random.default_rng(123).standard_normal((512, 64)), t)
    assert rand["recovery"] < 0.5
    roots_only = recovery_score(t.dictionary[t.level == 0], t)
    assert roots_only["recovery_level0"] == pytest.approx(1.0, abs=1e-6)
    assert roots_only["recovery_level2"] < 0.6
    with pytest.raises(MsaeError, match="dimension 8, the ground truth 64"):
        recovery_score(np.ones((4, 8)), t)


def test_synth_cli_caches_truth_and_evaluate_recovery(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["synth", "--out", str(out), "--n", "3000", "--n-val", "500", "--d", "32", "--roots", "8",
                 "--branching", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["image_train.arrow", "image_val.arrow", "text_train.arrow", "text_val.arrow", "truth.safetensors",
                     "vocab.arrow"]
    c = open_cache(out / "text_val.arrow", verify=True)
    assert (c.info.n, c.info.d, c.info.modality, c.info.split, c.info.model) == (500, 32, "text", "val", "synthetic")
    truth = GroundTruth.load(out / "truth.safetensors")
    assert truth.dictionary.shape == (8 + 16, 32) and c.info.extra["features"] == 24
    assert main(["synth", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    sae = tmp_path / "sae"
    assert main(["train", "--data", str(out / "image_train.arrow"), "--method", "topk", "--k", "4", "--expansion", "2",
                 "--epochs", "2", "--batch-size", "300", "--lr", "0.004", "--quiet", "--out", str(sae)]) == 0
    res_file = tmp_path / "r.json"
    assert main(["evaluate", str(sae), "--data", str(out / "image_val.arrow"), "--truth", str(out / "truth.safetensors"),
                 "--out", str(res_file)]) == 0
    rec = json.loads(res_file.read_text())["recovery"]
    assert 0.3 < rec["recovery"] <= 1.0 and set(rec) == {"recovery", "recovery_level0", "recovery_level1"}
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert main(["evaluate", str(sae), "--data", str(out / "image_val.arrow"), "--truth",
                 str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "r2.json")]) == 2
    assert "not a ground-truth file" in capsys.readouterr().err and not (tmp_path / "r2.json").exists()
