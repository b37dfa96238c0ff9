"""A real `mlflow server` that goes away during a sweep: training goes on, what could not be logged waits in
the sweep folder and is logged when the server is back, during the sweep or later by `msae pareto`."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from msae.sweep.layout import SweepDir
from msae.sweep.server import port_free
from msae.synthetic import write_synthetic

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

pytestmark = pytest.mark.slow


def _cli(*args, timeout=300):
    return subprocess.run([PY, "-m", "msae.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


class Server:
    def __init__(self, root: Path, db: Path):
        self.root, self.db = root, db
        self.port = next(p for p in range(25500, 26000) if port_free("127.0.0.1", p))
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        out = _cli("tracking-server", "start", "--backend-uri", f"sqlite:///{self.db}", "--artifacts",
                   str(self.root / "artifacts"), "--port", str(self.port), "--state-dir", str(self.root / "run"))
        assert out.returncode == 0, out.stderr[-2000:]

    def stop(self):
        out = _cli("tracking-server", "stop", "--state-dir", str(self.root / "run"))
        assert out.returncode == 0 and "stopped" in out.stdout, out.stderr


@pytest.fixture
def server(tmp_path, mlflow_template):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    s = Server(tmp_path, tmp_path / "mlflow.db")
    s.start()
    yield s
    _cli("tracking-server", "stop", "--state-dir", str(tmp_path / "run"))


def _spec(root: Path, data: Path, name: str, uri: str, **tracking) -> Path:
    spec = {"name": name, "data": {"train": str(data / "image_train.arrow"), "eval": {"val": str(data / "image_val.arrow")}},
            "expansion": 4, "methods": {"topk": {"lr": [0.003, 0.002], "k": [4]}},
            "training": {"epochs": 40, "batch_size": 100}, "tracking": {"uri": uri, **tracking},
            "storage": str(root / "sweeps")}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _epochs_trained(root: Path, name: str) -> int:
    return sum(len(SweepDir(p).history(k)) for p in (root / "sweeps").glob(f"{name}-*") for k in SweepDir(p).trial_keys())


def _wait(predicate, timeout, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def _logged_epochs(uri: str, name: str) -> int:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'trial'") if exp else []
    return sum(len(c.get_metric_history(r.info.run_id, "train_loss")) for r in runs)


def _check_complete(uri: str, name: str, trials: int, epochs: int) -> None:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'trial'")
    assert len(runs) == trials and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    for r in runs:
        assert sorted(h.step for h in c.get_metric_history(r.info.run_id, "train_loss")) == list(range(1, epochs + 1))
        assert "sae/model.safetensors" in {a.path for a in c.list_artifacts(r.info.run_id, "sae")}
    (parent,) = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and "hv/all/fvu" in parent.data.metrics
    assert "pareto/fronts.json" in {a.path for a in c.list_artifacts(parent.info.run_id, "pareto")}


def test_server_dies_and_returns_during_the_sweep_then_stays_away_until_msae_pareto(server, tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, 20000, 400, d=16, roots=8, branching=(2,), seed=0)
    tmp = tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSAE_INJECT", "MSAE_DIAGNOSTICS", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    try:
        # 1. the server dies mid-sweep and comes back (right away on the same port) while trials still run
        def start(spec: Path, name: str):
            err_file = tmp_path / f"{name}.err"
            with open(err_file, "w") as err:
                proc = subprocess.Popen([PY, "-m", "msae.cli", "sweep", str(spec)], cwd=tmp_path, env=env,
                                        stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            return proc, err_file

        spec = _spec(tmp_path, data, "outage", server.uri)
        proc, err_file = start(spec, "outage")
        assert _wait(lambda: _logged_epochs(server.uri, "outage") >= 2, 300, proc), err_file.read_text()[-2000:]
        server.stop()
        before = _epochs_trained(tmp_path, "outage")
        assert _wait(lambda: _epochs_trained(tmp_path, "outage") >= before + 4, 300, proc), err_file.read_text()[-2000:]
        assert _wait(lambda: "unreachable" in err_file.read_text(), 60, proc), err_file.read_text()[-2000:]
        assert proc.poll() is None  # the driver lives on and keeps training
        server.start()  # the old port still has TIME-WAIT sockets: starting again must work
        assert proc.wait(timeout=600) == 0, err_file.read_text()[-3000:]
        assert "is back" in err_file.read_text()
        _check_complete(server.uri, "outage", 2, 40)

        # 2. the server dies and stays away past tracking.wait_s: exit 3, results safe, `msae pareto` logs them later
        spec = _spec(tmp_path, data, "away", server.uri, wait_s=3)
        proc, err_file = start(spec, "away")
        assert _wait(lambda: _logged_epochs(server.uri, "away") >= 1, 300, proc), err_file.read_text()[-2000:]
        server.stop()
        assert proc.wait(timeout=600) == 3, err_file.read_text()[-3000:]
        assert "not yet logged" in err_file.read_text() and "msae pareto" in err_file.read_text()
        (sweep_dir,) = (tmp_path / "sweeps").glob("away-*")
        state = SweepDir(sweep_dir).state()
        assert state["status"] == "finished" and state["tracking"] == "pending"
        assert SweepDir(sweep_dir).counts()["finished"] == 2
        server.start()
        out = subprocess.run([PY, "-m", "msae.cli", "pareto", str(spec)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        _check_complete(server.uri, "away", 2, 40)
        assert SweepDir(sweep_dir).state()["tracking"] == "synced"
    finally:
        import psutil
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(tmp in part for part in (p.info["cmdline"] or [])):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        shutil.rmtree(tmp, ignore_errors=True)
