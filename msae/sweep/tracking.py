"""MLflow as a projection of the sweep folder (msae.sweep.layout), written by the driver only.

The folder is the record; :class:`SweepTracker` makes the tracking store agree with it, one trial
at a time (``sync``): find or create the trial's child run (by the tags ``msae.sweep_id`` +
``msae.trial_key``, never by in-memory ids), log the epochs it has not logged yet, then the final
artifacts and the status. Syncing again changes nothing, so a driver restart, a trial retry or an
unreachable server never duplicates or loses anything: :class:`BackgroundSync` keeps syncing from
a background thread, retrying with backoff while the store is away, and training goes on.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from msae import atomic
from msae.errors import MsaeError
from msae.sweep.layout import SweepDir

SWEEP_TAG, KEY_TAG, KIND_TAG = "msae.sweep_id", "msae.trial_key", "msae.kind"
PARENT_TAG, NOTE_TAG = "mlflow.parentRunId", "mlflow.note.content"
# The experiment's kind (MLflow 3.17's UI itself follows the page's workflowType: see dashboard_url).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# MLflow's "shared view" of an experiment page: an experiment tag holding the page's state as JSON,
# opened by the URL parameter viewStateShareKey.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."

# What a researcher compares across runs: logged as MLflow metrics. Everything else a trial
# measures goes to the run's diagnostics.json artifact (and a few strings to tags).
EPOCH_METRICS = ("train_loss", "train_l0", "lr_schedule", "dead_fraction_train")
HEADLINE = ("fvu", "fvu_dataset", "cosine", "l0", "zero_fraction", "dead_fraction", "nmse")
PER_CACHE = ("fvu", "fvu_dataset", "cosine", "l0", "dead_fraction")
FINAL_METRICS = ("cknna_recon", "decoder_orthogonality", "probe_kl", "probe_agreement", "probe_accuracy", "named_latents")
STRING_TAGS = ("node_id", "data_access", "data_mapping")


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


def quiet_mlflow() -> None:
    """Keep MLflow's store set-up chatter (table creation, migrations) out of the terminal, and its
    HTTP retries short: a dead server fails a call within seconds instead of hanging."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient
    quiet_mlflow()
    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_metrics(result: dict[str, Any], caches: list[str]) -> dict[str, float]:
    """The comparison metrics of one reported result (see EPOCH_METRICS ... FINAL_METRICS)."""
    names = list(EPOCH_METRICS) + list(HEADLINE) + list(FINAL_METRICS)
    names += [f"{c}/{m}" for c in caches for m in PER_CACHE]
    names += [k for k in result if k.startswith("recovery")]
    out = {}
    for k in names:
        v = result.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            out[k] = float(v)
    return out


def dashboard_url(base: str, exp_id: str, view_key: str | None = None, charts: bool = False) -> str:
    """A link into the MLflow UI at ``base`` that opens the experiment's runs (MLflow 3.17's UI opens
    on its GenAI pages unless told workflowType=machine_learning), in the sweep's view."""
    url = f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    if view_key:
        url += f"&viewStateShareKey={view_key}"
    return url + ("&compareRunsMode=CHART" if charts else "")


def sweep_links(uri: str, base: str) -> list[str]:
    """One line per experiment of ``uri`` holding msae sweeps: a link to its latest sweep's view."""
    try:
        experiments = mlflow_client(uri).search_experiments()
    except Exception as e:  # MLflow raises many types for a store it cannot read
        raise MsaeError(f"--tracking-uri {uri}: cannot read the tracking store "
                        f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from e
    lines = []
    for exp in experiments:
        keys = sorted(k[len(VIEW_TAG_PREFIX):] for k in exp.tags if k.startswith(VIEW_TAG_PREFIX + "msae-"))
        if keys:  # sweep ids end in a timestamp: the last is the latest
            latest = max(keys, key=lambda k: k.rsplit("-", 3)[-3:])
            lines.append(f"  {exp.name}: {dashboard_url(base, exp.experiment_id, latest, charts=True)}")
    return lines


def child_runs(client, exp_id: str, sweep_id: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`{KIND_TAG}` = 'trial'",
                             max_results=1000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


class SweepTracker:
    """The MLflow side of one sweep: its experiment, parent run and child runs."""

    def __init__(self, uri: str, experiment: str, sweep: SweepDir, caches: list[str]):
        self.uri, self.experiment, self.sweep, self.caches = uri, experiment, sweep, caches
        self._client = None
        self.exp_id: str | None = None
        self.parent_id: str | None = None
        self.runs: dict[str, str] = {}  # trial key -> run id
        self._logged: dict[str, int] = {}  # trial key -> last epoch logged
        self._status: dict[str, str] = {}  # trial key -> run status as last set

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.uri)
        return self._client

    def _find(self, tags: dict[str, str]):
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.exp_id], filter_string=flt, max_results=2, order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    # ---------------------------------------------------------------- the sweep's parent run
    def open(self, spec_text: str, spec_name: str, params: dict[str, Any]) -> str:
        """Experiment (of the model-training kind) and the sweep's parent run, found or created."""
        from mlflow.entities import Param

        exp = self.client.get_experiment_by_name(self.experiment)
        self.exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            self.experiment, tags={EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]})
        if exp is not None and exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(self.exp_id, *EXPERIMENT_KIND)
        sid = self.sweep.sweep_id
        run = self._find({SWEEP_TAG: sid, KIND_TAG: "sweep"})
        if run is not None:
            self.parent_id = run.info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            return self.parent_id
        run = self.client.create_run(self.exp_id, run_name=sid, tags={
            SWEEP_TAG: sid, KIND_TAG: "sweep", "msae.spec": spec_name, "mlflow.source.git.commit": git_commit(),
            NOTE_TAG: f"msae sweep `{sid}` of spec `{spec_name}`: running. The Pareto front appears here when it ends."})
        self.parent_id = run.info.run_id
        self.client.log_batch(self.parent_id, params=[Param(k, str(v)) for k, v in params.items()])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "spec.yaml").write_text(spec_text)
            self.client.log_artifact(self.parent_id, str(Path(tmp) / "spec.yaml"))
        return self.parent_id

    @property
    def view_key(self) -> str:
        return f"msae-{self.sweep.sweep_id}"

    def set_dashboard_view(self, params: list[str]) -> None:
        """The sweep's dashboard view (an experiment tag; see dashboard_url): the runs table with the
        sweep's parent expanded, sorted by FVU, with the columns a researcher compares, and charts of
        the front: FVU and cosine against L0 (each trial's own code)."""
        section = "msae-front"

        def scatter(uuid: str, y: str, name: str) -> dict[str, Any]:
            return {"uuid": uuid, "type": "SCATTER", "xaxis": {"key": "l0", "type": "METRIC"},
                    "yaxis": {"key": y, "type": "METRIC"}, "runsCountToCompare": 500, "metricSectionId": section,
                    "deleted": False, "isGenerated": False, "displayName": name}

        metrics = ["l0", "fvu", "cosine", "dead_fraction", "zero_fraction", "recovery"]
        state = {
            "orderByKey": "metrics.`fvu`", "orderByAsc": True,
            "selectedColumns": [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics],
            "runsExpanded": {self.parent_id: True}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
            "runsHiddenMode": "SHOW_ALL",
            "compareRunCharts": [
                scatter("msae-fvu-l0", "fvu", "Sparsity-fidelity: FVU against L0 (each trial's own code)"),
                scatter("msae-cos-l0", "cosine", "Cosine against L0")],
            "compareRunSections": [{"uuid": section, "name": "Sweep front", "display": True, "isReordered": False,
                                    "deleted": False, "isGenerated": False}],
            "viewMaximized": False, "runListHidden": False, "isAccordionReordered": True, "groupBy": None,
            "groupsExpanded": {}, "autoRefreshEnabled": True, "useGroupedValuesInCharts": True,
            "hideEmptyCharts": True, "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                                               "selectedXAxisMetricKey": ""}}
        self.client.set_experiment_tag(self.exp_id, VIEW_TAG_PREFIX + self.view_key, json.dumps(state))

    def set_parent(self, status: str) -> None:
        if status == "RUNNING":
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            self.client.set_terminated(self.parent_id, status=status)

    def log_report(self, key: str) -> None:
        """A trial's latent-card report (the sweep folder's reports/KEY) on its run, as report/."""
        folder = self.sweep.report_dir(key)
        if key in self.runs and folder.is_dir():
            self.client.log_artifacts(self.runs[key], str(folder), artifact_path="report")

    def log_fronts(self, fronts: dict[str, Any], note: str, plane: str = "fvu") -> None:
        """The fronts (the sweep folder's pareto/) on the parent run: artifacts, hypervolume metrics,
        the run ids of the overall front, and a description holding the front table."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_artifacts(self.parent_id, str(self.sweep.pareto_dir), artifact_path="pareto")
        metrics = [Metric(f"hv/{name}", fr["hypervolume_fraction"], now, 0) for name, fr in fronts["fronts"].items()]
        front = fronts["fronts"].get(f"all/{plane}", {"trials": []})["trials"]
        run_ids = ",".join(self.runs[k] for k in front if k in self.runs)
        self.client.log_batch(self.parent_id, metrics=metrics,
                         tags=[RunTag("msae.front_run_ids", run_ids[:5000]), RunTag(NOTE_TAG, note)])

    # ---------------------------------------------------------------- one trial's child run
    def _run(self, key: str, record: dict[str, Any]) -> str:
        from mlflow.entities import Param

        if key in self.runs:
            return self.runs[key]
        run = self._find({SWEEP_TAG: self.sweep.sweep_id, KEY_TAG: key})
        if run is None:
            run = self.client.create_run(self.exp_id, run_name=record.get("run_name", key), tags={
                SWEEP_TAG: self.sweep.sweep_id, KEY_TAG: key, KIND_TAG: "trial", PARENT_TAG: self.parent_id,
                "msae.method": record["method"]})
            sae, train = record.get("sae", {}), record.get("train", {})
            params = {**record["params"], "n": sae.get("n"), "d": sae.get("d"), "epochs": train.get("epochs"),
                      "batch_size": train.get("batch_size"), "seed": train.get("seed"), "loss": train.get("loss")}
            self.client.log_batch(run.info.run_id, params=[Param(k, json.dumps(v) if isinstance(v, list) else str(v))
                                                      for k, v in params.items() if v is not None])
            self._logged[key], self._status[key] = 0, "RUNNING"
        else:
            hist = self.client.get_metric_history(run.info.run_id, "train_loss")
            self._logged[key] = max((h.step for h in hist), default=0)
            self._status[key] = run.info.status
        self.runs[key] = run.info.run_id
        return run.info.run_id

    def sync(self, key: str, interrupted: bool = False) -> None:
        """Make trial ``key``'s run agree with the sweep folder (idempotent)."""
        from mlflow.entities import Metric, RunTag

        record = self.sweep.trial(key)
        if record is None:
            return
        rid = self._run(key, record)
        result = self.sweep.result(key)  # read once: the epochs logged and the status set agree on it
        for h in self._epochs(key, result):
            epoch = int(h["epoch"])
            if epoch <= self._logged[key]:
                continue
            ts = int(h.get("time", time.time()) * 1000)
            metrics = [Metric(k, v, ts, epoch) for k, v in mlflow_metrics(h, self.caches).items()]
            tags = [RunTag(f"msae.{k}", str(h[k])[:5000]) for k in STRING_TAGS if k in h]
            # train_loss last: once it is logged at this epoch, everything of the epoch is
            metrics.sort(key=lambda m: m.key == "train_loss")
            for s in range(0, len(metrics), 900):
                self.client.log_batch(rid, metrics=metrics[s:s + 900], tags=tags if s == 0 else [])
            self._logged[key] = epoch
        status, tags = self._wanted(key, result, interrupted)
        if status == self._status.get(key):
            return
        for name, value in tags.items():
            self.client.set_tag(rid, name, value)
        if status == "RUNNING" and self._status.get(key) in ("FAILED", "KILLED"):  # retried or resumed
            for name in ("msae.failure_reason", "msae.interrupted"):
                try:
                    self.client.delete_tag(rid, name)
                except Exception:  # MLflow raises when the tag is not there
                    pass
        if status == "FINISHED" and (result or {}).get("status") == "finished":
            self._log_final_artifacts(rid, key, record)
        if status == "RUNNING":
            self.client.update_run(rid, status="RUNNING")
        else:
            self.client.set_terminated(rid, status=status)
        self._status[key] = status

    def _epochs(self, key: str, result: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The trial's epoch results; a finished trial writes its result (whose metrics are its last
        epoch's) just before appending that epoch to the history, so the result stands in for it."""
        rows = self.sweep.history(key)
        result = result or {}
        last = result.get("metrics", {}) if result.get("status") == "finished" else {}
        if "epoch" in last and int(last["epoch"]) > max((int(h["epoch"]) for h in rows), default=0):
            rows.append(last)
        return rows

    def _wanted(self, key: str, result: dict[str, Any] | None, interrupted: bool) -> tuple[str, dict[str, str]]:
        error = self.sweep.error(key)
        if result is not None:
            if result.get("status") == "diverged":
                return "FAILED", {"msae.failure_reason": f"diverged: {result.get('failure', '')}"[:5000]}
            if result.get("status") == "stopped_early":
                return "FINISHED", {"msae.stopped_early": "true"}
            return "FINISHED", {}
        if error is not None:
            return "FAILED", {"msae.failure_reason": error[:5000]}
        return ("KILLED", {"msae.interrupted": "true"}) if interrupted else ("RUNNING", {})

    def _log_final_artifacts(self, rid: str, key: str, record: dict[str, Any]) -> None:
        """The final SAE, its k-curve (PNG + JSON) and every diagnostic, as artifacts."""
        from msae.sweep.plots import plot_curve

        sae = self.sweep.final_sae(key)
        if sae.is_dir():
            self.client.log_artifacts(rid, str(sae), artifact_path="sae")
        result = self.sweep.result(key) or {}
        metrics = result.get("metrics", {})
        logged = set(mlflow_metrics(metrics, self.caches))
        diagnostics = {"final": {k: v for k, v in metrics.items() if k not in logged},
                       "epochs": [{k: v for k, v in h.items() if k not in set(mlflow_metrics(h, self.caches))}
                                  for h in self.sweep.history(key)]}
        with tempfile.TemporaryDirectory() as tmp:
            atomic.write_json(Path(tmp) / "diagnostics.json", diagnostics)
            curve = result.get("curve") or []
            if curve:
                atomic.write_json(Path(tmp) / "curve.json", curve)
                own = {k: metrics[k] for k in ("l0", "fvu", "cosine")} if all(k in metrics for k in ("l0", "fvu", "cosine")) else None
                plot_curve(curve, own, f"{record.get('run_name', key)}: progressive recovery", Path(tmp) / "curve.png")
            self.client.log_artifacts(rid, tmp)


class BackgroundSync:
    """Keeps the tracking store in step with the sweep folder from one background thread.

    ``request(key)`` never blocks. While the store is unreachable, requests wait (their data is
    safe in the sweep folder), the thread retries with backoff (1 s doubling to 60 s) and says so
    through ``say``; when the store is back everything pending is logged.
    """

    def __init__(self, tracker: SweepTracker, say: Callable[[str], None]):
        self.tracker, self.say = tracker, say
        self.interrupted = False
        self._pending: set[str] = set()
        self._clientv = threading.Condition()
        self._stop = False
        self._busy = False
        self._failing: str | None = None
        self._thread = threading.Thread(target=self._loop, name="msae-tracking", daemon=True)
        self._thread.start()

    def request(self, key: str) -> None:
        with self._clientv:
            self._pending.add(key)
            self._clientv.notify_all()

    def pending(self) -> set[str]:
        with self._clientv:
            return set(self._pending)

    @property
    def failing(self) -> str | None:
        return self._failing

    def _loop(self) -> None:
        delay = 1.0
        while True:
            with self._clientv:
                while not self._pending and not self._stop:
                    self._clientv.wait()
                if self._stop:
                    return
                keys = sorted(self._pending)
                self._busy = True
            try:
                for key in keys:
                    with self._clientv:
                        self._pending.discard(key)
                    try:
                        self.tracker.sync(key, self.interrupted)
                    except BaseException:
                        with self._clientv:
                            self._pending.add(key)
                        raise
                if self._failing is not None:
                    self.say(f"tracking store {self.tracker.uri} is back; logged what was waiting")
                self._failing, delay = None, 1.0
            except Exception as e:  # MLflow raises many types for an unreachable or failing store
                problem = (str(e).splitlines() or [type(e).__name__])[0][:200]
                if self._failing is None:
                    self.say(f"tracking store {self.tracker.uri} unreachable ({problem}); training goes on, "
                             f"{len(self.pending())} trial(s) waiting to be logged (safe in {self.tracker.sweep.root})")
                self._failing = problem
                with self._clientv:
                    self._clientv.wait(timeout=delay)
                delay = min(delay * 2, 60.0)
            finally:
                with self._clientv:
                    self._busy = False
                    self._clientv.notify_all()

    def drain(self, timeout: float, tick: float = 30.0) -> bool:
        """Wait until nothing is pending (True) or ``timeout`` seconds pass (False), saying every
        ``tick`` seconds what is still waiting."""
        deadline = time.monotonic() + timeout
        next_note = time.monotonic() + tick
        with self._clientv:
            while self._pending or self._busy:
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now >= next_note and self._failing:
                    self.say(f"waiting for tracking store {self.tracker.uri}: {len(self._pending)} trial(s) "
                             f"pending, {deadline - now:.0f} s left")
                    next_note = now + tick
                self._clientv.wait(timeout=min(1.0, deadline - now))
        return True

    def close(self) -> None:
        with self._clientv:
            self._stop = True
            self._clientv.notify_all()
        self._thread.join(timeout=5)
