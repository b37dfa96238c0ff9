"""`msae train` / `msae evaluate` as a user runs them, and every bad-input case (exit 2, nothing written)."""
import json
import subprocess
import sys

import numpy as np
import pytest

import msae
from msae.cli import main
from msae.data import load_array

from conftest import D


def _train(args, out):
    return main(["train", "--epochs", "2", "--batch-size", "500", "--quiet", "--out", str(out)] + args)


def test_train_and_evaluate_msae(synth_files, tmp_path):
    train, held = synth_files
    out = tmp_path / "msae"
    assert _train(["--data", str(train), "--eval", str(held), "--method", "msae", "--expansion", "4",
                   "--levels", "8,16,32,128", "--weighting", "uw", "--lr", "2e-3"], out) == 0
    sae = msae.load(out)
    assert sae.cfg.levels == (8, 16, 32, 128) and sae.cfg.alphas == (1, 1, 1, 1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["lr"] == 2e-3 and cfg["data"]["rows"] == 5000
    assert cfg["data"]["fingerprint"].startswith("sha256-sampled:")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["history"][0]["eval/fvu"] > metrics["history"][1]["eval/fvu"]
    assert metrics["final"]["eval"]["fvu"] == pytest.approx(metrics["history"][-1]["eval/fvu"])
    res_path = tmp_path / "eval.json"
    assert main(["evaluate", str(out), "--data", str(held), "--k", "8,32", "--out", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    assert set(res) == {"8", "32"}
    for key in ("fvu", "fvu_dataset", "cosine", "l0", "zero_fraction", "dead_fraction", "cknna_recon"):
        assert key in res["8"]
    assert res["8"]["l0"] <= 8 and res["32"]["fvu"] < res["8"]["fvu"]
    assert res["8"]["zero_fraction"] == pytest.approx(1 - res["8"]["l0"] / 128)


@pytest.mark.parametrize("method,extra", [("relu", ["--l1", "0.001"]), ("topk", ["--k", "8"]),
                                          ("batchtopk", ["--k", "8"])])
def test_train_each_method(synth_files, tmp_path, method, extra):
    train, held = synth_files
    out = tmp_path / method
    assert _train(["--data", str(train), "--method", method, "--expansion", "2", "--lr", "1e-3"] + extra, out) == 0
    sae = msae.load(out)
    assert sae.cfg.method == method and sae.n == 2 * D
    res_path = tmp_path / "e.json"
    assert main(["evaluate", str(out), "--data", str(held), "--k", "progressive", "--out", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    assert list(res) == ["own", "16", "32", "64"]
    assert res["own"]["fvu"] < 0.5


def test_reads_reference_headerless_files(synth, tmp_path):
    path = tmp_path / f"feats_train_image_{300}_{D}.npy"
    synth.x[:300].tofile(path)
    arr = load_array(path)
    assert arr.shape == (300, D) and np.array_equal(arr, synth.x[:300])
    bad = tmp_path / f"feats_{301}_{D}.npy"
    synth.x[:300].tofile(bad)
    out = tmp_path / "o"
    assert _train(["--data", str(bad), "--method", "topk"], out) == 2
    assert not out.exists()


def _bad(tmp_path, capsys, args, expect):
    out = tmp_path / "out"
    code = _train(args, out)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("msae: error:") and expect in err[0], err
    assert not out.exists()


def test_bad_inputs(synth_files, synth, tmp_path, capsys):
    train, held = synth_files
    wrong_dim = tmp_path / "wrong.npy"
    np.save(wrong_dim, synth.x[:100, :D - 1])
    _bad(tmp_path, capsys, ["--data", str(train), "--eval", str(wrong_dim), "--method", "topk"],
         f"expected embeddings of dimension {D}, got {D - 1}")
    nan = tmp_path / "nan.npy"
    arr = synth.x[:100].copy()
    arr[42, 3] = np.nan
    np.save(nan, arr)
    _bad(tmp_path, capsys, ["--data", str(nan), "--method", "topk"], "row 42 contains NaN or Inf")
    inf = tmp_path / "inf.npy"
    arr[42, 3] = np.inf
    np.save(inf, arr)
    _bad(tmp_path, capsys, ["--data", str(inf), "--method", "topk"], "row 42")
    _bad(tmp_path, capsys, ["--data", str(train), "--method", "topk", "--k", "1000", "--expansion", "2"],
         "k: expected an integer between 1 and n=64")
    _bad(tmp_path, capsys, ["--data", str(train), "--method", "msae", "--expansion", "2", "--levels", "8,16,64",
                            "--alphas", "1,2"], "alphas: expected 3 weights")
    _bad(tmp_path, capsys, ["--data", str(train), "--method", "msae", "--expansion", "2", "--levels", "16,8"],
         "strictly ascending")
    _bad(tmp_path, capsys, ["--data", str(tmp_path / "missing.npy"), "--method", "topk"], "no such file")
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x93NUMPY garbage that is not an array")
    _bad(tmp_path, capsys, ["--data", str(garbage), "--method", "topk"], "garbage.npy")
    _bad(tmp_path, capsys, ["--data", str(train), "--method", "topk", "--device", "bogus"],
         "--device: expected auto, cpu, cuda or cuda:N, got 'bogus'")
    _bad(tmp_path, capsys, ["--data", str(train), "--method", "topk", "--device", "cuda:7"],
         "--device cuda:7: no such CUDA device here")
    one_d = tmp_path / "flat.npy"
    np.save(one_d, np.zeros(10, dtype=np.float32))
    _bad(tmp_path, capsys, ["--data", str(one_d), "--method", "topk"], "expected a 2-D array")


def test_unknown_method_and_evaluate_errors(synth_files, tmp_path, capsys):
    train, held = synth_files
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(train), "--method", "sparse", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'sparse'" in capsys.readouterr().err
    out = tmp_path / "res.json"
    assert main(["evaluate", str(tmp_path / "nope"), "--data", str(held), "--out", str(out)]) == 2
    assert "not an msae checkpoint" in capsys.readouterr().err and not out.exists()
    ck = tmp_path / "ck"
    assert _train(["--data", str(train), "--method", "topk", "--k", "4", "--expansion", "1"], ck) == 0
    assert main(["evaluate", str(ck), "--data", str(held), "--k", "999", "--out", str(out)]) == 2
    assert "out of range; expected 1..32" in capsys.readouterr().err and not out.exists()


def test_console_script_exit_code(tmp_path):
    res = subprocess.run([sys.executable, "-m", "msae.cli", "train", "--data", str(tmp_path / "none.npy"),
                          "--method", "topk", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == f"msae: error: {tmp_path / 'none.npy'}: no such file"
