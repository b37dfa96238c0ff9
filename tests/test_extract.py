"""`msae extract` with a tiny random-init open_clip model loaded from local files (no downloads)."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from msae.cache import open_cache
from msae.cli import main

TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
CAPTIONS = ["a photo of a cat", "a dog on the grass", "", "the red car, parked", "two birds"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config file, weights file, the in-memory model, its image transform, its tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_clip")
    cfg = root / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms("tiny-clip")
    model.eval()
    weights = root / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return cfg, weights, model, transform, open_clip.get_tokenizer("tiny-clip")


def _write_images(folder, count=10):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        p = folder / f"set{i % 3}" / ("deep" if i % 4 == 0 else "") / f"im{i:02d}.{'png' if i % 2 else 'jpg'}"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30 + 7 * i, 45 + 3 * i, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (folder / "set1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not listed")
    return sorted(paths, key=lambda p: p.relative_to(folder).as_posix())


def _expected_images(tiny, paths):
    _, _, model, transform, _ = tiny
    with torch.no_grad():
        return model.encode_image(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])).numpy()


def _extract(tiny, *args):
    cfg, weights = tiny[0], tiny[1]
    return main(["extract", "--model", str(cfg), "--pretrained", str(weights), "--quiet", *args])


def test_images_folder_equals_in_memory_model(tmp_path, tiny, capsys):
    paths = _write_images(tmp_path / "imgs")
    out = tmp_path / "img.arrow"
    assert _extract(tiny, "--images", str(tmp_path / "imgs"), "--batch-size", "4", "--workers", "2",
                    "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable input(s): set1/broken.jpg" in err
    c = open_cache(out, verify=True)
    assert c.ids == [p.relative_to(tmp_path / "imgs").as_posix() for p in paths]
    np.testing.assert_allclose(c.embeddings, _expected_images(tiny, paths), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.linalg.norm(c.embeddings, axis=1), 1.0)  # stored as returned, not L2-normalised
    assert (c.info.model, c.info.modality, c.info.d, c.info.extra["skipped"]) == ("tiny-clip", "image", 64, 1)
    assert c.info.pretrained.startswith("file:tiny-clip.safetensors:sha256:")
    assert c.info.extra["skipped_ids"] == ["set1/broken.jpg"]
    assert not (tmp_path / "img.arrow.partial").exists()
    # ImageFolder convention: the first folder level under the image folder is the label
    assert c.labels == [p.relative_to(tmp_path / "imgs").parts[0] for p in paths]


def test_labels_and_attributes_from_csv(tmp_path, tiny, capsys):
    paths = _write_images(tmp_path / "imgs", count=4)
    ids = [p.relative_to(tmp_path / "imgs").as_posix() for p in paths]
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"{i},class{n % 2}\n" for n, i in enumerate(ids))
                                         + "set1/broken.jpg,class9\n")
    (tmp_path / "attrs.csv").write_text("id,Smiling,Young\n" + "".join(
        f"{i},{1 if n % 2 else -1},{n % 2}\n" for n, i in enumerate(ids + ["set1/broken.jpg"])))
    out = tmp_path / "l.arrow"
    assert _extract(tiny, "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "labels.csv"),
                    "--attributes", str(tmp_path / "attrs.csv"), "--out", str(out)) == 0
    c = open_cache(out, verify=True)
    assert c.ids == ids and c.labels == [f"class{n % 2}" for n in range(4)]
    assert {k: v.tolist() for k, v in c.attributes.items()} == {"Smiling": [0, 1, 0, 1], "Young": [0, 1, 0, 1]}
    capsys.readouterr()
    # a row without a label, or without an attribute value: one line naming the first such id
    (tmp_path / "short.csv").write_text(f"id,label\n{ids[0]},a\n")
    (tmp_path / "attr_short.csv").write_text(f"id,Smiling\n{ids[0]},1\n")
    for option, csv_file, message in (("--labels", "short.csv", f"--labels: no label for id {ids[1]!r}"),
                                      ("--attributes", "attr_short.csv",
                                       f"attribute 'Smiling' has no value for id {ids[1]!r}")):
        bad = tmp_path / "bad.arrow"
        assert _extract(tiny, "--images", str(tmp_path / "imgs"), option, str(tmp_path / csv_file),
                        "--out", str(bad)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not bad.exists() and not (tmp_path / "bad.arrow.partial").exists()
    # images directly in the folder: no class folders, so no label column (and a note when mixed)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in paths[:2]:
        (flat / p.name).write_bytes(p.read_bytes())
    assert _extract(tiny, "--images", str(flat), "--out", str(tmp_path / "flat.arrow")) == 0
    assert open_cache(tmp_path / "flat.arrow").labels is None


def test_tar_shards_in_shard_then_member_order(tmp_path, tiny):
    paths = _write_images(tmp_path / "imgs", count=6)
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tf:
            for p in paths[s * 3:(s + 1) * 3]:
                tf.add(p, arcname=f"{p.stem}.{p.suffix[1:]}")
                cap = tmp_path / f"{p.stem}.txt"
                cap.write_text("caption")
                tf.add(cap, arcname=f"{p.stem}.txt")
    out = tmp_path / "shards.arrow"
    assert _extract(tiny, "--images", str(tmp_path / "shard-{000..001}.tar"), "--workers", "0", "--out", str(out)) == 0
    c = open_cache(out)
    assert c.ids == [f"shard-{i // 3:03d}.tar/{p.stem}.{p.suffix[1:]}" for i, p in enumerate(paths)]
    np.testing.assert_allclose(c.embeddings, _expected_images(tiny, paths), rtol=1e-5, atol=1e-5)


def test_texts_from_txt_csv_and_parquet(tmp_path, tiny):
    _, _, model, _, tok = tiny
    with torch.no_grad():
        expected = model.encode_text(tok(CAPTIONS)).numpy()
    (tmp_path / "caps.txt").write_text("\n".join(CAPTIONS) + "\n")
    pa.csv.write_csv(pa.table({"n": list(range(5)), "caption": CAPTIONS}), tmp_path / "caps.csv")
    pq.write_table(pa.table({"text": CAPTIONS}), tmp_path / "caps.parquet")
    for name, extra in (("caps.txt", []), ("caps.csv", ["--text-column", "caption"]), ("caps.parquet", [])):
        out = tmp_path / f"{name}.arrow"
        assert _extract(tiny, "--texts", str(tmp_path / name), *extra, "--batch-size", "2", "--out", str(out)) == 0
        c = open_cache(out, verify=True)
        assert c.texts == CAPTIONS and c.ids == ["0", "1", "2", "3", "4"] and c.info.modality == "text"
        np.testing.assert_allclose(c.embeddings, expected, rtol=1e-5, atol=1e-5)


def test_killed_extraction_resumes_to_an_identical_file(tmp_path, tiny):
    _write_images(tmp_path / "imgs", count=120)
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    cfg, weights = tiny[0], tiny[1]

    def cmd(out):
        return [sys.executable, "-m", "msae.cli", "extract", "--model", str(cfg), "--pretrained", str(weights),
                "--images", str(tmp_path / "imgs"), "--batch-size", "1", "--workers", "0", "--quiet", "--out", str(out)]

    subprocess.run(cmd(tmp_path / "whole.arrow"), env=env, check=True, capture_output=True)
    state = tmp_path / "cut.arrow.partial" / "state.json"
    proc = subprocess.Popen(cmd(tmp_path / "cut.arrow"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads(state.read_text())["inputs_done"]
        except (OSError, ValueError):
            done = 0
        if done >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert 10 <= done < 121 and proc.returncode == -signal.SIGKILL and not (tmp_path / "cut.arrow").exists()
    subprocess.run(cmd(tmp_path / "cut.arrow"), env=env, check=True, capture_output=True)
    assert (tmp_path / "cut.arrow").read_bytes() == (tmp_path / "whole.arrow").read_bytes()
    assert not (tmp_path / "cut.arrow.partial").exists()


def test_extract_bad_input(tmp_path, tiny, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "caps.txt").write_text("a\nb\n")
    (tmp_path / "two.csv").write_text("a,b\n1,2\n")
    cfg, weights = str(tiny[0]), str(tiny[1])
    cases = [
        (["--model", str(tmp_path / "nope.json"), "--pretrained", weights, "--texts", str(tmp_path / "caps.txt")],
         "no such model-config file"),
        (["--model", "ViT-Nonexistent", "--pretrained", weights, "--texts", str(tmp_path / "caps.txt")],
         "not an open_clip model name"),
        (["--model", cfg, "--pretrained", str(tmp_path / "missing.safetensors"), "--texts", str(tmp_path / "caps.txt")],
         "no such weights file"),
        (["--model", cfg, "--pretrained", weights, "--images", str(tmp_path / "empty")], "no image files"),
        (["--model", cfg, "--pretrained", weights, "--texts", str(tmp_path / "two.csv")], "choose one with --text-column"),
        (["--model", cfg, "--pretrained", weights, "--texts", str(tmp_path / "caps.txt"), "--device", "cuda:7"],
         "no such CUDA device"),
    ]
    for args, message in cases:
        out = tmp_path / "out.arrow"
        assert main(["extract", *args, "--quiet", "--out", str(out)]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists() and not (tmp_path / "out.arrow.partial").exists()
    # an unfinished extraction is not resumed with other arguments
    part = tmp_path / "x.arrow.partial"
    part.mkdir()
    (part / "state.json").write_text(json.dumps({"key": "other", "created": "", "skipped": []}))
    assert main(["extract", "--model", cfg, "--pretrained", weights, "--texts", str(tmp_path / "caps.txt"),
                 "--quiet", "--out", str(tmp_path / "x.arrow")]) == 2
    assert "different arguments" in capsys.readouterr().err
