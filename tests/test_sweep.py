"""Sweeps end to end: real Ray on 127.0.0.1, real MLflow (SQLite), real trials on tiny synthetic caches."""
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
from msae.synthetic import write_synthetic  # noqa: E402
from msae.sweep.runner import run_sweep, worker_env  # noqa: E402
from msae.sweep.tracking import child_runs  # noqa: E402

CRASH_KEY = "topk_lr0.003_k8"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One private Ray for this module (2 CPUs, 127.0.0.1), with crash injection armed for CRASH_KEY."""
    markers = tmp_path_factory.mktemp("crash-markers")
    os.environ["MSAE_INJECT_CRASH"] = f"{CRASH_KEY}@1:{markers}"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    tmp = tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
    ray.init(address="local", _temp_dir=tmp, num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", runtime_env={"env_vars": worker_env()})
    yield markers
    ray.shutdown()
    os.environ.pop("MSAE_INJECT_CRASH", None)
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
            "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}, "storage": str(work / "sweeps"), **extra}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def runs_of(uri: str, experiment: str, sweep_id: str):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c, exp.experiment_id, child_runs(c, exp.experiment_id, sweep_id)


def test_grid_sweep_end_to_end(ray_local, data_dir, work):
    methods = {"relu": {"lr": [0.003], "l1": [0.01]}, "topk": {"lr": [0.003], "k": [4, 8]},
               "msae": {"lr": [0.003], "levels_from": [4], "weighting": ["rw"]},
               "batchtopk": {"lr": [1.0e30], "k": [4]}}  # this one diverges
    spec = write_spec(work, data_dir, methods)
    s = run_sweep(str(spec), quiet=True)
    assert (s["done"], s["failed"]) == (4, 1)
    c, exp_id, runs = runs_of(s["uri"], "t", s["sweep_id"])
    by_key = {r.data.tags["msae.trial_key"]: r for r in runs}
    assert sorted(by_key) == sorted(["relu_lr0.003_l10.01", "topk_lr0.003_k4", "topk_lr0.003_k8",
                                     "msae_lr0.003_from4_rw", "batchtopk_lr1e+30_k4"])
    assert all(r.data.tags["mlflow.parentRunId"] == s["parent_run_id"] for r in runs)
    # the diverged trial is a failed run with its reason; the others finished
    bad = by_key.pop("batchtopk_lr1e+30_k4")
    assert bad.info.status == "FAILED" and "diverged" in bad.data.tags["msae.failure_reason"]
    assert all(r.info.status == "FINISHED" for r in by_key.values())
    # final metrics in MLflow equal Tune's results
    tune_results = {r.config["trial"]["key"]: r.metrics for r in s["results"]}
    for key, run in by_key.items():
        m, t = run.data.metrics, tune_results[key]
        for name in ("fvu", "l0", "cosine", "zero_fraction", "dead_fraction", "image_val/fvu", "text_val/fvu",
                     "recovery", "recovery_level1"):
            assert m[name] == pytest.approx(t[name], rel=1e-12), (key, name)
        assert 0 < m["fvu"] < 1 and m["image_val/l0"] == m["l0"]
        assert run.data.params["lr"] == "0.003"
        hist = c.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(h.step for h in hist) == [1, 2, 3], key  # every epoch exactly once
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "sae")}
        assert {"sae/model.safetensors", "sae/config.json", "sae/metrics.json"} <= arts
        logged = json.loads(Path(c.download_artifacts(run.info.run_id, "sae/metrics.json", str(work))).read_text())
        assert logged["final"]["fvu"] == m["fvu"]  # the artifact is the final model
    assert "k" not in by_key["relu_lr0.003_l10.01"].data.params and "l1" not in by_key["topk_lr0.003_k4"].data.params
    # the curve of a TopK-style trial: k = 16, 32, 64 (n = 64)
    curve = c.get_metric_history(by_key["topk_lr0.003_k4"].info.run_id, "curve/l0")
    assert sorted(h.step for h in curve) == [16, 32, 64]
    # crashed once after epoch 1, retried from its checkpoint: epochs 2 and 3 ran resumed
    crashed = by_key[CRASH_KEY]
    assert (ray_local / CRASH_KEY).exists()
    resumed = {h.step: h.value for h in c.get_metric_history(crashed.info.run_id, "resumed")}
    assert resumed == {1: 0.0, 2: 1.0, 3: 1.0}
    # Pareto artifacts on the parent; the front's run ids are children
    parent = c.get_run(s["parent_run_id"])
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "pareto")}
    assert {"pareto/fronts.json", "pareto/fronts.csv", "pareto/pareto_fvu.png", "pareto/pareto_one_minus_cosine.png"} <= arts
    front_ids = parent.data.tags["msae.front_run_ids"].split(",")
    assert front_ids and set(front_ids) <= {r.info.run_id for r in by_key.values()}
    fronts = json.loads(Path(c.download_artifacts(parent.info.run_id, "pareto/fronts.json", str(work))).read_text())
    assert fronts["reference"] == {"l0": 64.0, "fvu": 1.0, "one_minus_cosine": 1.0}
    assert parent.data.metrics["hv/all/fvu"] == pytest.approx(fronts["fronts"]["all/fvu"]["hypervolume_fraction"])
    assert 0 < parent.data.metrics["hv/all/fvu"] <= 1
    assert parent.info.status == "FINISHED" and parent.data.params["n"] == "64"
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"spec.yaml", "pareto"}
    # msae pareto recomputes the same fronts
    assert main(["pareto", str(spec)]) == 0


def test_shared_cache_is_zero_copy_inside_trials(ray_local, work):
    """A 128 MB cache reaches the trial through the object store without a private copy."""
    rows, d = 32768, 1024
    x = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32) + 3.0
    write_cache(work / "big.arrow", x, [str(i) for i in range(rows)], model="m", pretrained="p", modality="image",
                source="test")
    write_cache(work / "big_val.arrow", x[:512], [str(i) for i in range(512)], model="m", pretrained="p",
                modality="image", source="test")
    del x
    spec = {"name": "zc", "data": {"train": str(work / "big.arrow"), "eval": {"val": str(work / "big_val.arrow")}},
            "expansion": 0.25, "methods": {"topk": {"lr": [0.001], "k": [8]}},
            "training": {"epochs": 3, "batch_size": 4096, "progressive": False},
            "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}, "storage": str(work / "sweeps")}
    (work / "zc.yaml").write_text(yaml.safe_dump(spec))
    s = run_sweep(str(work / "zc.yaml"), quiet=True)
    (r,) = list(s["results"])
    m = r.metrics
    assert m["data_mb"] == pytest.approx(128.0)
    assert m["data_touch_private_mb"] < 0.03 * m["data_mb"], m["data_touch_private_mb"]
    assert m["private_growth_mb"] < 0.05 * m["data_mb"], m["private_growth_mb"]  # epochs 2-3: steady state
    assert "[anon]" not in m["data_mapping"] and m["data_mapping"].split()[0][3] == "s", m["data_mapping"]


def test_optuna_multi_objective_search(ray_local, data_dir, work):
    methods = {"topk": {"lr": {"min": 0.001, "max": 0.01}, "k": {"min": 2, "max": 16}},
               "relu": {"lr": [0.003], "l1": {"min": 0.001, "max": 0.1}}}
    spec = write_spec(work, data_dir, methods, name="opt",
                      search={"kind": "optuna", "trials": 4, "concurrency": 2, "sampler": "tpe", "seed": 0})
    s = run_sweep(str(spec), quiet=True)
    assert s["done"] == 4
    c, _, runs = runs_of(s["uri"], "opt", s["sweep_id"])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    db = Path(s["sweep_dir"]) / "optuna.db"
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
    c, _, runs = runs_of(s["uri"], "asha", s["sweep_id"])
    by_key = {r.data.tags["msae.trial_key"]: r for r in runs}
    bad = by_key["topk_lr1e-07_k8"]
    epochs = len(c.get_metric_history(bad.info.run_id, "train_loss"))
    assert bad.data.tags.get("msae.stopped_early") == "true" and epochs < 4
    first = by_key["topk_lr0.004_k8"]
    assert len(c.get_metric_history(first.info.run_id, "train_loss")) == 4 and "curve/l0" in first.data.metrics


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


@pytest.mark.slow
def test_driver_killed_then_resumed(data_dir, work):
    """Kill the driver (and the private Ray it started) mid-sweep; --resume finishes the sweep with one run
    per trial, and no trial that had finished runs again."""
    methods = {"topk": {"lr": [0.003, 0.002, 0.001], "k": [4, 8]}}
    spec = write_spec(work, data_dir, methods, name="kr", training={"epochs": 6, "batch_size": 200})
    uri = f"sqlite:///{work / 'mlflow.db'}"
    tmp = tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSAE_INJECT", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "msae.cli", "sweep", str(spec), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    c = MlflowClient(uri)
    finished_before: dict[str, int] = {}
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            exp = c.get_experiment_by_name("kr")
            if exp is not None:
                runs = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'trial'")
                done = [r for r in runs if r.info.status == "FINISHED"]
                if len(done) >= 2:
                    finished_before = {r.info.run_id: len(c.get_metric_history(r.info.run_id, "train_loss")) for r in done}
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert finished_before, proc.stderr.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    _stop_ray_processes_of(tmp)
    out = subprocess.run(cmd[:-1] + ["--resume", "--quiet"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    _stop_ray_processes_of(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    exp = c.get_experiment_by_name("kr")
    runs = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'trial'")
    assert len(runs) == 6 and len({r.data.tags["msae.trial_key"] for r in runs}) == 6
    assert all(r.info.status == "FINISHED" for r in runs)
    for rid, n_epochs in finished_before.items():
        assert n_epochs == 6 and len(c.get_metric_history(rid, "train_loss")) == 6  # not run again
    for r in runs:
        assert sorted(h.step for h in c.get_metric_history(r.info.run_id, "train_loss")) == [1, 2, 3, 4, 5, 6]
    parents = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "pareto/fronts.json" in {a.path for a in c.list_artifacts(parents[0].info.run_id, "pareto")}


def _stop_ray_processes_of(tmp: str) -> None:
    """Stop (by PID) any Ray process that belongs to the private temp dir ``tmp``."""
    import psutil
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(tmp in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_only(work):
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
