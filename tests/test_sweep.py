"""Sweeps end to end: real Ray on 127.0.0.1, real MLflow (SQLite), real trials on tiny synthetic caches,
and the faults a sweep must survive (Ctrl-C, SIGKILL, a crashed trial, planted pickles), run as real processes."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

ray = pytest.importorskip("ray")
from mlflow.tracking import MlflowClient  # noqa: E402

from msae.cache import write_cache  # noqa: E402
from msae.cli import main  # noqa: E402
from msae.sweep.layout import SweepDir  # noqa: E402
from msae.sweep.ray_session import worker_env  # noqa: E402
from msae.sweep.runner import run_sweep  # noqa: E402
from msae.sweep.tracking import child_runs  # noqa: E402
from msae.synthetic import write_synthetic  # noqa: E402

CRASH_KEY = "topk_lr0.003_k8"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One private Ray for this module (2 CPUs, 127.0.0.1), with crash injection armed for CRASH_KEY and
    memory diagnostics on."""
    markers = tmp_path_factory.mktemp("crash-markers")
    os.environ["MSAE_INJECT_CRASH"] = f"{CRASH_KEY}@1:{markers}"
    os.environ["MSAE_DIAGNOSTICS"] = "memory"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    tmp = tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
    ray.init(address="local", _temp_dir=tmp, num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", runtime_env={"env_vars": worker_env()})
    yield markers
    ray.shutdown()
    os.environ.pop("MSAE_INJECT_CRASH", None)
    os.environ.pop("MSAE_DIAGNOSTICS", None)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweepdata") / "syn"
    write_synthetic(root, 2000, 400, d=16, roots=8, branching=(2,), seed=0)
    return root


@pytest.fixture
def work(tmp_path, mlflow_template, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    return tmp_path


def write_spec(work: Path, data_dir: Path, methods: dict, name: str = "t", **extra) -> Path:
    spec = {"name": name,
            "data": {"train": str(data_dir / "image_train.arrow"),
                     "eval": {"image_val": str(data_dir / "image_val.arrow"), "text_val": str(data_dir / "text_val.arrow")},
                     "truth": str(data_dir / "truth.safetensors")},
            "expansion": 4, "methods": methods,
            "training": {"epochs": 3, "batch_size": 500, "seed": 0},
            "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}, "storage": str(work / "sweeps")}
    for key, value in extra.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) else value
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def runs_of(uri: str, experiment: str, sweep_id: str):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c, exp.experiment_id, child_runs(c, exp.experiment_id, sweep_id)


def artifact_json(c, run_id: str, path: str, dst: Path):
    return json.loads(Path(c.download_artifacts(run_id, path, str(dst))).read_text())


def test_grid_sweep_end_to_end(ray_local, data_dir, work):
    methods = {"relu": {"lr": [0.003], "l1": [0.01]}, "topk": {"lr": [0.003], "k": [4, 8]},
               "msae": {"lr": [0.003], "levels_from": [4], "weighting": ["rw"]},
               "batchtopk": {"lr": [1.0e30], "k": [4]}}  # this one diverges
    spec = write_spec(work, data_dir, methods)
    s = run_sweep(str(spec), quiet=True)
    assert (s.counts["finished"], s.counts["diverged"], s.exit_code) == (4, 1, 0)
    c, exp_id, runs = runs_of(s.uri, "t", s.sweep_id)
    assert c.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    by_key = {r.data.tags["msae.trial_key"]: r for r in runs}
    assert sorted(by_key) == sorted(["relu_lr0.003_l10.01", "topk_lr0.003_k4", "topk_lr0.003_k8",
                                     "msae_lr0.003_from4_rw", "batchtopk_lr1e+30_k4"])
    assert all(r.data.tags["mlflow.parentRunId"] == s.parent_run_id for r in runs)
    assert by_key["topk_lr0.003_k4"].info.run_name == "topk k=4 lr=0.003"
    # the diverged trial is a failed run with its reason; the others finished
    bad = by_key.pop("batchtopk_lr1e+30_k4")
    assert bad.info.status == "FAILED" and "diverged" in bad.data.tags["msae.failure_reason"]
    assert all(r.info.status == "FINISHED" for r in by_key.values())
    # final metrics in MLflow equal the results in the sweep folder
    sweep = SweepDir(Path(s.sweep_dir))
    for key, run in by_key.items():
        m, t = run.data.metrics, sweep.result(key)["metrics"]
        for name in ("fvu", "l0", "cosine", "zero_fraction", "dead_fraction", "image_val/fvu", "text_val/fvu",
                     "recovery", "recovery_level1"):
            assert m[name] == pytest.approx(t[name], rel=1e-12), (key, name)
        assert 0 < m["fvu"] < 1 and m["image_val/l0"] == m["l0"]
        assert run.data.params["lr"] == "0.003"
        # only what a researcher compares is a metric: no diagnostics, no `epoch`, the schedule has its own name
        assert not {"epoch", "lr", "data_mb", "private_mb", "resumed", "cknna_rows", "epoch_seconds"} & set(m)
        assert not any(k.endswith("/rows") or k.endswith("_processed") for k in m) and "lr_schedule" in m
        hist = c.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(h.step for h in hist) == [1, 2, 3], key  # every epoch exactly once
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "sae")}
        assert {"sae/model.safetensors", "sae/config.json", "sae/metrics.json"} <= arts
        assert artifact_json(c, run.info.run_id, "sae/metrics.json", work)["final"]["fvu"] == m["fvu"]
        diag = artifact_json(c, run.info.run_id, "diagnostics.json", work)
        assert diag["final"]["image_val/rows"] == 400 and len(diag["epochs"]) == 3
    assert "k" not in by_key["relu_lr0.003_l10.01"].data.params and "l1" not in by_key["topk_lr0.003_k4"].data.params
    # the curve of a TopK-style trial: k = 16, 32, 64 (n = 64), as a table and a plot
    topk = by_key["topk_lr0.003_k4"].info.run_id
    assert [p["k"] for p in artifact_json(c, topk, "curve.json", work)] == [16, 32, 64]
    assert "curve.png" in {a.path for a in c.list_artifacts(topk)}
    assert "curve.json" not in {a.path for a in c.list_artifacts(by_key["relu_lr0.003_l10.01"].info.run_id)}
    # crashed once after epoch 1, retried from its saved state: epochs 2 and 3 ran resumed
    crashed = by_key[CRASH_KEY]
    assert (ray_local / CRASH_KEY).exists()
    diag = artifact_json(c, crashed.info.run_id, "diagnostics.json", work)
    assert {e["epoch"]: e["resumed"] for e in diag["epochs"]} == {1: 0, 2: 1, 3: 1}
    # Pareto artifacts on the parent, and in the sweep folder; the front's run ids are children
    parent = c.get_run(s.parent_run_id)
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "pareto")}
    assert {"pareto/fronts.json", "pareto/fronts.csv", "pareto/pareto_fvu.png", "pareto/pareto_one_minus_cosine.png"} <= arts
    assert (Path(s.sweep_dir) / "pareto" / "pareto_fvu.png").is_file()
    front_ids = parent.data.tags["msae.front_run_ids"].split(",")
    assert front_ids and set(front_ids) <= {r.info.run_id for r in by_key.values()}
    fronts = artifact_json(c, parent.info.run_id, "pareto/fronts.json", work)
    assert fronts["reference"] == {"l0": 64.0, "fvu": 1.0, "one_minus_cosine": 1.0}
    assert parent.data.metrics["hv/all/fvu"] == pytest.approx(fronts["fronts"]["all/fvu"]["hypervolume_fraction"])
    assert 0 < parent.data.metrics["hv/all/fvu"] <= 1
    assert parent.info.status == "FINISHED" and parent.data.params["n"] == "64"
    note = parent.data.tags["mlflow.note.content"]
    assert "Sparsity-fidelity front" in note and front_ids[0] not in note and "topk_lr0.003" in note
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"spec.yaml", "pareto"}
    assert SweepDir(Path(s.sweep_dir)).state()["status"] == "finished"
    # msae pareto recomputes the same fronts; msae sweeps lists the sweep
    assert main(["pareto", str(spec)]) == 0
    assert main(["sweeps", "--storage", str(work / "sweeps")]) == 0


@pytest.mark.parametrize("share, dtype, expect", [("auto", "float32", "file"), ("object_store", "float32", "object_store"),
                                                  ("auto", "float16", "object_store")])
def test_shared_cache_is_zero_copy_inside_trials(ray_local, work, share, dtype, expect):
    """A 128 MB cache reaches the trial without a private copy: mapped from the file, or through the object store
    (asked for, or needed: a float16 cache is upcast once, by the broker)."""
    rows, d = 32768, 1024
    x = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32) + 3.0
    write_cache(work / "big.arrow", x, [str(i) for i in range(rows)], model="m", pretrained="p", modality="image",
                source="test", dtype=dtype)
    write_cache(work / "big_val.arrow", x[:512], [str(i) for i in range(512)], model="m", pretrained="p",
                modality="image", source="test")
    del x
    spec = {"name": "zc", "data": {"train": str(work / "big.arrow"), "eval": {"val": str(work / "big_val.arrow")},
                                   "share": share},
            "expansion": 0.25, "methods": {"topk": {"lr": [0.001], "k": [8]}},
            "training": {"epochs": 3, "batch_size": 4096, "progressive": False},
            "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}, "storage": str(work / "sweeps")}
    (work / "zc.yaml").write_text(yaml.safe_dump(spec))
    s = run_sweep(str(work / "zc.yaml"), quiet=True)
    (key,) = SweepDir(Path(s.sweep_dir)).results()
    m = SweepDir(Path(s.sweep_dir)).result(key)["metrics"]
    assert m["data_access"] == expect and m["data_mb"] == pytest.approx(128.0)
    assert m["data_touch_private_mb"] < 0.03 * m["data_mb"], m["data_touch_private_mb"]
    assert m["private_growth_mb"] < 0.05 * m["data_mb"], m["private_growth_mb"]  # epochs 2-3: steady state
    mapping = m["data_mapping"]  # file pages mapped read-only (shared page cache), or shared object-store memory
    assert "[anon]" not in mapping, mapping
    if expect == "file":
        assert mapping.startswith("r--") and mapping.endswith("big.arrow"), mapping
    else:
        assert mapping.split()[0][3] == "s" and "big.arrow" not in mapping, mapping


def test_optuna_multi_objective_search(ray_local, data_dir, work):
    methods = {"topk": {"lr": {"min": 0.001, "max": 0.01}, "k": {"min": 2, "max": 16}},
               "relu": {"lr": [0.003], "l1": {"min": 0.001, "max": 0.1}}}
    spec = write_spec(work, data_dir, methods, name="opt",
                      search={"kind": "optuna", "trials": 4, "concurrency": 2, "sampler": "tpe", "seed": 0})
    s = run_sweep(str(spec), quiet=True)
    assert s.counts["finished"] == 4
    c, _, runs = runs_of(s.uri, "opt", s.sweep_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    db = Path(s.sweep_dir) / "optuna.db"
    with sqlite3.connect(db) as con:
        states = con.execute("SELECT state FROM trials").fetchall()
        values = con.execute("SELECT trial_id, objective, value FROM trial_values ORDER BY trial_id, objective").fetchall()
    assert [st for (st,) in states] == ["COMPLETE"] * 4
    assert len(values) == 8  # two objectives (FVU, L0) per trial
    fvus = sorted(v for _, o, v in values if o == 0)
    assert fvus == pytest.approx(sorted(r.data.metrics["fvu"] for r in runs), rel=1e-9)
    for r in runs:
        p = r.data.params
        assert 0.001 <= float(p["lr"]) <= 0.01
        if p["method"] == "topk":
            assert 2 <= int(p["k"]) <= 16


def test_asha_stops_a_bad_trial_early(ray_local, data_dir, work):
    methods = {"topk": {"lr": [0.004, 0.003, 0.002, 1.0e-7], "k": [8]}}
    spec = write_spec(work, data_dir, methods, name="asha", search={"kind": "grid", "concurrency": 1},
                      early_stopping={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
                      training={"epochs": 4, "batch_size": 500})
    s = run_sweep(str(spec), quiet=True)
    c, _, runs = runs_of(s.uri, "asha", s.sweep_id)
    by_key = {r.data.tags["msae.trial_key"]: r for r in runs}
    bad = by_key["topk_lr1e-07_k8"]
    epochs = len(c.get_metric_history(bad.info.run_id, "train_loss"))
    assert bad.data.tags.get("msae.stopped_early") == "true" and epochs < 4 and bad.info.status == "FINISHED"
    assert SweepDir(Path(s.sweep_dir)).result("topk_lr1e-07_k8")["status"] == "stopped_early"
    first = by_key["topk_lr0.004_k8"]
    assert len(c.get_metric_history(first.info.run_id, "train_loss")) == 4
    assert "curve.json" in {a.path for a in c.list_artifacts(first.info.run_id)}


def test_evaluation_section_logs_semantic_metrics_ranks_by_probe_kl_and_reports_best_models(ray_local, data_dir, work):
    """evaluation: probe + vocabulary, pareto.fidelity: probe_kl. Every finished trial gets probe_kl,
    probe_agreement, probe_accuracy and named_latents (also on its curve); the fronts gain the probe-KL
    plane with the mean-reconstruction KL as reference; the best model of each method gets its
    latent-card report; the trial's probe_kl equals `msae probe` with the sweep's saved probe."""
    methods = {"topk": {"lr": [0.003], "k": [4, 8]}, "msae": {"lr": [0.003], "levels_from": [4], "weighting": ["rw"]}}
    spec = write_spec(work, data_dir, methods, name="sem",
                      evaluation={"probe": {"data": str(data_dir / "image_train.arrow"),
                                            "eval": str(data_dir / "image_val.arrow")},
                                  "vocabulary": str(data_dir / "vocab.arrow")},
                      pareto={"fidelity": "probe_kl"})
    s = run_sweep(str(spec), quiet=True)
    assert (s.counts["finished"], s.exit_code) == (3, 0)
    sweep = SweepDir(Path(s.sweep_dir))
    mean_kl = sweep.state()["probe_mean_kl"]
    assert mean_kl > 0
    c, exp_id, runs = runs_of(s.uri, "sem", s.sweep_id)
    by_key = {r.data.tags["msae.trial_key"]: r for r in runs}
    for key, run in by_key.items():
        m, t = run.data.metrics, sweep.result(key)
        for name in ("probe_kl", "probe_agreement", "probe_accuracy", "named_latents"):
            assert m[name] == pytest.approx(t["metrics"][name], rel=1e-12), (key, name)
        assert 0 < m["probe_kl"] < mean_kl and 0 < m["probe_agreement"] <= 1
        assert 0 <= m["named_latents"] <= 64 and m["named_latents"] == int(m["named_latents"])
        assert all(0 <= p["probe_kl"] and 0 <= p["probe_agreement"] <= 1 for p in t["curve"])
    # the same number from the command line, with the sweep's saved probe
    key = "topk_lr0.003_k8"
    out = work / "probe.json"
    assert main(["probe", str(sweep.final_sae(key)), "--data", str(data_dir / "image_train.arrow"),
                 "--eval", str(data_dir / "image_val.arrow"), "--probe", str(sweep.probe_file),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["own"]["kl"] == pytest.approx(by_key[key].data.metrics["probe_kl"], rel=1e-4)
    # fronts: the probe-KL plane exists, against the mean-reconstruction KL, and the parent's front is it
    fronts = json.loads((sweep.pareto_dir / "fronts.json").read_text())
    assert fronts["reference"]["probe_kl"] == pytest.approx(mean_kl)
    kl_front = fronts["fronts"]["all/probe_kl"]
    assert kl_front["points"] and all(p["probe_kl"] is not None for p in kl_front["points"])
    parent = c.get_run(s.parent_run_id)
    assert parent.data.metrics["hv/all/probe_kl"] == pytest.approx(kl_front["hypervolume_fraction"])
    assert {by_key[k].info.run_id for k in kl_front["trials"]} == set(parent.data.tags["msae.front_run_ids"].split(","))
    assert "pareto/pareto_probe_kl.png" in {a.path for a in c.list_artifacts(parent.info.run_id, "pareto")}
    assert "probe KL" in parent.data.tags["mlflow.note.content"]
    # one report per method, on the best model of its probe-KL front, in the folder and on its run
    best = {fr["group"]: min(fr["points"], key=lambda p: (p["l0"] / 64) ** 2 + (p["probe_kl"] / mean_kl) ** 2)["trial"]
            for name, fr in fronts["fronts"].items() if name.endswith("/probe_kl") and fr["group"] != "all"}
    assert sorted(best) == ["msae", "topk"]
    reported = sorted(p.name for p in (sweep.root / "reports").iterdir())
    assert reported == sorted(best.values())
    for method, key in best.items():
        summary = json.loads((sweep.report_dir(key) / "msae-report.json").read_text())
        assert summary["n"] == 64 and summary["rows"] == 400 and summary["named_latents"] is not None
        assert "report/index.html" in {a.path for a in c.list_artifacts(by_key[key].info.run_id, "report")}
        assert key in parent.data.tags["mlflow.note.content"]
    # msae pareto recomputes the same probe-KL front and keeps the reports on the parent's note
    assert main(["pareto", str(spec)]) == 0
    again = json.loads((sweep.pareto_dir / "fronts.json").read_text())
    assert again["fronts"]["all/probe_kl"] == kl_front and again["reference"] == fronts["reference"]
    assert all(k in c.get_run(s.parent_run_id).data.tags["mlflow.note.content"] for k in best.values())


def test_bad_input_fails_before_any_trial(ray_local, data_dir, work, capsys):
    methods = {"topk": {"lr": [0.003], "k": [4]}}
    narrow = work / "narrow.arrow"
    write_cache(narrow, np.ones((10, 15), np.float32), [str(i) for i in range(10)], model="m", pretrained="p",
                modality="image", source="t")
    cases = {
        "missing": (dict(data={"train": str(work / "nope.arrow")}), "nope.arrow: no such file"),
        "dims": (dict(data={"train": str(data_dir / "image_train.arrow"), "eval": {"x": str(narrow)}}),
                 "data.eval.x: " + str(narrow) + ": expected embeddings of dimension 16, got 15"),
        "uri": (dict(tracking={"uri": "http://127.0.0.1:9"}), "tracking.uri http://127.0.0.1:9: unreachable"),
        "cpus": (dict(resources={"cpus": 64}), "resources.cpus: a trial asks for 64 CPUs, this machine has 2"),
        "k": (dict(methods={"topk": {"lr": [0.003], "k": [65]}}), "methods.topk (trial topk_lr0.003_k65): k: expected an integer between 1 and n=64"),
        "spec": (dict(methods={"topk": {"lr": [0.003], "k": [4], "l1": [1]}}), "methods.topk.l1: unknown key"),
        "lr0": (dict(methods={"topk": {"lr": [0.0], "k": [4]}}), "methods.topk.lr: expected a number greater than 0"),
        "lrinf": (dict(methods={"topk": {"lr": [float("inf")], "k": [4]}}), "methods.topk.lr: Input should be a finite number"),
        "lrnan": (dict(methods={"topk": {"lr": [float("nan")], "k": [4]}}), "methods.topk.lr: Input should be a finite number"),
        "l1": (dict(methods={"relu": {"lr": [0.003], "l1": [-1.0]}}), "methods.relu.l1: expected a number at least 0"),
        "nolabels": (dict(evaluation={"probe": {"data": str(data_dir / "text_val.arrow")}}),
                     f"evaluation.probe.data {data_dir / 'text_val.arrow'}: has no label column"),
        "novocab": (dict(evaluation={"vocabulary": str(work / "words.arrow")}),
                    f"evaluation.vocabulary {work / 'words.arrow'}: no such file; expected a feature cache (.arrow) file"),
        "klfront": (dict(pareto={"fidelity": "probe_kl"}), "pareto.fidelity: probe_kl needs an evaluation.probe section"),
    }
    for name, (over, message) in cases.items():
        spec = write_spec(work, data_dir, over.pop("methods", methods), name=name, **over)
        assert main(["sweep", str(spec), "--quiet"]) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, (name, err)
    assert not (work / "sweeps").exists() or not any((work / "sweeps").iterdir())
    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert [e.name for e in c.search_experiments()] == ["Default"]  # no runs, no experiments
    assert main(["sweep", str(work / "absent.yaml")]) == 2
    assert "absent.yaml: no such sweep spec" in capsys.readouterr().err


def test_synthetic_data_never_overwrites_a_users_folder(ray_local, work, capsys):
    """data.synthetic.out that holds other files is refused (exit 2, every file intact), and a spec that
    fails validation never touches it."""
    folder = work / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    base = {"name": "syn", "data": {"synthetic": {"out": str(folder), "n": 100, "n_val": 20, "d": 8}},
            "expansion": 2, "methods": {"topk": {"lr": [0.003], "k": [4]}}, "training": {"epochs": 1, "batch_size": 50},
            "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}, "storage": str(work / "sweeps")}
    (work / "syn.yaml").write_text(yaml.safe_dump(base))
    assert main(["sweep", str(work / "syn.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"data.synthetic.out {folder}: holds other files (thesis.tex)" in err and err.count("\n") == 1, err
    bad = {**base, "methods": {"topk": {"lr": [0.003], "k": [64]}}}  # k > n = 16: refused before any data
    (work / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["sweep", str(work / "bad.yaml"), "--quiet"]) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"] and (folder / "thesis.tex").read_text() == "precious"
    # a new folder is made, and a second sweep reuses it as it is
    base["data"]["synthetic"]["out"] = str(work / "fresh")
    (work / "syn.yaml").write_text(yaml.safe_dump(base))
    assert main(["sweep", str(work / "syn.yaml"), "--quiet"]) == 0
    stamp = (work / "fresh" / "image_train.arrow").stat().st_mtime_ns
    assert main(["sweep", str(work / "syn.yaml"), "--quiet"]) == 0
    assert (work / "fresh" / "image_train.arrow").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- the driver as a process


def _env(ray_tmp: str, loopback_var: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MSAE_INJECT", "MSAE_DIAGNOSTICS", "RAY_ADDRESS", "RAY_ENABLE"))}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO))
    if loopback_var:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _processes_of(tmp: str, root_pid: int):
    """The driver's process tree and every Ray process of the private temp dir ``tmp``."""
    import psutil
    procs = {}
    try:
        root = psutil.Process(root_pid)
        procs = {p.pid: p for p in [root] + root.children(recursive=True)}
    except (psutil.NoSuchProcess, ValueError):
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(tmp in part for part in (p.info["cmdline"] or [])):
                procs[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return list(procs.values())


def _stop_ray_processes_of(tmp: str) -> None:
    """Stop (by PID) any Ray process that belongs to the private temp dir ``tmp``."""
    import psutil
    for p in _processes_of(tmp, -1):
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _wait_for(predicate, timeout: float, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(0.3)
    return None


def _finished_runs(c, name: str) -> list:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return []
    return [r for r in c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'trial'") if r.info.status == "FINISHED"]


def _check_complete(c, name: str, keys: int, epochs: int) -> list:
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'trial'")
    assert len(runs) == keys and len({r.data.tags["msae.trial_key"] for r in runs}) == keys
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    for r in runs:
        steps = sorted(h.step for h in c.get_metric_history(r.info.run_id, "train_loss"))
        assert steps == list(range(1, epochs + 1)), (r.data.tags["msae.trial_key"], steps)
        assert "sae/model.safetensors" in {a.path for a in c.list_artifacts(r.info.run_id, "sae")}
        assert "fvu" in r.data.metrics
    parents = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "pareto/fronts.json" in {a.path for a in c.list_artifacts(parents[0].info.run_id, "pareto")}
    return runs


@pytest.mark.slow
def test_driver_killed_then_resumed_and_ray_listens_on_loopback_only(data_dir, work):
    """A plain `msae sweep` (started WITHOUT RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) listens on loopback only. Then
    SIGKILL the driver (and the private Ray it started) mid-sweep; --resume finishes the sweep with one run
    per trial, every epoch once, and no trial that had finished runs again."""
    import psutil

    methods = {"topk": {"lr": [0.003, 0.002, 0.001], "k": [4, 8]}}
    spec = write_spec(work, data_dir, methods, name="kr", training={"epochs": 6, "batch_size": 200})
    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    tmp = tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
    cmd = [sys.executable, "-m", "msae.cli", "sweep", str(spec), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=work, env=_env(tmp, loopback_var=False), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished_before: dict[str, int] = {}
    listening: set = set()
    try:
        def two_done():
            for p in _processes_of(tmp, proc.pid):
                try:
                    listening.update((ck.laddr.ip, p.name()) for ck in p.net_connections("inet")
                                     if ck.status == psutil.CONN_LISTEN)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            return len(_finished_runs(c, "kr")) >= 2
        assert _wait_for(two_done, 300, proc), proc.stderr.read().decode()[-2000:]
        finished_before = {r.info.run_id: len(c.get_metric_history(r.info.run_id, "train_loss"))
                           for r in _finished_runs(c, "kr")}
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    names = {name for _, name in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in listening), listening
    _stop_ray_processes_of(tmp)
    out = subprocess.run(cmd[:-1] + ["--resume", "--quiet"], cwd=work, env=_env(tmp), capture_output=True, text=True,
                         timeout=600)
    _stop_ray_processes_of(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_complete(c, "kr", 6, 6)
    for rid, n_epochs in finished_before.items():
        assert n_epochs == 6 and len(c.get_metric_history(rid, "train_loss")) == 6  # not run again


def _plant_pickles(sweep_dir: Path, marker: Path) -> int:
    """A pickle that runs `touch MARKER` when loaded, under every name Tune would read on a restore."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps(Payload())
    targets = [sweep_dir / "tuner.pkl", sweep_dir / "trainable.pkl"]
    for run in (sweep_dir / "tune").glob("*"):
        targets += [run / "tuner.pkl", run / "trainable.pkl"]
    targets.append(sweep_dir / "tune" / "tuner.pkl")
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_bytes(data)
    return len(targets)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes_without_reading_pickles(data_dir, work):
    """Ctrl-C once: exit 130 within seconds, nothing unfinished marked finished, runs of unfinished trials KILLED.
    Resume, and Ctrl-C twice: quits at once, still resumable. Resume again with malicious pickles planted where
    Tune keeps its state: none is read, and the sweep ends with one run per trial, every epoch once."""
    methods = {"topk": {"lr": [0.003, 0.002], "k": [4, 8]}}
    spec = write_spec(work, data_dir, methods, name="cc", training={"epochs": 30, "batch_size": 100})
    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    tmp = tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
    cmd = [sys.executable, "-m", "msae.cli", "sweep", str(spec), "--quiet"]

    def trained_epochs() -> int:
        return sum(len(SweepDir(p).history(k)) for p in (work / "sweeps").glob("cc-*") for k in SweepDir(p).trial_keys()) \
            if (work / "sweeps").is_dir() else 0

    def start(extra=()):
        return subprocess.Popen(cmd + list(extra), cwd=work, env=_env(tmp), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    try:
        proc = start()
        assert _wait_for(lambda: trained_epochs() >= 4, 300, proc), proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and time.time() - t0 < 60, err[-2000:]
        assert "resume with" in err
        (sweep_dir,) = list((work / "sweeps").glob("cc-*"))
        sweep = SweepDir(sweep_dir)
        assert sweep.state()["status"] == "interrupted"
        exp = c.get_experiment_by_name("cc")
        runs = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'trial'")
        for r in runs:  # finished only if it really finished; the others were killed
            done = sweep.result(r.data.tags["msae.trial_key"]) is not None
            assert r.info.status == ("FINISHED" if done else "KILLED"), (r.data.tags["msae.trial_key"], r.info.status)
        assert any(r.info.status == "KILLED" for r in runs)
        parent = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'sweep'")[0]
        assert parent.info.status == "KILLED"
        _stop_ray_processes_of(tmp)

        before = trained_epochs()
        proc = start(["--resume"])
        assert _wait_for(lambda: trained_epochs() >= before + 3, 300, proc), proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and time.time() - t0 < 30, err[-2000:]
        assert sweep.state()["status"] == "interrupted"
        _stop_ray_processes_of(tmp)

        marker = work / "pwned"
        assert _plant_pickles(sweep_dir, marker) >= 3
        res = subprocess.run(cmd + ["--resume", sweep.sweep_id], cwd=work, env=_env(tmp), capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert not marker.exists()
    finally:
        _stop_ray_processes_of(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    _check_complete(c, "cc", 4, 30)
    assert sweep.state()["status"] == "finished"


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_only_and_stops_with_its_server(work):
    import psutil

    from msae.sweep.server import port_free, wait_healthy

    port = next(p for p in range(15301, 15400) if port_free("127.0.0.1", p))
    proc = subprocess.Popen([sys.executable, "-m", "msae.cli", "ui", "--tracking-uri",
                             f"sqlite:///{work / 'mlflow.db'}", "--port", str(port)], cwd=work,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", timeout=180, proc=proc), proc.stderr.read().decode()[-2000:]
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        listening = {c.laddr for p in procs for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5") as r:
            assert json.loads(r.read())["experiments"][0]["name"] == "Default"
        # a second UI on the same port is refused before it starts
        assert main(["ui", "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--port", str(port)]) == 2
        # SIGTERM to msae ui alone (not its group) stops the server and its workers too
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert descendants
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, alive
        assert port_free("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
