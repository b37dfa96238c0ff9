"""Cluster mode on one machine: a two-node Ray cluster on 127.0.0.1 made of `ray start` processes (own temp
dirs, token auth everywhere, stopped by PID), a real `mlflow server` over HTTP, sweeps by a driver with
--address and as a Ray job, and a worker node killed mid-sweep."""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from msae.sweep.server import port_free

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))


# ---------------------------------------------------------------- cluster configs (offline)

def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "ray_cluster.local.yaml"])
def test_cluster_configs_pass_rays_validation(name):
    cfg = yaml.safe_load((REPO / name).read_text())
    _validate(cfg)
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)  # one auth mode everywhere
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token everywhere
    assert any("tracking-server.sh start" in c for c in cfg["head_start_ray_commands"])
    assert "ray stop" not in json.dumps(cfg)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(head_node_type="nope"), "must be one of `available_node_types`"),
    (lambda c: c.update(bogus_key=1), "Additional properties are not allowed ('bogus_key' was unexpected)"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), "'node_config' is a required property"),
])
def test_broken_aws_config_is_rejected(change, message):
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    change(cfg)
    with pytest.raises(Exception) as e:
        _validate(cfg)
    assert message in str(e.value)


def test_broken_local_config_is_rejected():
    cfg = yaml.safe_load((REPO / "ray_cluster.local.yaml").read_text())
    del cfg["provider"]["worker_ips"]
    with pytest.raises(Exception, match="Please supply a `head_ip` and list of `worker_ips`"):
        _validate(cfg)


# ---------------------------------------------------------------- a live two-node cluster

def _free_port(start: int) -> int:
    return next(p for p in range(start, start + 500) if port_free("127.0.0.1", p))


def _pids_of(tmp: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(tmp in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _kill_node(tmp: str) -> int:
    procs = _pids_of(tmp)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.token = root / "token"
        self.token.write_text(secrets.token_hex(32))
        self.port, self.dash = _free_port(26379), _free_port(28265)
        self.head_tmp = tempfile.mkdtemp(prefix="msae-h-", dir="/tmp")
        self.worker_tmp = tempfile.mkdtemp(prefix="msae-w-", dir="/tmp")
        # Loopback addresses that are not "127.0.0.1": Ray rewrites a 127.0.0.1 bootstrap address into the
        # host's network address; 127.0.0.2/3 are loopback too and stay as given.
        self.head_ip, self.worker_ip = "127.0.0.2", "127.0.0.3"
        self.address = f"{self.head_ip}:{self.port}"

    def env(self, join: bool = False, **extra) -> dict:
        """Environment of every process of this cluster: one auth mode and token everywhere, loopback only.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on loopback addresses; only the `ray start` that joins a
        second node must say 1 (Ray refuses to join otherwise) and names its loopback address explicitly."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MSAE_INJECT"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token),
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1" if join else "0", PYTHONPATH=str(REPO), **extra)
        return env

    def start(self) -> None:
        head = [RAY, "start", "--head", f"--node-ip-address={self.head_ip}", f"--port={self.port}", "--num-cpus=2",
                f"--temp-dir={self.head_tmp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash}", "--disable-usage-stats"]
        subprocess.run(head, env=self.env(), check=True, capture_output=True, timeout=180)
        self.add_worker()

    def add_worker(self) -> None:
        worker = [RAY, "start", f"--address={self.address}", f"--node-ip-address={self.worker_ip}", "--num-cpus=2",
                  f"--temp-dir={self.worker_tmp}", "--disable-usage-stats"]
        subprocess.run(worker, env=self.env(join=True), check=True, capture_output=True, timeout=180)

    def remote_addresses(self) -> set[str]:
        """Peer addresses of every open connection of this cluster's processes."""
        out = set()
        for p in _pids_of(self.head_tmp) + _pids_of(self.worker_tmp):
            try:
                out |= {c.raddr.ip.removeprefix("::ffff:") for c in p.net_connections("inet") if c.raddr}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def stop(self) -> None:
        for tmp in (self.worker_tmp, self.head_tmp):
            _kill_node(tmp)
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory, mlflow_template):
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_template, root / "mlflow.db")
    port = _free_port(25000)
    state = root / "run"
    args = ["--backend-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts", str(root / "artifacts"),
            "--port", str(port), "--state-dir", str(state)]
    out = subprocess.run([PY, "-m", "msae.cli", "tracking-server", "start", *args], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-2000:]
    uri = f"http://127.0.0.1:{port}"
    try:
        yield uri
    finally:
        stop = subprocess.run([PY, "-m", "msae.cli", "tracking-server", "stop", "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert stop.returncode == 0 and "stopped" in stop.stdout


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from msae.synthetic import write_synthetic
    root = tmp_path_factory.mktemp("clusterdata") / "syn"
    write_synthetic(root, 2000, 400, d=16, roots=8, branching=(2,), seed=0)
    return root


def _spec(root: Path, data_dir: Path, name: str, lrs, epochs: int = 3, batch: int = 500) -> Path:
    spec = {"name": name,
            "data": {"train": str(data_dir / "image_train.arrow"), "eval": {"image_val": str(data_dir / "image_val.arrow")}},
            "expansion": 4, "methods": {"topk": {"lr": lrs, "k": [4, 8]}},
            "training": {"epochs": epochs, "batch_size": batch}, "resources": {"cpus": 1}, "max_failures": 3}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'trial'") if exp else []
    parents = c.search_runs([exp.experiment_id], "tags.`msae.kind` = 'sweep'") if exp else []
    return c, runs, parents


def _check_sweep(uri: str, name: str, trials: int) -> set[str]:
    c, runs, parents = _runs(uri, name)
    assert len(runs) == trials and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    arts = {a.path for a in c.list_artifacts(parents[0].info.run_id, "pareto")}
    assert {"pareto/fronts.json", "pareto/pareto_fvu.png"} <= arts
    assert "sae/model.safetensors" in {a.path for a in c.list_artifacts(runs[0].info.run_id, "sae")}
    return {r.data.tags["msae.node_id"] for r in runs}


def test_driver_with_address_spreads_trials_over_both_nodes(cluster, tracking_server, data_dir, tmp_path):
    spec = _spec(tmp_path, data_dir, "cl-driver", [0.003, 0.002, 0.001])
    env = cluster.env(RAY_ADDRESS=cluster.address, MSAE_PROJECT_DIR=str(REPO), MSAE_STORAGE=str(tmp_path / "storage"),
                      MSAE_TRACKING_URI=tracking_server)
    out = subprocess.run([PY, str(REPO / "scripts" / "cluster_sweep.py"), str(spec), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_check_sweep(tracking_server, "cl-driver", 6)) == 2  # node ids of both nodes
    peers = cluster.remote_addresses()
    assert peers and all(ip.startswith("127.") for ip in peers), peers  # loopback traffic only


def test_sweep_submitted_as_a_ray_job(cluster, tracking_server, data_dir, tmp_path):
    spec = _spec(tmp_path, data_dir, "cl-job", [0.003, 0.002, 0.001])
    job_env = {"MSAE_PROJECT_DIR": str(REPO), "MSAE_STORAGE": str(tmp_path / "storage"),
               "MSAE_TRACKING_URI": tracking_server, "PYTHONPATH": str(REPO)}
    cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{cluster.dash}",
           "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
           PY, str(REPO / "scripts" / "cluster_sweep.py"), str(spec), "--quiet"]
    for _ in range(10):  # the job agent registers a little after the dashboard answers
        out = subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0 and "succeeded" in out.stdout, (out.stdout[-3000:], out.stderr[-2000:])
    assert len(_check_sweep(tracking_server, "cl-job", 6)) == 2


def test_worker_node_killed_mid_sweep(cluster, tracking_server, data_dir, tmp_path):
    """Kill every process of the worker node while trials run there: the sweep completes on the head,
    failed trials resume from their checkpoints, no finished trial is lost or run again."""
    spec = _spec(tmp_path, data_dir, "cl-kill", [0.003, 0.002, 0.001], epochs=8, batch=100)
    env = cluster.env(RAY_ADDRESS=cluster.address, MSAE_PROJECT_DIR=str(REPO), MSAE_STORAGE=str(tmp_path / "storage"),
                      MSAE_TRACKING_URI=tracking_server)
    proc = subprocess.Popen([PY, str(REPO / "scripts" / "cluster_sweep.py"), str(spec), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    finished_before: dict[str, int] = {}
    killed = 0
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            c, runs, _ = _runs(tracking_server, "cl-kill")
            done = [r for r in runs if r.info.status == "FINISHED"]
            running_nodes = {r.data.tags.get("msae.node_id") for r in runs if r.info.status == "RUNNING"}
            if done and len(running_nodes - {None}) >= 2:
                finished_before = {r.info.run_id: len(c.get_metric_history(r.info.run_id, "train_loss")) for r in done}
                killed = _kill_node(cluster.worker_tmp)
                break
            time.sleep(0.5)
        assert killed > 0, "never saw a finished trial while trials ran on both nodes"
        err = proc.communicate(timeout=600)[1].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    _check_sweep(tracking_server, "cl-kill", 6)
    c, runs, _ = _runs(tracking_server, "cl-kill")
    for r in runs:
        steps = sorted(h.step for h in c.get_metric_history(r.info.run_id, "train_loss"))
        assert steps == list(range(1, 9)), (r.data.tags["msae.trial_key"], steps)
    for rid, n in finished_before.items():
        assert n == 8 and len(c.get_metric_history(rid, "train_loss")) == 8
