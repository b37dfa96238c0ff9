"""Outputs never destroy the user's files, and bad input of every kind gets one line, exit 2, nothing written."""
import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import msae
from msae import checkpoint
from msae.cli import main
from msae.errors import MsaeError
from msae.sae import create_sae, sae_config

from conftest import D

REPO = Path(__file__).resolve().parent.parent


def _one_line_error(capsys, code: int, expect: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("msae: error:") and expect in err and "\n" not in err, err
    return err


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--method", "topk", "--k", "4", "--expansion", "1", "--epochs", "1",
                 "--batch-size", "500", "--quiet", "--out", str(out), *extra])


# ---------------------------------------------------------------- outputs

def test_train_out_never_deletes_a_users_folder(synth_files, tmp_path, capsys):
    train, held = synth_files
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "train.npy", np.load(train))
    (data / "notes.txt").write_text("mine")
    _one_line_error(capsys, _train(data / "train.npy", data), "exists and is not empty")
    assert sorted(p.name for p in data.iterdir()) == ["notes.txt", "train.npy"]
    # with --overwrite, msae writes its files beside the user's and touches nothing else
    assert _train(data / "train.npy", data, "--overwrite") == 0
    assert sorted(p.name for p in data.iterdir()) == ["config.json", "metrics.json", "model.safetensors", "notes.txt",
                                                      "train.npy"]
    assert (data / "notes.txt").read_text() == "mine" and msae.load(data).cfg.k == 4
    # replacing a checkpoint in place works too, and an empty folder needs no flag
    assert _train(data / "train.npy", data, "--overwrite", "--seed", "3") == 0
    assert json.loads((data / "config.json").read_text())["train"]["seed"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(data / "train.npy", empty) == 0 and msae.load(empty).n == D


def test_import_reference_and_evaluate_outputs(synth_files, tmp_path, capsys):
    from test_reference_import import N as RN, _write_reference
    train, held = synth_files
    ref = tmp_path / f"{RN}_16_TopKReLU_8_False_False_0.0_x.pth"
    _write_reference(ref)
    out = tmp_path / "dst"
    out.mkdir()
    (out / "keep.bin").write_bytes(b"\x00\x01")
    _one_line_error(capsys, main(["import-reference", str(ref), str(out)]), "exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.bin"]
    assert main(["import-reference", str(ref), str(out), "--overwrite"]) == 0
    assert (out / "keep.bin").read_bytes() == b"\x00\x01" and msae.load(out).cfg.k == 8
    ck = tmp_path / "ck"
    assert _train(train, ck) == 0
    capsys.readouterr()
    res = tmp_path / "res.json"
    res.write_text("{}")
    _one_line_error(capsys, main(["evaluate", str(ck), "--data", str(held), "--out", str(res)]), "exists")
    assert res.read_text() == "{}"
    assert main(["evaluate", str(ck), "--data", str(held), "--out", str(res), "--overwrite"]) == 0
    assert json.loads(res.read_text())["own"]["l0"] <= 4


def test_synth_out_replaces_only_its_own_files(tmp_path, capsys):
    out = tmp_path / "syn"
    out.mkdir()
    (out / "paper.pdf").write_text("x")
    _one_line_error(capsys, main(["synth", "--out", str(out), "--n", "50", "--n-val", "20", "--d", "8"]),
                    "exists and is not empty")
    assert main(["synth", "--out", str(out), "--n", "50", "--n-val", "20", "--d", "8", "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == sorted(["paper.pdf", "image_train.arrow", "image_val.arrow",
                                                            "text_train.arrow", "text_val.arrow", "truth.safetensors",
                                                            "vocab.arrow"])
    assert (out / "paper.pdf").read_text() == "x"


# ---------------------------------------------------------------- bad input

def _checkpoint(tmp_path: Path) -> Path:
    sae = create_sae(sae_config("topk", 8, 16, k=4))
    return checkpoint.save(sae, tmp_path / "ck")


@pytest.mark.parametrize("change, expect", [
    (lambda c: [1, 2], "expected a JSON object, got list"),
    (lambda c: {k: v for k, v in c.items() if k != "sae"}, "lacks the 'sae' settings"),
    (lambda c: {**c, "sae": {**c["sae"], "d": "8"}}, "d and n must be positive integers, got d='8'"),
    (lambda c: {**c, "sae": {**c["sae"], "n": 2 ** 33}}, "exceeds the sanity cap"),
    (lambda c: {**c, "sae": {**c["sae"], "n": 32}}, "tensor W_enc has shape [8, 16]; the config (d=8, n=32) needs [8, 32]"),
    (lambda c: {**c, "sae": {**c["sae"], "method": "sparse"}}, "method: expected one of relu, topk"),
    (lambda c: {**c, "sae": {**c["sae"], "k": None}}, "k: expected an integer between 1 and n=16"),
    (lambda c: {**c, "format_version": 99}, "format_version 99"),
])
def test_bad_checkpoint_configs(tmp_path, capsys, change, expect):
    ck = _checkpoint(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(change(cfg)))
    out = tmp_path / "e.json"
    _one_line_error(capsys, main(["evaluate", str(ck), "--data", str(ck / "config.json"), "--out", str(out)]), expect)
    assert not out.exists()


def test_nonfinite_weights_are_refused(tmp_path, capsys):
    ck = _checkpoint(tmp_path)
    sae = msae.load(ck)
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    state["W_dec"][3, 2] = float("nan")
    save_file(state, str(ck / "model.safetensors"))
    with pytest.raises(MsaeError, match="tensor W_dec holds NaN or Inf"):
        msae.load(ck)


def _ref_obj(model=None, **over):
    g = torch.Generator().manual_seed(0)
    model = model if model is not None else {
        "pre_bias": torch.zeros(16), "encoder": torch.randn(16, 64, generator=g), "latent_bias": torch.zeros(64),
        "decoder": torch.randn(64, 16, generator=g), "latents_activation_frequency": torch.zeros(64, dtype=torch.int64)}
    return {"model": model, "mean_center": torch.zeros(16), "scaling_factor": 0.5, "target_norm": np.float64(4.0), **over}


@pytest.mark.parametrize("obj, expect", [
    (_ref_obj(model=[1, 2]), "expected a dict with a 'model' state dict"),
    (_ref_obj(mean_center=torch.zeros(5)), "mean_center should be a finite tensor of 16 values, got [5]"),
    (_ref_obj(scaling_factor="big"), "scaling_factor should be a positive number"),
    (_ref_obj(scaling_factor=float("nan")), "scaling_factor should be a positive finite number"),
    (_ref_obj(scaling_factor=0.0), "scaling_factor should be a positive finite number"),
    (_ref_obj(model={"pre_bias": torch.zeros(16)}), "model.encoder should be a tensor of shape [16, 64]"),
])
def test_bad_reference_checkpoints(tmp_path, capsys, obj, expect):
    path = tmp_path / "64_16_TopKReLU_8_False_False_0.0_x.pth"
    torch.save(obj, path)
    out = tmp_path / "o"
    _one_line_error(capsys, main(["import-reference", str(path), str(out)]), expect)
    assert not out.exists()


def test_tiny_and_out_of_range_training_data(tmp_path, capsys):
    one = tmp_path / "one.npy"
    np.save(one, np.ones((1, 8), np.float32))
    _one_line_error(capsys, _train(one, tmp_path / "o1"), "1 row(s); expected at least 2")
    big = tmp_path / "big.npy"
    arr = np.ones((10, 8), np.float64)
    arr[7, 2] = 1e300
    np.save(big, arr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning before the error
        _one_line_error(capsys, _train(big, tmp_path / "o2"), "row 7 holds a value beyond the float32 range")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_float16_import_refuses_values_it_cannot_hold(tmp_path, capsys):
    arr = np.ones((20, 8), np.float32)
    arr[11, 0] = 70000.0
    np.save(tmp_path / "x.npy", arr)
    out = tmp_path / "x.arrow"
    _one_line_error(capsys, main(["import-features", str(tmp_path / "x.npy"), "--dtype", "float16", "--out", str(out)]),
                    "row 11 holds a value beyond the float16 range")
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "x.npy"]
    assert main(["import-features", str(tmp_path / "x.npy"), "--out", str(out)]) == 0  # float32 holds it


@pytest.mark.parametrize("kind", ["pickle-payload", "truncated"])
def test_extract_refuses_bad_weights_in_one_line(tmp_path, kind):
    from test_extract import TINY

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    weights = tmp_path / "w.pt"
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    if kind == "pickle-payload":
        torch.save({"state_dict": Payload()}, weights, pickle_module=pickle)
    else:
        torch.save({"x": torch.zeros(1000)}, weights)
        weights.write_bytes(weights.read_bytes()[:300])
    (tmp_path / "img").mkdir()
    from PIL import Image
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "a.png")
    out = tmp_path / "c.arrow"
    res = subprocess.run([sys.executable, "-m", "msae.cli", "extract", "--model", str(cfg), "--pretrained", str(weights),
                          "--images", str(tmp_path / "img"), "--quiet", "--out", str(out)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    err = res.stderr.strip()
    assert res.returncode == 2 and err.startswith("msae: error: --pretrained") and "\n" not in err, err
    assert not marker.exists() and not out.exists()
