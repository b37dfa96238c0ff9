"""The trials of a sweep on Ray Tune: a new Tuner for every driver run, built from the spec and
the sweep folder alone (never restored from Tune's own pickled state).

A grid sweep runs the grid's trials that have no result yet; a trial that was interrupted
continues from its saved state. An Optuna sweep continues its study (SQLite, ``optuna.db``): the
trials in flight when the driver stopped are asked again first with the same parameters (so they
continue too), and only the rest of the budget is drawn anew.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from msae.sweep.callbacks import InterruptStopper, SweepCallback
from msae.sweep.layout import SweepDir
from msae.sweep.prepare import Plan
from msae.sweep.progress import SweepProgress
from msae.sweep.space import OptunaSpace, Trial, TrialFactory
from msae.sweep.trial import TrialSetup, run_trial
from msae.sweep.tracking import BackgroundSync

INTERRUPTED_ATTR = "msae_interrupted"


def remaining_grid(plan: Plan, sweep: SweepDir) -> list[Trial]:
    """The grid's unfinished trials, the most expensive first (largest own k; ReLU-style codes
    count as n), so that the sweep's last slots are not left waiting on one long trial (longest-
    processing-time-first: measured on bench/sweep_overhead.py, it removed an idle tail of ~30 s)."""
    todo = [t for t in plan.trials if sweep.result(t.key) is None]
    return sorted(todo, key=lambda t: -(t.sae.own_k or t.sae.n))


def continue_study(sweep: SweepDir, budget: int) -> int:
    """Prepare the sweep's Optuna study for another driver run; returns how many trials to draw.

    Trials left RUNNING by a stopped driver are closed as failed (marked interrupted, not counted
    against the budget) and their parameters enqueued, so that they are asked again first."""
    import optuna
    from optuna.trial import TrialState

    if not sweep.optuna_db.is_file():
        return budget
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep.optuna_db}")
    try:
        study = optuna.load_study(study_name=sweep.sweep_id, storage=storage)
    except KeyError:  # no study was created yet
        return budget
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if t.state == TrialState.RUNNING:
            storage.set_trial_user_attr(t._trial_id, INTERRUPTED_ATTR, True)
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)
    counted = [t for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED_ATTR))]
    return max(budget - len(counted), 0)


def _search(plan: Plan, sweep: SweepDir, todo: list[Trial]) -> tuple[dict, dict[str, Any]]:
    """(param_space, TuneConfig keywords) of the spec's search."""
    from ray import tune

    spec = plan.spec
    if spec.search.kind == "grid":
        return {"trial": tune.grid_search([t.tune_config() for t in todo])}, {}
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = spec.search
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=s.seed),
               "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=s.seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=s.seed)}[s.sampler]()
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep.optuna_db}")
    searcher = OptunaSearch(space=OptunaSpace(spec, plan.d), metric=["fvu", "l0"], mode=["min", "min"],
                            sampler=sampler, storage=storage, study_name=sweep.sweep_id)
    return {}, {"search_alg": searcher}


def run_trials(plan: Plan, sweep: SweepDir, sync: BackgroundSync, progress: SweepProgress,
               interrupted: threading.Event, cluster: bool) -> None:
    """Run what is left of the sweep's trials; returns when they ended or ``interrupted`` is set."""
    from ray import tune

    spec = plan.spec
    if spec.search.kind == "grid":
        todo = remaining_grid(plan, sweep)
        samples = 1
        if not todo:
            return
    else:
        todo = []
        samples = continue_study(sweep, spec.search.trials)
        if samples == 0:
            return
    param_space, search = _search(plan, sweep, todo)
    factory = TrialFactory.of(spec, plan.d)
    setup = TrialSetup(str(sweep.root), sweep.sweep_id, plan.data, factory, spec.training.epoch_eval_rows,
                       spec.training.progressive, max(1, int(spec.resources.cpus)), spec.resources.gpu)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": spec.resources.cpus, "gpu": spec.resources.gpu})
    scheduler = None
    if spec.early_stopping.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler
        e = spec.early_stopping
        scheduler = ASHAScheduler(metric="fvu", mode="min", time_attr="epoch", max_t=spec.training.epochs,
                                  grace_period=e.grace_period, reduction_factor=e.reduction_factor)
    storage_path, name = sweep.new_tune_run()
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # msae's own handler (runner.Interrupts) stops the run
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=samples, max_concurrent_trials=spec.search.concurrency,
                                    reuse_actors=True, scheduler=scheduler,
                                    trial_dirname_creator=lambda t: f"{t.config['trial']['key']}_{t.trial_id}", **search),
        run_config=tune.RunConfig(name=name, storage_path=str(storage_path), verbose=0,
                                  callbacks=[SweepCallback(sweep, factory, sync, progress, interrupted)],
                                  stop=InterruptStopper(interrupted),
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures)))
    tuner.fit()
