"""``msae sweep``: prepare (no Ray), run the trials in a Ray session, end with the Pareto fronts.

Ctrl-C or SIGTERM once: every trial stops (each keeps its last finished epoch), nothing unfinished
is marked finished, MLflow runs of unfinished trials end KILLED, the sweep is ``interrupted`` and
``--resume`` continues it. A second Ctrl-C quits at once (still resumable). A tracking store
that goes away never stops training: see msae.sweep.tracking.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait as futures_wait
from dataclasses import dataclass, field
from typing import Any, Callable

from msae.errors import MsaeError
from msae.sweep.fronts import format_table, sweep_fronts
from msae.sweep.layout import SweepDir
from msae.sweep.prepare import Overrides, Plan, prepare, sweep_folder
from msae.sweep.progress import SweepProgress
from msae.sweep.tracking import BackgroundSync, SweepTracker

EXIT_INTERRUPTED, EXIT_TRACKING_PENDING = 130, 3

__all__ = ["Overrides", "Outcome", "run_sweep", "dry_run", "format_sweeps", "relog"]


@dataclass
class Outcome:
    sweep_id: str
    sweep_dir: str
    counts: dict[str, int]
    exit_code: int
    uri: str
    parent_run_id: str | None = None
    fronts: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    pending: set[str] = field(default_factory=set)  # trials whose tracking could not be brought up to date


class Interrupts:
    """First SIGINT/SIGTERM: set ``event`` (the stopper then ends every trial); second: quit at once."""

    def __init__(self, say: Callable[[str], None], hint: str):
        self.event = threading.Event()
        self.say, self.hint = say, hint
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        self.say(f"msae sweep: {signal.Signals(signum).name}: stopping every trial at its last finished epoch; "
                 f"press Ctrl-C again to quit at once. Resume later with: {self.hint}")

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _cluster_address(overrides: Overrides) -> str | None:
    import os
    return overrides.address or os.environ.get("RAY_ADDRESS") or None


def run_sweep(spec_path: str, resume: str | bool = False, overrides: Overrides = Overrides(),
              quiet: bool = False) -> Outcome:
    from msae.sweep.ray_session import RaySession
    from msae.sweep.tuning import run_trials

    address = _cluster_address(overrides)
    plan = prepare(spec_path, overrides, cluster=address is not None)
    spec = plan.spec
    sweep = sweep_folder(plan, resume)
    # the tracking store opens (MLflow's imports and migrations) while Ray starts: ~3 s less
    # before the first trial on 2 cores; its errors still end the sweep before any trial runs
    pool = ThreadPoolExecutor(1, thread_name_prefix="msae-tracking-open")
    opening = pool.submit(_open_tracking, plan, sweep, not resume)
    pool.shutdown(wait=False)
    done = sweep.counts()
    progress = SweepProgress(len(plan.trials) or spec.search.trials, done["finished"] + done["stopped_early"],
                             done["diverged"], quiet)
    resume_hint = f"msae sweep {spec_path} --resume {sweep.sweep_id}"
    if resume:
        sweep.update_state(status="running", resumed=time.time())
    interrupts = Interrupts(progress.say, resume_hint)
    sync = None
    try:
        with interrupts, RaySession(address, sweep.sweep_id, plan.data):
            tracker = opening.result()
            sync = BackgroundSync(tracker, progress.say)
            progress.say(f"msae sweep {sweep.sweep_id}: {len(plan.trials) or spec.search.trials} trials, "
                         f"{plan.d} -> {plan.n}, tracking {spec.tracking.uri} (experiment {spec.experiment!r}); "
                         f"folder {sweep.root}")
            run_trials(plan, sweep, sync, progress, interrupts.event, address is not None)
    except KeyboardInterrupt:  # the second Ctrl-C: quit now, everything needed to resume is on disk
        progress.close()
        if sync is not None:
            sync.close()
        sweep.update_state(status="interrupted")
        print(f"msae sweep: interrupted; resume with: {resume_hint}", file=sys.stderr)
        tracker = opening.result() if opening.done() and opening.exception() is None else None
        return Outcome(sweep.sweep_id, str(sweep.root), sweep.counts(), EXIT_INTERRUPTED, spec.tracking.uri,
                       tracker.parent_id if tracker else None, interrupted=True)
    finally:
        progress.close()
        futures_wait([opening])  # never leave the store half-opened behind an error
    return _finish(plan, sweep, tracker, sync, interrupts.event.is_set(), resume_hint, spec_path)


def _open_tracking(plan: Plan, sweep: SweepDir, new: bool) -> SweepTracker:
    spec = plan.spec
    tracker = SweepTracker(spec.tracking.uri, spec.experiment, sweep, list(plan.data.evals))
    params = {"n": plan.n, "d": plan.d, "expansion": spec.expansion, "search": spec.search.kind,
              "trials": len(plan.trials) or spec.search.trials, "epochs": spec.training.epochs,
              "batch_size": spec.training.batch_size, "train_rows": plan.data.train.rows,
              "train": plan.data.train.path, **{f"eval/{k}": v.path for k, v in plan.data.evals.items()}}
    try:
        tracker.open(plan.spec_text, spec.name, params)
        tracker.set_dashboard_view(view_params(spec))
    except Exception as e:  # MLflow raises many types for a bad store
        if new:
            import shutil
            shutil.rmtree(sweep.root, ignore_errors=True)
        if isinstance(e, MsaeError):
            raise
        raise MsaeError(f"tracking.uri {spec.tracking.uri}: cannot use the tracking store "
                        f"({(str(e).splitlines() or [type(e).__name__])[0][:300]})") from e
    sweep.update_state(parent_run_id=tracker.parent_id)
    return tracker


def _finish(plan: Plan, sweep: SweepDir, tracker: SweepTracker, sync: BackgroundSync, interrupted: bool,
            resume_hint: str, spec_path: str) -> Outcome:
    """Bring the tracking store up to date (waiting for it if it is away), compute the fronts,
    log them, close the sweep; print the table and where to look."""
    spec = plan.spec
    say = sync.say
    sync.interrupted = interrupted
    for key in sweep.trial_keys():
        sync.request(key)
    plane = spec.pareto.fidelity
    fronts = sweep_fronts(sweep, reference(spec, plan.n, sweep.state()))
    reports = best_reports(plan, sweep, fronts, say)
    synced = sync.drain(spec.tracking.wait_s)
    pending = sync.pending()
    sync.close()
    status = "interrupted" if interrupted else "finished"
    sweep.update_state(status=status, finished=time.time(), tracking="synced" if synced else "pending")
    if synced:
        try:
            for key in reports.values():
                tracker.log_report(key)
            tracker.log_fronts(fronts, parent_note(sweep, plan, fronts, status, tracker.parent_id, reports), plane)
            tracker.set_parent("KILLED" if interrupted else "FINISHED")
        except Exception as e:  # the store went away again at the last moment
            synced = False
            say(f"msae sweep: could not log the fronts ({(str(e).splitlines() or [type(e).__name__])[0][:200]})")
            sweep.update_state(tracking="pending")
    counts = sweep.counts()
    print(format_table(fronts, plane))
    print(f"trials: {counts['finished']} finished, {counts['stopped_early']} stopped early, "
          f"{counts['diverged']} diverged, {counts['failed']} failed; results in {sweep.root}")
    print(f"tracking: {spec.tracking.uri}  experiment {spec.experiment!r}  parent run {tracker.parent_id}")
    print(f"dashboard: {ui_hint(spec.tracking.uri, tracker)}")
    code = 0 if counts["finished"] + counts["stopped_early"] > 0 else 1
    if not synced:
        print(f"msae sweep: {len(pending) or 'the fronts of'} trial(s) not yet logged to {spec.tracking.uri} "
              f"(unreachable); they are safe in {sweep.root}. When the store is back: "
              f"msae pareto {spec_path} --sweep-id {sweep.sweep_id}", file=sys.stderr)
        code = EXIT_TRACKING_PENDING
    if interrupted:
        print(f"msae sweep: interrupted; resume with: {resume_hint}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    return Outcome(sweep.sweep_id, str(sweep.root), counts, code, spec.tracking.uri, tracker.parent_id, fronts,
                   interrupted, pending)


def reference(spec, n: int, state: dict[str, Any]) -> dict[str, float]:
    """The hypervolume reference point (the probe-KL axis from the sweep's recorded mean KL)."""
    return spec.pareto.reference(n, state.get("probe_mean_kl"))


def best_reports(plan: Plan, sweep: SweepDir, fronts: dict[str, Any], say: Callable[[str], None]) -> dict[str, str]:
    """The latent-card report of each method's best model, when the spec has an evaluation section."""
    from msae.sweep.reports import write_best_reports

    ev = plan.spec.evaluation
    if not ev.report or (ev.probe is None and ev.vocabulary is None) or plan.data is None:
        return {}
    try:
        picks = write_best_reports(sweep, fronts, plan.spec.pareto.fidelity, plan.data.evals[plan.data.primary].path,
                                   ev.vocabulary)
    except Exception as e:  # a report is a view: never lose the sweep's ending over it
        say(f"msae sweep: could not write the latent-card reports ({(str(e).splitlines() or [type(e).__name__])[0][:200]})")
        return {}
    if picks:
        say("msae sweep: latent-card reports of the best models: "
            + ", ".join(f"{m} {sweep.report_dir(k) / 'index.html'}" for m, k in picks.items()))
    return picks


def view_params(spec) -> list[str]:
    """The params columns of the sweep's dashboard view: method, lr and every swept setting."""
    from msae.sae import REGISTRY
    names = ["method", "lr"]
    for method, grid in spec.methods.enabled().items():
        names += [h.name for h in REGISTRY[method].hypers if h.sweep and getattr(grid, h.name, None) is not None
                  and h.name not in names]
    return names


def ui_hint(uri: str, tracker: SweepTracker) -> str:
    """How to look at the sweep in the dashboard, in a form that works under ./dev too."""
    import os
    from msae.sweep.tracking import dashboard_url
    if uri.startswith(("http://", "https://")):
        return f"open {dashboard_url(uri, tracker.exp_id, tracker.view_key, charts=True)}"
    prefix = "./dev msae" if os.environ.get("MSAE_DEV") else "msae"
    return (f"{prefix} ui --tracking-uri {uri}\n  then open "
            f"{dashboard_url('http://127.0.0.1:5000', tracker.exp_id, tracker.view_key, charts=True)}")


def parent_note(sweep: SweepDir, plan: Plan, fronts: dict[str, Any], status: str, run_id: str | None = None,
                reports: dict[str, str] | None = None) -> str:
    """The parent run's description (markdown): what the sweep was, its front (plot and table), how to
    read it, and the spec."""
    counts = sweep.counts()
    plane = plan.spec.pareto.fidelity
    overall = fronts["fronts"].get(f"all/{plane}", {"points": [], "hypervolume_fraction": 0.0})
    lines = [f"## msae sweep `{sweep.sweep_id}` ({status})",
             f"Spec `{plan.spec.name}`: {plan.d} -> {plan.n} latents; {counts['finished']} trials finished, "
             f"{counts['stopped_early']} stopped early, {counts['diverged']} diverged, {counts['failed']} failed. "
             f"Overall front: {len(overall['points'])} points, hypervolume fraction "
             f"{overall['hypervolume_fraction']:.4f}.", ""]
    if run_id and overall["points"]:  # the front plot, served by the tracking server's artifact endpoint
        lines += [f"![Sparsity-fidelity front](get-artifact?path=pareto%2Fpareto_{plane}.png&run_uuid={run_id})", ""]
    lines += [
        "### How to read it",
        "Each child run is one SAE. Its **own** point is (L0, FVU) of the model's own code on the primary "
        "evaluation cache; TopK-style models also contribute their progressive-recovery curve (`k=16`, ...: "
        "the top-k latents of ReLU(pre)). A point is on the front when no other point has both a lower L0 and "
        "a lower FVU. The hypervolume fraction is the share of the reference box the front dominates (higher is "
        "better). Plots and tables: the Artifacts tab, `pareto/`; each child run has its own `curve.png`. "
        "Compare runs: the experiment's Runs page (chart view: FVU against L0).", "",
        "### Sparsity-fidelity front", "", format_table(fronts, plane, markdown=True), "",
        *([("Latent-card reports of each method's best front model (the point nearest the ideal corner): "
            + ", ".join(f"{m}: `{k}` (its run's `report/index.html`)" for m, k in reports.items())), ""]
          if reports else []),
        "### Spec", "", "```yaml", plan.spec_text.strip(), "```"]
    return "\n".join(lines)


# ---------------------------------------------------------------- other commands

def dry_run(spec_path: str, overrides: Overrides = Overrides()) -> str:
    """The trials a spec would run, without running anything."""
    plan = prepare(spec_path, overrides, dry_run=True)
    spec = plan.spec
    if spec.search.kind == "optuna":
        return (f"{spec.name}: Optuna search ({spec.search.sampler}, seed {spec.search.seed}), {spec.search.trials} "
                f"trials drawn from: " + ", ".join(f"{m}: {g.model_dump(exclude_none=True)}"
                                                  for m, g in spec.methods.enabled().items()))
    lines = [f"{spec.name}: {len(plan.trials)} trials, {plan.d} -> {plan.n} latents, {spec.training.epochs} epochs, "
             f"batch {spec.training.batch_size}"]
    lines += [f"  {t.key:<40} {t.run_name}" for t in plan.trials]
    return "\n".join(lines)


def format_sweeps(storage: str) -> str:
    sweeps = SweepDir.all(storage)
    if not sweeps:
        return f"no sweeps in {storage}"
    lines = [f"{'sweep id':<40} {'spec':<16} {'state':<12} {'done':>5} {'failed':>6} {'planned':>7}  tracking"]
    for s in sweeps:
        st, c = s.state(), s.counts()
        tracking = st.get("tracking_uri", "?") + (" (pending)" if st.get("tracking") == "pending" else "")
        lines.append(f"{s.sweep_id:<40} {st.get('name', '?'):<16} {st.get('status', '?'):<12} "
                     f"{c['finished'] + c['stopped_early']:>5} {c['diverged'] + c['failed']:>6} "
                     f"{st.get('trials_planned', '?'):>7}  {tracking}")
    return "\n".join(lines)


def relog(spec_path: str, sweep_id: str | None, overrides: Overrides = Overrides()) -> str:
    """``msae pareto``: log whatever the tracking store lacks, recompute the fronts, log them."""
    from msae.sweep.prepare import load
    from msae.sweep.reports import best_models
    from msae.sweep.tracking import check_tracking_uri

    spec, text = load(spec_path, overrides)
    sweep = SweepDir.find(spec.storage, spec.name, sweep_id, unfinished=False)
    state = sweep.state()
    uri = overrides.tracking_uri or state.get("tracking_uri", spec.tracking.uri)
    check_tracking_uri(uri)
    tracker = SweepTracker(uri, state.get("experiment", spec.experiment), sweep, state.get("caches", []))
    d, n = int(state["d"]), int(state["n"])
    plan = Plan(spec, state.get("spec", text), d, n, [], None)
    tracker.open(plan.spec_text, spec.name, {})
    tracker.set_dashboard_view(view_params(spec))
    interrupted = state.get("status") != "finished"
    for key in sweep.trial_keys():
        tracker.sync(key, interrupted)
    fronts = sweep_fronts(sweep, reference(spec, n, state))
    reports = {m: k for m, k in best_models(fronts, spec.pareto.fidelity).items() if sweep.report_dir(k).is_dir()}
    for key in reports.values():
        tracker.log_report(key)
    tracker.log_fronts(fronts, parent_note(sweep, plan, fronts, state.get("status", "finished"), tracker.parent_id,
                                           reports), spec.pareto.fidelity)
    tracker.set_parent("FINISHED" if state.get("status") == "finished" else "KILLED")
    sweep.update_state(tracking="synced")
    return f"{format_table(fronts, spec.pareto.fidelity)}\nlogged to parent run {tracker.parent_id} of sweep {sweep.sweep_id} ({uri})"
