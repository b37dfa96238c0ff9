"""Thin Ray Tune adapters of the driver: they record what only the driver sees in the sweep folder
(a trial's definition, its final error, an early stop) and pass events on to the tracking sync
and the terminal progress. Plus the stopper through which Ctrl-C stops a sweep."""
from __future__ import annotations

import threading
from pathlib import Path

from ray.tune import Callback
from ray.tune.stopper import Stopper

from msae.sweep.layout import SweepDir
from msae.sweep.progress import SweepProgress
from msae.sweep.space import TrialFactory
from msae.sweep.tracking import BackgroundSync


def _key(trial) -> str:
    return trial.config["trial"]["key"]


class InterruptStopper(Stopper):
    """Stops every trial once ``event`` is set (the first Ctrl-C or SIGTERM). Tune then ends the
    run without telling the searcher or the callbacks that the trials completed."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __getstate__(self):  # Tune pickles its run config into files msae never reads back
        return {}

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.event.is_set()


class SweepCallback(Callback):
    def __init__(self, sweep: SweepDir, factory: TrialFactory, sync: BackgroundSync, progress: SweepProgress,
                 interrupted: threading.Event):
        self.sweep, self.factory, self.sync, self.progress, self.interrupted = sweep, factory, sync, progress, interrupted

    def __getstate__(self):  # Tune pickles its run config into files msae never reads back
        return {"sweep": self.sweep}

    def on_trial_start(self, iteration, trials, trial, **info):
        t = self.factory.from_tune(trial.config)
        self.sweep.write_trial(t.key, t.record())
        self.sweep.clear_error(t.key)
        self.progress.started(t.key, t.train.epochs)
        self.sync.request(t.key)

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = _key(trial)
        if "epoch" in result:
            self.progress.epoch(key, int(result["epoch"]), result)
        self.sync.request(key)

    def on_trial_complete(self, iteration, trials, trial, **info):
        key = _key(trial)
        result = self.sweep.result(key)
        if result is None and not self.interrupted.is_set():  # stopped by the scheduler (ASHA)
            history = self.sweep.history(key)
            last = history[-1] if history else {}
            result = {"status": "stopped_early", "epoch": int(last.get("epoch", 0)), "metrics": last}
            self.sweep.write_result(key, result)
        if result is not None:
            m = result.get("metrics", {})
            detail = " ".join(f"{k}={m[k]:.4g}" for k in ("fvu", "l0", "cosine", "probe_kl", "named_latents")
                              if isinstance(m.get(k), (int, float)))
            status = result.get("status", "finished")
            detail = result.get("failure", detail) if status == "diverged" else detail
            self.progress.ended(key, status.replace("_", " "), detail)
        self.sync.request(key)

    def on_trial_error(self, iteration, trials, trial, **info):
        key = _key(trial)
        reason = _error_text(trial)
        self.sweep.write_error(key, reason)
        self.progress.ended(key, "failed", reason)
        self.sync.request(key)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "trial failed"
    except OSError:
        return "trial failed"
