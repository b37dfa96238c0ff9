"""Terminal progress of a sweep: one line per finished or failed trial, with the front so far."""
from __future__ import annotations

import sys

from ray.tune import Callback

from msae.pareto import pareto_front
from msae.sweep.space import trial_params


class SweepProgress(Callback):
    def __init__(self, total: int, quiet: bool = False):
        self.total, self.quiet = total, quiet

    def _line(self, trials, event: str) -> None:
        if self.quiet:
            return
        states = [t.status for t in trials]
        finals = [t.last_result for t in trials if t.last_result.get("final") and not t.last_result.get("diverged")]
        failed = states.count("ERROR") + sum(1 for t in trials if t.last_result.get("diverged"))
        done = sum(1 for t in trials if t.status == "TERMINATED") - (failed - states.count("ERROR"))
        pts = [(r["l0"], r["fvu"]) for r in finals if "l0" in r and "fvu" in r]
        front = " ".join(f"{pts[i][0]:.1f}/{pts[i][1]:.4f}" for i in pareto_front(pts)[:6])
        print(f"[sweep] {event}: {done}/{self.total} done, {states.count('RUNNING')} running, {failed} failed"
              + (f"; front (L0/FVU): {front}" if front else ""), file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trials, f"{trial_params(trial.config)['key']} finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, f"{trial_params(trial.config)['key']} FAILED")
