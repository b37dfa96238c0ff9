"""What the MLflow dashboard shows for a sweep, checked through the REST API of a real `msae ui` on the store
of the demo spec (shortened): the runs view of a model-training experiment, a parent run that explains
its front, child runs named by their values with the metrics a researcher compares, and the plots."""
import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from msae.sweep.server import port_free, wait_healthy

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _get(url: str, endpoint: str, **params):
    query = "?" + urllib.parse.urlencode(params) if params else ""
    with urllib.request.urlopen(f"{url}{endpoint}{query}", timeout=30) as r:
        return r.status, r.read()


def _post(url: str, path: str, body: dict):
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """The demo spec's grid on a smaller synthetic set, 2 epochs, swept by the msae command."""
    root = tmp_path_factory.mktemp("demo")
    spec = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    spec["data"]["synthetic"].update(n=3000, n_val=600)  # its relative paths (data, evaluation) land in root
    spec["training"]["epochs"] = 2
    spec["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    spec["storage"] = str(root / "sweeps")
    (root / "demo.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MSAE_INJECT", "MSAE_DIAGNOSTICS", "MSAE_DEV", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    out = subprocess.run([sys.executable, "-m", "msae.cli", "sweep", str(root / "demo.yaml")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, out


@pytest.fixture(scope="module")
def ui(demo_store):
    root, _ = demo_store
    port = next(p for p in range(15501, 15600) if port_free("127.0.0.1", p))
    proc = subprocess.Popen([sys.executable, "-m", "msae.cli", "ui", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--port", str(port)], cwd=root, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(url, timeout=180, proc=proc), proc.stderr.read().decode()[-2000:]
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_the_terminal_shows_the_whole_front_and_a_working_hint(demo_store):
    _, out = demo_store
    assert "Pareto front (L0, FVU) over all methods:" in out.stdout and "'at' is where on a trial's curve" in out.stdout
    points = int(out.stdout.split("over all methods: ")[1].split(" points")[0])
    table = out.stdout.split("trial\n", 1)[1].split("\n('at'")[0].strip().splitlines()
    assert len(table) == points > 6  # the whole front, not the first six points
    assert "dashboard: msae ui --tracking-uri sqlite:///" in out.stdout
    assert "then open http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=msae-demo-" \
        in out.stdout
    assert "trials: 12 finished" in out.stdout
    for noise in ("INFO mlflow", "Creating initial MLflow database tables", "\x1b[", "InvalidAuthToken"):
        assert noise not in out.stderr, noise


def test_the_hint_under_dev_names_dev(monkeypatch):
    from msae.sweep.runner import ui_hint

    class Tracker:
        exp_id, view_key = "3", "msae-x"

    monkeypatch.setenv("MSAE_DEV", "1")
    assert ui_hint("sqlite:///mlflow.db", Tracker()).startswith("./dev msae ui --tracking-uri sqlite:///mlflow.db")
    monkeypatch.delenv("MSAE_DEV")
    assert ui_hint("sqlite:///mlflow.db", Tracker()).startswith("msae ui --tracking-uri")
    assert ui_hint("http://h:5000", Tracker()) == \
        "open http://h:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=msae-x&compareRunsMode=CHART"


def test_the_dashboard_opens_on_the_sweeps_runs(ui):
    status, page = _get(ui, "/")
    assert status == 200 and b"<html" in page.lower()
    exp = json.loads(_get(ui, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="demo")[1])["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    # the sweep's view (opened by the printed link): sorted by FVU, the parent expanded, the columns and charts of the front
    (view_key,) = [k for k in tags if k.startswith("mlflow.sharedViewState.msae-demo-")]
    view = json.loads(tags[view_key])
    assert view["orderByKey"] == "metrics.`fvu`" and view["orderByAsc"] is True
    assert {"params.`method`", "params.`lr`", "params.`k`", "params.`levels_from`", "metrics.`fvu`", "metrics.`l0`"} \
        <= set(view["selectedColumns"])
    assert [(c["xaxis"]["key"], c["yaxis"]["key"]) for c in view["compareRunCharts"]] == [("l0", "fvu"), ("l0", "cosine")]
    runs = _post(ui, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    parents = [r for r in runs if {"key": "msae.kind", "value": "sweep"} in r["data"]["tags"]]
    children = [r for r in runs if {"key": "msae.kind", "value": "trial"} in r["data"]["tags"]]
    assert len(parents) == 1 and len(children) == 12

    parent = parents[0]
    ptags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    note = ptags["mlflow.note.content"]  # the run page's description (markdown)
    assert "### Sparsity-fidelity front" in note and "| L0 | FVU | method | at | trial |" in note
    assert "### How to read it" in note and "```yaml" in note and "name: demo" in note
    assert f"![Sparsity-fidelity front](get-artifact?path=pareto%2Fpareto_fvu.png&run_uuid={parent['info']['run_id']})" in note
    assert list(view["runsExpanded"]) == [parent["info"]["run_id"]]
    status, png = _get(ui, "/get-artifact", path="pareto/pareto_fvu.png", run_uuid=parent["info"]["run_id"])
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"  # the image the description shows
    pmetrics = {m["key"] for m in parent["data"]["metrics"]}
    assert {"hv/all/fvu", "hv/all/one_minus_cosine"} <= pmetrics
    arts = json.loads(_get(ui, "/api/2.0/mlflow/artifacts/list", run_id=parent["info"]["run_id"], path="pareto")[1])
    assert {"pareto/pareto_fvu.png", "pareto/pareto_one_minus_cosine.png", "pareto/fronts.csv"} <= {f["path"] for f in arts["files"]}

    names = {r["info"]["run_name"] for r in children}
    assert {"topk k=8 lr=0.002", "msae levels_from=8 weighting=rw lr=0.002", "relu l1=0.003 lr=0.002",
            "jumprelu l0_coef=0.03 lr=0.004"} <= names
    for r in children:
        metrics = {m["key"] for m in r["data"]["metrics"]}
        params = {p["key"]: p["value"] for p in r["data"]["params"]}
        assert {"fvu", "cosine", "l0", "dead_fraction", "train_loss", "lr_schedule", "recovery"} <= metrics
        assert not metrics & {"epoch", "lr", "data_checksum", "data_mb", "private_mb", "resumed", "cknna_rows",
                              "epoch_seconds"}
        assert not any(k.endswith("/rows") or k.endswith("_processed") or k.startswith("curve/") for k in metrics)
        assert params["lr"] in ("0.002", "0.004") and params["method"] in r["info"]["run_name"]
        files = {f["path"] for f in json.loads(_get(ui, "/api/2.0/mlflow/artifacts/list", run_id=r["info"]["run_id"])[1])["files"]}
        assert {"sae", "diagnostics.json"} <= files
        assert ("curve.png" in files) == (params["method"] in ("topk", "batchtopk", "msae"))
