"""The interpretation suite on the synthetic ground truth: labelled caches and the vocabulary from
`msae synth`, probe fidelity, naming, seed alignment, and their CLI errors."""
import json

import numpy as np
import pytest
import torch

from msae import checkpoint
from msae.cache import open_cache, write_cache
from msae.cli import main
from msae.config import TrainConfig
from msae.errors import MsaeError
from msae.interpret.align import align, directions
from msae.interpret.naming import name_latents
from msae.interpret.probe import Probe, probe_fidelity, train_probe
from msae.sae import create_sae, sae_config
from msae.synthetic import GroundTruth, feature_names, write_synthetic
from msae.train import fit

D, N = 32, 256


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    files = write_synthetic(root / "data", 6000, 2000, d=D, roots=12, branching=(2, 2), active_roots=1.5, seed=0)
    train, val = open_cache(files["image_train"]), open_cache(files["image_val"])
    models = {}
    for name, epochs, seed in (("good", 12, 0), ("seed1", 12, 1), ("weak", 1, 0)):
        sae = create_sae(sae_config("topk", D, N, k=8), seed)
        fit(sae, np.asarray(train.embeddings), TrainConfig(lr=4e-3 if epochs > 1 else 2e-4, epochs=epochs,
                                                             batch_size=256, seed=seed), progress=False)
        models[name] = sae
        checkpoint.save(sae, root / name)
    return {"root": root, "files": files, "train": train, "val": val, "models": models,
            "truth": GroundTruth.load(files["truth"])}


def test_synth_writes_labels_and_vocabulary(world):
    train, truth = world["train"], world["truth"]
    names = feature_names(truth)
    labels = train.labels
    assert labels is not None and len(labels) == train.info.n
    roots = {names[i] for i in np.flatnonzero(truth.level == 0)}
    assert set(labels) <= roots | {"none"} and len(set(labels) & roots) >= 8
    vocab = open_cache(world["files"]["vocab"])
    assert vocab.texts == names and vocab.info.modality == "text" and vocab.info.n == truth.dictionary.shape[0]
    assert names[:2] == ["r0", "r1"] and "r0.0" in names and "r0.0.1" in names
    assert open_cache(world["files"]["text_train"]).labels is None
    # the label column enters the content hash, and --verify checks it
    assert open_cache(world["files"]["image_train"], verify=True).info.content_hash.startswith("sha256:")


def test_cache_refuses_rows_without_a_label(tmp_path):
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(MsaeError, match=r"row 1 \(id 'b'\) has no label"):
        write_cache(tmp_path / "c.arrow", x, ["a", "b", "c"], labels=["x", "", "y"], model="m", pretrained="p",
                    modality="image", source="s")
    assert not list(tmp_path.iterdir())


def test_probe_fidelity_ranks_trained_above_undertrained(world, tmp_path):
    train, val = world["train"], world["val"]
    probe, report = train_probe(np.asarray(train.embeddings), train.labels, seed=0)
    assert report["holdout_accuracy"] > 0.7, report
    again, _ = train_probe(np.asarray(train.embeddings), train.labels, seed=0)
    assert torch.equal(again.weight, probe.weight), "the probe must be deterministic"
    probe.save(tmp_path / "p.safetensors")
    loaded = Probe.load(tmp_path / "p.safetensors")
    assert torch.equal(loaded.weight, probe.weight) and loaded.classes == probe.classes
    good = probe_fidelity(world["models"]["good"], probe, val.embeddings, val.labels, [None, 4])
    weak = probe_fidelity(world["models"]["weak"], probe, val.embeddings, val.labels)
    assert good["own"]["kl"] < weak["own"]["kl"] and good["own"]["agreement"] > weak["own"]["agreement"]
    assert good["own"]["kl"] < good["4"]["kl"], "fewer latents must lose more of what the probe reads"
    assert good["own"]["accuracy_original"] == weak["own"]["accuracy_original"]
    assert 0 <= good["own"]["kl"] and good["own"]["agreement"] > 0.8


def test_naming_finds_the_true_features(world):
    truth, vocab = world["truth"], open_cache(world["files"]["vocab"])
    names = feature_names(truth)
    sae = world["models"]["good"]
    nm = name_latents(sae, vocab.embeddings, vocab.texts, top=3)
    W = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=1).numpy()
    cos = W @ truth.dictionary.astype(np.float64).T
    matched = np.flatnonzero(cos.max(1) > 0.9)
    assert matched.size >= 10
    right = [nm.names[j][0] == names[cos[j].argmax()] for j in matched]
    assert np.mean(right) >= 0.8, np.mean(right)
    assert nm.named[matched].mean() >= 0.8
    # a random dictionary names almost nothing at the calibrated threshold
    rand = create_sae(sae_config("topk", D, N, k=8), 5)
    rand.load_state_dict(sae.state_dict())
    with torch.no_grad():
        rand.W_dec.copy_(torch.nn.functional.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(3)), dim=1))
    assert name_latents(rand, vocab.embeddings, vocab.texts).named.mean() <= 0.05
    ref = name_latents(sae, vocab.embeddings, vocab.texts, mapping="reference")
    ref_right = np.mean([ref.names[j][0] == names[cos[j].argmax()] for j in matched])
    assert ref_right < np.mean(right), "the centred mapping is the default because it names better"
    freq = name_latents(sae, vocab.embeddings, vocab.texts, data=world["val"].embeddings).frequency
    assert freq.shape == (N,) and abs(freq.sum() - 8.0) < 1e-6  # TopK k=8: 8 firing latents per row


def test_alignment_self_seed_and_random(world):
    good, seed1 = world["models"]["good"], world["models"]["seed1"]
    a = directions(good, "decoder")
    assert align(a, a)["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    between = align(a, directions(seed1, "decoder"))["mean_cosine"]
    rand = torch.nn.functional.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(9)), dim=1).numpy()
    chance = align(a, rand)["mean_cosine"]
    assert chance < between < 1.0, (chance, between)
    res = align(a, directions(seed1, "encoder"))
    assert sum(res["histogram"]["counts"]) == N and res["matched"] == N
    # a permuted copy: the matching is the permutation, whatever the row blocks of the cosine matrix
    perm = np.random.default_rng(3).permutation(N)
    for chunk in (7, N, 4096):
        res = align(a, a[perm], chunk=chunk)
        assert res["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert np.array_equal(perm[res["pairs"][:, 1]], res["pairs"][:, 0])
    tall = align(a, a[: N // 2])  # more latents in the first model: min(n_a, n_b) pairs
    assert tall["matched"] == N // 2 and tall["mean_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_cli_probe_name_align(world, tmp_path, capsys):
    root, files = world["root"], world["files"]
    out = tmp_path / "probe.json"
    assert main(["probe", str(root / "good"), "--data", str(files["image_train"]), "--eval", str(files["image_val"]),
                 "--k", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"4", "probe"} and res["4"]["rows"] == 2000 and 0 <= res["4"]["agreement"] <= 1
    saved = tmp_path / "probe.probe.safetensors"
    assert saved.is_file() and res["probe"]["file"] == str(saved)
    out2 = tmp_path / "probe2.json"
    assert main(["probe", str(root / "good"), "--data", str(files["image_train"]), "--eval", str(files["image_val"]),
                 "--k", "4", "--probe", str(saved), "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["4"] == res["4"]
    csv_out = tmp_path / "names.csv"
    assert main(["name", str(root / "good"), "--vocab", str(files["vocab"]), "--out", str(csv_out)]) == 0
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith("latent,name,score,named") and len(lines) == N + 1
    assert "named " in capsys.readouterr().out
    al = tmp_path / "align.json"
    assert main(["align", str(root / "good"), str(root / "good"), "--out", str(al)]) == 0
    assert json.loads(al.read_text())["mean_cosine"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("case", ["unlabelled", "vocab-dim", "exists"])
def test_cli_bad_input_one_line_exit_2_nothing_written(world, tmp_path, capsys, case):
    root, files = world["root"], world["files"]
    out = tmp_path / "o.json"
    if case == "unlabelled":
        argv = ["probe", str(root / "good"), "--data", str(files["text_train"]), "--out", str(out)]
        expect = "has no label column"
    elif case == "vocab-dim":
        other = tmp_path / "v.arrow"
        write_cache(other, np.ones((3, D + 1), np.float32), ["a", "b", "c"], texts=["a", "b", "c"], model="m",
                    pretrained="p", modality="text", source="s")
        argv = ["name", str(root / "good"), "--vocab", str(other), "--out", str(out)]
        expect = f"dimension {D + 1}; the model has d = {D}"
    else:
        out.write_text("keep")
        argv = ["align", str(root / "good"), str(root / "seed1"), "--out", str(out)]
        expect = "exists; choose another path or pass --overwrite"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert (not out.exists()) if case != "exists" else out.read_text() == "keep"


def _true_feature_latent(sae, truth, feature: int) -> int:
    W = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=1).numpy()
    return int((W @ truth.dictionary[feature].astype(np.float64)).argmax())


def test_attribute_columns_round_trip(tmp_path):
    x = np.zeros((4, 3), np.float32)
    path = tmp_path / "a.arrow"
    write_cache(path, x, list("abcd"), attributes={"smiling": np.array([-1, 1, 1, -1])}, model="m", pretrained="p",
                modality="image", source="s")
    c = open_cache(path, verify=True)
    assert list(c.attributes) == ["smiling"] and c.attributes["smiling"].tolist() == [0, 1, 1, 0]
    with pytest.raises(MsaeError, match=r"attribute 'x' holds \[0, 2\]"):
        write_cache(tmp_path / "b.arrow", x, list("abcd"), attributes={"x": np.array([0, 2, 0, 0])}, model="m",
                    pretrained="p", modality="image", source="s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.arrow"]


def test_search_returns_rows_of_the_latents_feature(world):
    sae, truth, val = world["models"]["good"], world["truth"], world["val"]
    from msae.interpret.search import steer, top_rows
    from msae.synthetic import make_world, sample
    feature = int(np.flatnonzero(truth.level == 1)[0])
    latent = _true_feature_latent(sae, truth, feature)
    hits = top_rows(sae, val.embeddings, latent, top=20)
    assert len(hits) == 20 and hits[0][1] >= hits[-1][1] > 0
    # the validation rows' true codes (the same world and sample seed as msae synth's image_val)
    codes = sample(make_world(d=D, roots=12, branching=(2, 2), active_roots=1.5, seed=0), 2000, "image", 2).codes
    assert np.allclose(sample(make_world(d=D, roots=12, branching=(2, 2), active_roots=1.5, seed=0), 2000, "image",
                              2).x, val.embeddings, atol=1e-5)
    assert np.mean([codes[i, feature] > 0 for i, _ in hits]) >= 0.9
    # steering a row without the feature toward it brings rows that have it
    query = int(np.flatnonzero(codes[:, feature] == 0)[0])
    near = steer(sae, val.embeddings, query, latent, scale=2.0, top=20)
    base = steer(sae, val.embeddings, query, latent, scale=0.0, top=20)
    assert np.mean([codes[i, feature] > 0 for i, _ in near]) > np.mean([codes[i, feature] > 0 for i, _ in base])


def test_bias_finds_the_attribute_feature_first(world):
    from msae.interpret.bias import attribute_bias
    from msae.synthetic import ATTRIBUTE, ATTRIBUTE_FEATURE
    sae, truth, val = world["models"]["good"], world["truth"], world["val"]
    attr = val.attributes[ATTRIBUTE]
    b = attribute_bias(sae, val.embeddings, attr, replicates=50)
    top = int(np.argmax(b.effect))
    # the most raised latent is one of the attribute feature's (the model may split a feature over a few latents)
    W = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=1).numpy()
    assert int((W[top] @ truth.dictionary.astype(np.float64).T).argmax()) == ATTRIBUTE_FEATURE
    assert b.ci[0, top] > 0 and b.ci[0, top] <= b.effect[top] <= b.ci[1, top]
    assert b.rate[1, top] > 0.4 and b.rate[0, top] < 0.1 * b.rate[1, top]
    assert b.effect[np.argmin(b.effect)] < 0.2 * b.effect[top]  # nothing is suppressed as strongly
    assert b.counts == (int((attr == 0).sum()), int(attr.sum()))


def test_cli_search_and_bias(world, tmp_path, capsys):
    root, files = world["root"], world["files"]
    assert main(["search", str(root / "good"), "--data", str(files["image_val"]), "--concept", "r1",
                 "--vocab", str(files["vocab"]), "--top", "5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and all(r["activation"] > 0 for r in rows)
    assert len({r["latent"] for r in rows}) == 1
    out = tmp_path / "steer.jsonl"
    assert main(["search", str(root / "good"), "--data", str(files["image_val"]), "--query", "0", "--add", "r1",
                 "--vocab", str(files["vocab"]), "--top", "3", "--out", str(out)]) == 0
    steered = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(steered) == 3 and all(-1 <= r["cosine"] <= 1 for r in steered)
    csv_out = tmp_path / "bias.csv"
    assert main(["bias", str(root / "good"), "--data", str(files["image_val"]), "--attribute", "has_r1",
                 "--vocab", str(files["vocab"]), "--top", "3", "--bootstrap", "20", "--out", str(csv_out)]) == 0
    lines = csv_out.read_text().splitlines()
    assert len(lines) == 7 and lines[1].startswith("more,1,") and lines[1].endswith(",r1")


@pytest.mark.parametrize("argv,expect", [
    (["search", "{good}", "--data", "{val}", "--latent", "999"], "--latent: 999 is out of range; expected 0..255"),
    (["search", "{good}", "--data", "{val}", "--concept", "nope", "--vocab", "{vocab}"], "not in the vocabulary"),
    (["bias", "{good}", "--data", "{val}", "--attribute", "smiling", "--out", "{out}"],
     "--attribute smiling: not an attribute column"),
])
def test_cli_search_bias_errors(world, tmp_path, capsys, argv, expect):
    files = world["files"]
    subs = {"good": str(world["root"] / "good"), "val": str(files["image_val"]), "vocab": str(files["vocab"]),
            "out": str(tmp_path / "o.csv")}
    assert main([a.format(**subs) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "o.csv").exists()


# ---------------------------------------------------------------- latent cards (msae report)

def test_latent_stats_agree_with_search_and_frequency(world):
    """Two implementations, one answer: the report's one-pass top rows are search's top rows, its
    frequencies are naming's, and every firing activation falls in one histogram bin."""
    from msae.interpret.naming import firing_frequency
    from msae.interpret.report import latent_stats
    from msae.interpret.search import top_rows
    sae, val = world["models"]["good"], world["val"]
    x = np.asarray(val.embeddings)
    st = latent_stats(sae, x, samples=6)
    assert np.allclose(st.frequency, firing_frequency(sae, x))
    assert np.allclose(st.hist.sum(1), st.frequency * x.shape[0])
    assert st.l0.shape == (2000,) and (st.l0 == 8).all()  # TopK, k = 8
    for j in np.flatnonzero(st.frequency > 0)[:40]:
        ref = top_rows(sae, x, int(j), 6)
        assert np.allclose(st.top_values[j][:len(ref)], [v for _, v in ref], rtol=1e-5)
        assert set(st.top_rows[j][:len(ref)]) >= {r for r, v in ref if v > ref[-1][1]}  # ties may swap
    dead = np.flatnonzero(st.frequency == 0)
    assert (st.top_rows[dead] == -1).all() and (st.peak[dead] == 0).all()


def test_cli_report_pages_cards_and_overwrite(world, tmp_path, capsys):
    import html.parser
    root, files = world["root"], world["files"]
    out = tmp_path / "report"
    assert main(["report", str(root / "good"), "--data", str(files["image_val"]), "--vocab", str(files["vocab"]),
                 "--per-page", "100", "--samples", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "msae-report.json").read_text())
    named = name_latents(world["models"]["good"], open_cache(files["vocab"]).embeddings,
                         open_cache(files["vocab"]).texts, top=5)
    assert summary["pages"] == 3 and summary["named_latents"] == int(named.named.sum())
    assert f"{summary['named_latents']} named" in capsys.readouterr().out
    for name in ("index.html", "index-2.html", "index-3.html", "cards-1.html", "cards-3.html", "overview.html",
                 "orthogonality.png", "activations.png"):
        assert (out / name).stat().st_size > 500, name
    index = (out / "index.html").read_text()
    html.parser.HTMLParser().feed(index)
    from msae.interpret.report import latent_stats
    st = latent_stats(world["models"]["good"], np.asarray(world["val"].embeddings))
    first = int(np.argmax(st.frequency))
    assert f"<td>1</td><td><a href='cards-1.html#l{first}'>{first}</a></td>" in index
    assert f"id='l{first}'" in (out / "cards-1.html").read_text()
    # an earlier report is replaced whole with --overwrite; a folder holding other files is refused
    assert main(["report", str(root / "good"), "--data", str(files["image_val"]), "--per-page", "300",
                 "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "msae-report.json").read_text())["pages"] == 1 and not (out / "index-2.html").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["report", str(root / "good"), "--data", str(files["image_val"]), "--out", str(other),
                 "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no msae-report.json" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".mine*"))


def test_cli_report_shows_image_thumbnails(world, tmp_path, capsys):
    """Rows of an image cache whose ids are paths under --images get thumbnails; an unreadable image
    falls back to its id."""
    from PIL import Image
    sae = world["models"]["good"]
    x = np.asarray(world["val"].embeddings[:40])
    ids = [f"cls{i % 3}/{i}.png" for i in range(40)]
    images = tmp_path / "images"
    for i, name in enumerate(ids):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (i * 6, 100, 200)).save(images / name)
    from msae.interpret.report import latent_stats
    bad = int(latent_stats(sae, x, samples=3).top_rows.max())  # a row that some card shows
    (images / ids[bad]).write_bytes(b"not an image")
    cache = tmp_path / "imgs.arrow"
    write_cache(cache, x, ids, model="m", pretrained="p", modality="image", source=str(images))
    out = tmp_path / "report"
    assert main(["report", str(world["root"] / "good"), "--data", str(cache), "--images", str(images),
                 "--samples", "3", "--out", str(out)]) == 0
    assert "1 images could not be read" in capsys.readouterr().out
    thumbs = sorted(p.name for p in (out / "thumbs").iterdir())
    assert thumbs and f"{bad}.jpg" not in thumbs and all(Image.open(out / "thumbs" / t).size[0] <= 192 for t in thumbs)
    cards = "".join(p.read_text() for p in out.glob("cards-*.html"))
    assert f"src='thumbs/{thumbs[0]}'" in cards and f"{ids[bad]}<br>" in cards
