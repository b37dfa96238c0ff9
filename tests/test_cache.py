"""The Arrow feature cache: round trip, zero-copy reads, importers and every corrupt-input case."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msae.cache import content_hash, is_cache, open_cache, write_cache
from msae.cli import main
from msae.data import load_array
from msae.errors import MsaeError
from msae.importers import import_features

META = dict(model="tiny", pretrained="none", modality="image", source="test", split="train")


@pytest.fixture
def emb():
    return np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)


def test_round_trip_float32_is_zero_copy(tmp_path, emb):
    ids = [f"img{i}.png" for i in range(300)]
    info = write_cache(tmp_path / "c.arrow", emb, ids, **META, extra={"note": 1})
    c = open_cache(tmp_path / "c.arrow", verify=True)
    assert np.array_equal(c.embeddings, emb) and c.embeddings.dtype == np.float32
    assert not c.embeddings.flags.writeable and not c.embeddings.flags.owndata
    assert c.ids == ids and c.texts is None
    assert c.info == info and (c.info.n, c.info.d, c.info.dtype, c.info.extra) == (300, 16, "float32", {"note": 1})
    assert c.info.content_hash == content_hash(emb, ids)
    assert is_cache(tmp_path / "c.arrow")
    assert [p.name for p in tmp_path.iterdir()] == ["c.arrow"]  # no temporary left behind


def test_float16_storage_upcasts_on_read(tmp_path, emb):
    write_cache(tmp_path / "h.arrow", emb, [str(i) for i in range(300)], **META, texts=["t"] * 300, dtype="float16")
    c = open_cache(tmp_path / "h.arrow", verify=True)
    assert c.info.dtype == "float16" and c.embeddings.dtype == np.float32
    assert np.array_equal(c.embeddings, emb.astype(np.float16).astype(np.float32))
    assert c.texts == ["t"] * 300
    assert (tmp_path / "h.arrow").stat().st_size < 300 * 16 * 4


def test_source_date_epoch_makes_files_identical(tmp_path, emb, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    ids = [str(i) for i in range(300)]
    write_cache(tmp_path / "a.arrow", emb, ids, **META)
    write_cache(tmp_path / "b.arrow", emb, ids, **META)
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()
    assert open_cache(tmp_path / "a.arrow").info.created == "2023-11-14T22:13:20Z"


def test_reading_a_cache_adds_no_private_copy(tmp_path):
    """Open a 128 MB cache, touch every value and a training-style batch gather: private memory stays flat."""
    big = np.random.default_rng(0).standard_normal((32768, 1024)).astype(np.float32)
    write_cache(tmp_path / "big.arrow", big, [str(i) for i in range(big.shape[0])], **META)
    write_cache(tmp_path / "small.arrow", big[:4], [str(i) for i in range(4)], **META)
    expected = float(big.astype(np.float64).sum())
    del big
    script = textwrap.dedent(f"""
        import json, torch
        from msae.data import load_array, as_tensor
        load_array({str(tmp_path / 'small.arrow')!r})  # one-time library imports are not the data's cost
        def anon():
            return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024
        before = anon()
        arr = load_array({str(tmp_path / 'big.arrow')!r})
        total = float(arr.sum(dtype='float64'))
        t = as_tensor(arr, torch.device('cpu'))
        batch = t.index_select(0, torch.arange(0, 32768, 64))
        print(json.dumps({{"growth": anon() - before, "total": total, "shares": t.data_ptr() == arr.ctypes.data}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size = 32768 * 1024 * 4
    assert abs(r["total"] - expected) < 1e-3 * abs(expected) + 1.0
    assert r["shares"]
    assert r["growth"] < 0.05 * size, f"private memory grew by {r['growth'] / 2**20:.1f} MB for a 128 MB cache"


def _corrupt_cases(tmp_path, emb):
    good = tmp_path / "good.arrow"
    write_cache(good, emb, [str(i) for i in range(300)], **META)
    raw = good.read_bytes()
    cases = {}
    cases["truncated"] = (raw[: len(raw) // 2], "truncated or corrupt")
    cases["garbage"] = (b"ARROW1" + b"\x00" * 200, "truncated or corrupt")
    # a plain Arrow file without our metadata
    plain = tmp_path / "plain.arrow"
    with pa.OSFile(str(plain), "wb") as f, pa.ipc.new_file(f, pa.schema([("x", pa.float32())])) as w:
        w.write_table(pa.table({"x": pa.array([1.0], pa.float32())}))
    cases["wrong-schema"] = (plain.read_bytes(), "not an msae feature cache")
    nan = emb.copy()
    nan[123, 4] = np.nan
    with pytest.raises(MsaeError, match="row 123 contains NaN"):  # msae never writes one
        write_cache(tmp_path / "nan.arrow", nan, [str(i) for i in range(300)], **META)
    made_elsewhere = bytearray(raw)  # the good file with one value turned into NaN
    pos = made_elsewhere.find(emb[123].tobytes()) + 4 * 4
    made_elsewhere[pos:pos + 4] = np.float32(np.nan).tobytes()
    cases["nan"] = (bytes(made_elsewhere), "row 123 contains NaN")
    return cases


def test_corrupt_caches_get_one_line_errors(tmp_path, emb):
    for name, (data, message) in _corrupt_cases(tmp_path, emb).items():
        p = tmp_path / f"{name}.bad.arrow"
        p.write_bytes(data)
        with pytest.raises(MsaeError) as e:
            load_array(p)
        assert message in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value), name


def test_flipped_data_byte_is_caught_by_verify(tmp_path, emb):
    p = tmp_path / "c.arrow"
    write_cache(p, emb, [str(i) for i in range(300)], **META)
    raw = bytearray(p.read_bytes())
    pos = raw.find(emb[10].tobytes())
    raw[pos + 1] ^= 0x01  # a tiny change to one value: finite, only the content hash can tell
    p.write_bytes(bytes(raw))
    assert open_cache(p).embeddings.shape == (300, 16)
    with pytest.raises(MsaeError, match="content hash mismatch"):
        open_cache(p, verify=True)
    assert main(["inspect", "--verify", str(p)]) == 2


def test_multiple_record_batches_and_dimension_mismatch(tmp_path, emb):
    p = tmp_path / "c.arrow"
    write_cache(p, emb, [str(i) for i in range(300)], **META)
    with pytest.raises(MsaeError, match="expected embeddings of dimension 8, got 16"):
        open_cache(p, expect_dim=8)
    t = pa.ipc.open_file(pa.memory_map(str(p))).read_all()
    two = tmp_path / "two.arrow"
    with pa.OSFile(str(two), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        for b in t.to_batches(max_chunksize=100):
            w.write_batch(b)
    with pytest.raises(MsaeError, match="exactly one record batch, found 3"):
        open_cache(two)


def test_cli_train_on_caches_and_dimension_mismatch(tmp_path, synth, capsys):
    ids = [str(i) for i in range(synth.x.shape[0])]
    write_cache(tmp_path / "train.arrow", synth.x, ids, **META)
    write_cache(tmp_path / "eval.arrow", synth.x[:500], ids[:500], **(META | {"split": "val"}))
    write_cache(tmp_path / "narrow.arrow", synth.x[:500, :-1], ids[:500], **(META | {"split": "val"}))
    out = tmp_path / "sae"
    rc = main(["train", "--data", str(tmp_path / "train.arrow"), "--eval", str(tmp_path / "narrow.arrow"),
               "--method", "topk", "--k", "4", "--expansion", "2", "--epochs", "1", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "narrow.arrow: expected embeddings of dimension 32, got 31" in err and not out.exists()
    rc = main(["train", "--data", str(tmp_path / "train.arrow"), "--eval", str(tmp_path / "eval.arrow"),
               "--method", "topk", "--k", "4", "--expansion", "2", "--epochs", "1", "--batch-size", "500",
               "--quiet", "--out", str(out)])
    assert rc == 0
    rc = main(["evaluate", str(out), "--data", str(tmp_path / "eval.arrow"), "--out", str(tmp_path / "e.json")])
    res = json.loads((tmp_path / "e.json").read_text())
    assert rc == 0 and 0 < res["own"]["fvu"] < 1 and res["own"]["l0"] == pytest.approx(4.0)


# ---------------------------------------------------------------- importers

def test_import_reference_npy_and_parquet_list_columns(tmp_path, emb):
    ref = tmp_path / "feats_300_16.npy"
    emb.tofile(ref)
    np.save(tmp_path / "plain.npy", emb)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 16)
    pq.write_table(pa.table({"vec": fixed, "id": [f"k{i}" for i in range(300)], "text": ["c"] * 300}),
                   tmp_path / "fixed.parquet")
    pq.write_table(pa.table({"vec": pa.array([list(map(float, r)) for r in emb], pa.list_(pa.float64())),
                             "label": list(range(300))}), tmp_path / "list.parquet")
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as f:
        tbl = pa.table({"e": fixed})
        with pa.ipc.new_stream(f, tbl.schema) as w:
            w.write_table(tbl)
    for src in ("feats_300_16.npy", "plain.npy", "fixed.parquet", "list.parquet", "t.arrow"):
        out = tmp_path / f"{src}.cache.arrow"
        assert main(["import-features", str(tmp_path / src), "--out", str(out), "--model", "ViT-B-16",
                     "--modality", "text"]) == 0
        c = open_cache(out, verify=True)
        assert np.array_equal(c.embeddings, emb), src
        assert (c.info.model, c.info.modality, c.info.source) == ("ViT-B-16", "text", str(tmp_path / src))
        assert c.ids == ([f"k{i}" for i in range(300)] if src == "fixed.parquet" else [str(i) for i in range(300)])
    assert open_cache(tmp_path / "fixed.parquet.cache.arrow").texts == ["c"] * 300


def test_import_id_text_label_and_attribute_columns(tmp_path, emb, capsys):
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(emb[:6].ravel()), 16)
    pq.write_table(pa.table({"vec": fixed, "key": [f"img{i}" for i in range(6)], "caption": list("abcdef"),
                             "cls": ["cat", "dog"] * 3, "Smiling": [1, -1] * 3, "Young": [0, 0, 1, 1, 0, 1]}),
                   tmp_path / "t.parquet")
    out = tmp_path / "t.arrow"
    assert main(["import-features", str(tmp_path / "t.parquet"), "--out", str(out), "--id-column", "key",
                 "--text-column", "caption", "--label-column", "cls", "--attribute-columns", "Smiling,Young"]) == 0
    c = open_cache(out, verify=True)
    assert c.ids == [f"img{i}" for i in range(6)] and c.texts == list("abcdef") and c.labels == ["cat", "dog"] * 3
    assert {k: v.tolist() for k, v in c.attributes.items()} == {"Smiling": [1, 0] * 3, "Young": [0, 0, 1, 1, 0, 1]}
    capsys.readouterr()
    pq.write_table(pa.table({"vec": fixed, "cls": ["cat", None, "dog", "dog", "cat", "cat"]}), tmp_path / "n.parquet")
    for args, message in ((["--label-column", "nope"], "--label-column nope: no such column"),
                          (["--label-column", "cls"], "no label for id '1'"),
                          (["--attribute-columns", "cls"], "--attribute-columns cls: holds 'cat'")):
        assert main(["import-features", str(tmp_path / "n.parquet"), "--out", str(tmp_path / "bad.arrow"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad.arrow").exists()


def test_import_errors(tmp_path, emb):
    ragged = pa.array([[1.0, 2.0], [1.0], [3.0, 4.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"v": ragged}), tmp_path / "ragged.parquet")
    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0], None], pa.list_(pa.float32()))}), tmp_path / "null.parquet")
    pq.write_table(pa.table({"a": pa.array([[1.0]], pa.list_(pa.float32())),
                             "b": pa.array([[1.0]], pa.list_(pa.float32()))}), tmp_path / "two.parquet")
    pq.write_table(pa.table({"v": pa.array([[1.0, float("inf")]], pa.list_(pa.float32()))}), tmp_path / "inf.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nonsense")
    cases = {"ragged.parquet": "row 1 has 1 values, row 0 has 2", "null.parquet": "row 1 is null",
             "two.parquet": "found ['a', 'b']; choose with --column", "inf.parquet": "row 0 contains NaN or Inf",
             "junk.parquet": "unreadable table"}
    for name, message in cases.items():
        with pytest.raises(MsaeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            import_features(tmp_path / name, tmp_path / "out.arrow")
        assert not (tmp_path / "out.arrow").exists()
    info = import_features(tmp_path / "two.parquet", tmp_path / "out.arrow", column="b")
    assert info.n == 1
    with pytest.raises(MsaeError, match="exists; choose another path or pass --overwrite"):
        import_features(tmp_path / "two.parquet", tmp_path / "out.arrow", column="b")
    assert sorted(os.listdir(tmp_path)) == sorted(list(cases) + ["out.arrow"])


@pytest.mark.slow
def test_cache_beyond_2_31_values_is_written_and_mapped(tmp_path):
    """The CC3M ViT-L/14 cache holds 2.2e9 values; one record batch of more than 2^31 - 1 values needs Arrow's
    64-bit IPC option. Written here from a sparse memory map (all zeros but two rows), 8.6 GB, then deleted."""
    import shutil
    rows, d = 2_796_300, 768  # 2,147,558,400 values: just above 2^31 - 1
    if shutil.disk_usage(tmp_path).free < 2.5 * rows * d * 4:
        pytest.skip("needs about 22 GB of free disk for the source and the cache")
    src = np.memmap(tmp_path / "src.f32", dtype=np.float32, mode="w+", shape=(rows, d))
    src[0] = 1.5
    src[-1] = -2.0
    src.flush()
    out = tmp_path / "big.arrow"
    try:
        info = write_cache(out, src, [str(i) for i in range(rows)], **META)
        assert (info.n, info.d) == (rows, d) and rows * d > 2**31
        c = open_cache(out)
        assert c.embeddings.shape == (rows, d) and not c.embeddings.flags.owndata
        assert float(c.embeddings[0, 5]) == 1.5 and float(c.embeddings[-1, 767]) == -2.0
        assert float(c.embeddings[rows // 2].sum()) == 0.0 and c.info.content_hash == info.content_hash
        del c
    finally:
        del src
        out.unlink(missing_ok=True)
        (tmp_path / "src.f32").unlink(missing_ok=True)
