"""MLflow for sweeps: one parent run per sweep, one child run per trial, logged from the driver only.

Child runs are found again by the tags ``msae.sweep_id`` + ``msae.trial_key`` (never by in-memory
ids), so trial retries and sweep resumes reuse them instead of creating duplicates.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from msae.errors import MsaeError

SWEEP_TAG, KEY_TAG, KIND_TAG = "msae.sweep_id", "msae.trial_key", "msae.kind"
PARENT_TAG = "mlflow.parentRunId"
_STRING_RESULTS = ("node_id", "data_mapping", "failure")
_SKIP = {"curve", "final", "done", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "pid",
         "time_since_restore", "iterations_since_restore", "trial_id", "date", "hostname", "node_ip",
         "checkpoint_dir_name", "should_checkpoint", "config"}


def check_tracking_uri(uri: str) -> None:
    """Fail fast with one line when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        from msae.sweep.server import health_error

        problem = health_error(uri, timeout=10)
        if problem is not None:
            raise MsaeError(f"tracking.uri {uri}: unreachable ({problem}); start the server "
                            "(msae tracking-server) or fix the URI")
        return
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise MsaeError(f"tracking.uri {uri}: folder {db.parent} does not exist")
        return
    if uri.startswith(("postgresql://", "mysql://", "databricks")):
        return
    raise MsaeError(f"tracking.uri {uri}: expected sqlite:///FILE, http(s)://HOST:PORT or a database URI")


def client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else c.create_experiment(name)


def find_run(c, exp_id: str, tags: dict[str, str]):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([exp_id], filter_string=flt, max_results=2, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def parent_run(c, exp_id: str, sweep_id: str, spec_text: str, spec_name: str) -> str:
    """The sweep's parent run: found by its sweep id, or created with the spec and the git commit."""
    run = find_run(c, exp_id, {SWEEP_TAG: sweep_id, KIND_TAG: "sweep"})
    if run is not None:
        c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = c.create_run(exp_id, run_name=sweep_id, tags={SWEEP_TAG: sweep_id, KIND_TAG: "sweep", "msae.spec": spec_name,
                                                         "mlflow.source.git.commit": git_commit()})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.yaml").write_text(spec_text)
        c.log_artifact(run.info.run_id, str(Path(tmp) / "spec.yaml"))
    return run.info.run_id


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _numeric(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in result.items():
        if k in _SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v == v and abs(v) != float("inf"):
            out[k] = float(v)
    return out


class MlflowSweepCallback(Callback):
    """A Tune callback (driver side). Picklable: the client is made lazily, the trial->run map is rebuilt
    from tags after a restore."""

    def __init__(self, uri: str, exp_id: str, parent_id: str, sweep_id: str, sweep_dir: str):
        self.uri, self.exp_id, self.parent_id, self.sweep_id = uri, exp_id, parent_id, sweep_id
        self.sweep_dir = sweep_dir
        self._c = None
        self._runs: dict[str, str] = {}
        self._finished: set[str] = set()
        self._logged: dict[str, int] = {}  # run id -> last epoch logged (a restarted trial repeats epochs)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_c", "_runs", "_finished", "_logged")}

    def __setstate__(self, state):
        self.__dict__.update(state, _c=None, _runs={}, _finished=set(), _logged={})

    @property
    def c(self):
        if self._c is None:
            self._c = client(self.uri)
        return self._c

    def run_id(self, trial) -> str:
        from msae.sweep.space import trial_params

        if trial.trial_id.startswith("done:"):
            return trial.trial_id[5:]
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        p = trial_params(trial.config)
        run = find_run(self.c, self.exp_id, {SWEEP_TAG: self.sweep_id, KEY_TAG: p["key"]})
        if run is None:
            run = self.c.create_run(self.exp_id, run_name=p["key"], tags={
                SWEEP_TAG: self.sweep_id, KEY_TAG: p["key"], KIND_TAG: "trial", PARENT_TAG: self.parent_id,
                "msae.method": p["method"], "msae.ray_trial_id": trial.trial_id})
            from mlflow.entities import Param
            self.c.log_batch(run.info.run_id, params=[Param(k, json.dumps(v) if isinstance(v, list) else str(v))
                                                      for k, v in p.items() if k != "key"])
        elif run.info.status == "FINISHED" or run.data.tags.get("msae.failure_reason"):
            self._finished.add(run.info.run_id)
        else:
            hist = self.c.get_metric_history(run.info.run_id, "train_loss")
            self._logged[run.info.run_id] = max((h.step for h in hist), default=0)
            self._backfill(run.info.run_id, p["key"])
        self._runs[trial.trial_id] = run.info.run_id
        return run.info.run_id

    def _backfill(self, rid: str, key: str) -> None:
        """Log the epochs a trial reported that the driver did not log before it was restarted."""
        from msae.sweep.trial import history_file

        path = history_file(self.sweep_dir, key)
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a crash
                continue
            if not result.get("final") and int(result.get("epoch", 0)) > self._logged.get(rid, 0):
                self._log_epoch(rid, result)

    # Tune callback hooks ------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        rid = self.run_id(trial)
        if rid not in self._finished:
            self.c.update_run(rid, status="RUNNING")
            self.c.set_tag(rid, "msae.ray_trial_id", trial.trial_id)

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rid = self.run_id(trial)
        if rid in self._finished:
            return
        from msae.sweep.space import trial_params

        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self._logged.get(rid, 0) and not result.get("final"):
            return  # an epoch logged before the trial restarted: keep the first record
        self._log_epoch(rid, result)
        if result.get("final"):
            self._finish(rid, trial_params(trial.config)["key"], result)

    def _log_epoch(self, rid: str, result: dict) -> None:
        from mlflow.entities import Metric, RunTag

        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self._logged[rid] = max(step, self._logged.get(rid, 0))
        ts = int(result.get("timestamp", time.time()) * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in _numeric(result).items()]
        tags = [RunTag(f"msae.{k}", str(result[k])[:5000]) for k in _STRING_RESULTS if k in result]
        if result.get("curve"):
            for point in json.loads(result["curve"]):
                metrics += [Metric(f"curve/{m}", float(point[m]), ts, int(point["k"])) for m in ("l0", "fvu", "cosine")]
        for s in range(0, len(metrics), 900):
            self.c.log_batch(rid, metrics=metrics[s:s + 900], tags=tags if s == 0 else [])

    def reconcile(self, result_grid) -> None:
        """After fit(): close runs whose trial Tune already counted as done before a driver restart
        (the driver can die between Tune's state snapshot and this callback)."""
        from msae.sweep.space import trial_params

        for r in result_grid:
            key = trial_params(r.config)["key"]
            run = find_run(self.c, self.exp_id, {SWEEP_TAG: self.sweep_id, KEY_TAG: key})
            if run is None or run.info.status != "RUNNING":
                continue
            metrics = r.metrics or {}
            if r.error is not None:
                self.c.set_tag(run.info.run_id, "msae.failure_reason", str(r.error).splitlines()[-1][:5000])
                self.c.set_terminated(run.info.run_id, status="FAILED")
            elif metrics.get("final"):
                self._logged[run.info.run_id] = 0
                self.on_trial_result(0, [], _Done(r, run.info.run_id), metrics)
            else:
                self.c.set_tag(run.info.run_id, "msae.stopped_early", "true")
                self.c.set_terminated(run.info.run_id, status="FINISHED")

    def _finish(self, rid: str, key: str, result: dict) -> None:
        from msae.sweep.trial import final_sae_dir

        if result.get("diverged"):
            self.c.set_tag(rid, "msae.failure_reason", result.get("failure", "diverged"))
            self.c.set_terminated(rid, status="FAILED")
        else:
            sae = final_sae_dir(self.sweep_dir, key)
            if sae.is_dir():
                self.c.log_artifacts(rid, str(sae), artifact_path="sae")
            self.c.set_terminated(rid, status="FINISHED")
        self._finished.add(rid)

    def on_trial_complete(self, iteration, trials, trial, **info):
        rid = self.run_id(trial)
        if rid in self._finished:
            return
        # completed without a final result: stopped early by the scheduler
        self.c.set_tag(rid, "msae.stopped_early", "true")
        self.c.set_terminated(rid, status="FINISHED")
        self._finished.add(rid)

    def on_trial_error(self, iteration, trials, trial, **info):
        rid = self.run_id(trial)
        reason = _error_text(trial)
        self.c.set_tag(rid, "msae.failure_reason", reason[:5000])
        self.c.set_terminated(rid, status="FAILED")
        self._finished.add(rid)


class _Done:
    """The parts of a Tune trial that the callback reads, from a finished trial's Result."""

    def __init__(self, result, run_id: str):
        self.config, self.trial_id = result.config, f"done:{run_id}"


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "trial failed"
    except OSError:
        return "trial failed"


def child_runs(c, exp_id: str, sweep_id: str) -> list:
    out, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`{KIND_TAG}` = 'trial'",
                             max_results=1000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def tracking_env() -> dict[str, str]:
    """Keep MLflow's HTTP retries short so that a dead server fails a call instead of hanging."""
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")}
