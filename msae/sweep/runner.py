"""``msae sweep``: the driver. Validates everything, opens the caches once, starts (or joins) Ray,
runs the trials with Ray Tune, tracks them in MLflow and ends with the Pareto fronts."""
from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msae.errors import MsaeError
from msae.sweep.spec import SweepSpec, load_spec, spec_from_dict

STATE_FILE = "msae-sweep.json"
_FORWARD_ENV = ("MSAE_", "MLFLOW_", "MALLOC_")


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: msae/MLflow settings of the driver, and a fixed glibc mmap threshold
    (1 MiB) so that freed batch buffers go back to the OS instead of growing the trial's private heap."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_ENV)}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    return env


@dataclass(frozen=True)
class Overrides:
    """The few settings in which a local and a cluster run of one spec differ."""
    address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    cpus: float | None = None
    gpu: float | None = None


def _spec_with(spec: SweepSpec, o: Overrides) -> SweepSpec:
    raw = spec.model_dump()
    if o.storage:
        raw["storage"] = o.storage
    if o.tracking_uri:
        raw["tracking"]["uri"] = o.tracking_uri
    for name in ("cpus", "gpu"):
        if getattr(o, name) is not None:
            raw["resources"][name] = getattr(o, name)
    return spec_from_dict(raw, "command line")


def prepare_data(spec: SweepSpec) -> tuple[np.ndarray, dict[str, np.ndarray], dict | None, dict[str, str]]:
    """Make synthetic data when the spec asks for it and it is missing; open every cache (memory-mapped)."""
    from msae.data import load_array
    from msae.synthetic import SPLITS, TRUTH_FILE, GroundTruth, write_synthetic

    data = spec.data
    train_path, eval_paths, truth_path = data.train, dict(data.eval), data.truth
    if data.synthetic is not None:
        s = data.synthetic
        out = Path(s.out)
        made = {f"{m}_{sp}": out / f"{m}_{sp}.arrow" for m, sp in SPLITS}
        if not all(p.is_file() for p in made.values()) or not (out / TRUTH_FILE).is_file():
            print(f"msae sweep: making synthetic CLIP-like data in {out}", file=sys.stderr)
            write_synthetic(out, s.n, s.n_val, overwrite=True, d=s.d, roots=s.roots, branching=tuple(s.branching),
                            active_roots=s.active_roots, seed=s.seed)
        train_path = train_path or str(made["image_train"])
        eval_paths = eval_paths or {"image_val": str(made["image_val"]), "text_val": str(made["text_val"])}
        truth_path = truth_path or str(out / TRUTH_FILE)
    train = load_array(train_path)
    d = train.shape[1]
    evals = {}
    for name, path in eval_paths.items():
        try:
            evals[name] = load_array(path, expect_dim=d)
        except MsaeError as e:
            raise MsaeError(f"data.eval.{name}: {e}") from None
    if not evals:
        print("msae sweep: no evaluation caches given; trials are evaluated on the train cache", file=sys.stderr)
        evals = {"train": train}
    truth = None
    if truth_path:
        gt = GroundTruth.load(truth_path)
        if gt.dictionary.shape[1] != d:
            raise MsaeError(f"data.truth {truth_path}: dimension {gt.dictionary.shape[1]}, the train cache has {d}")
        truth = {"dictionary": gt.dictionary, "level": gt.level, "parent": gt.parent}
    paths = {"train": str(Path(train_path).resolve()), **{f"eval/{k}": str(Path(v).resolve()) for k, v in eval_paths.items()}}
    return train, evals, truth, paths


def start_ray(address: str | None, env: dict[str, str]) -> bool:
    """Join ``address`` (cluster mode) or start a private local Ray bound to 127.0.0.1. True if we
    started (or joined) it here and must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": env} if env else None
    if address:
        # inside a Ray job the job's own runtime env is merged with ours instead of refusing the overlap
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise MsaeError(f"--address {address}: cannot join the Ray cluster ({str(e).splitlines()[0]})") from None
        return True
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind and advertise 127.0.0.1 only
    tmp = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
    ray.init(address="local", _temp_dir=tmp, include_dashboard=False, log_to_driver=False,
             runtime_env=runtime_env, configure_logging=True, logging_level="WARNING")
    return True


def check_resources(spec: SweepSpec, cluster_mode: bool) -> SweepSpec:
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    r = spec.resources
    if r.cpus > cpus and not cluster_mode:
        raise MsaeError(f"resources.cpus: a trial asks for {r.cpus:g} CPUs, this machine has {cpus:g}")
    if r.gpu > 0 and gpus == 0:
        if cluster_mode:
            print("msae sweep: no GPU in the cluster yet; trials wait for GPU nodes", file=sys.stderr)
        else:
            print("msae sweep: no GPU here; trials run on the CPU", file=sys.stderr)
            return spec.model_copy(update={"resources": r.model_copy(update={"gpu": 0.0})})
    elif r.gpu > gpus and not cluster_mode:
        raise MsaeError(f"resources.gpu: a trial asks for {r.gpu:g} GPUs, this machine has {gpus:g}")
    return spec


def find_sweep(storage: Path, name: str, resume: str | bool, include_finished: bool = False) -> Path:
    """The folder of the sweep named ``resume``, else the latest (unfinished) sweep of spec ``name``."""
    if isinstance(resume, str) and resume:
        p = storage / resume
        if not (p / STATE_FILE).is_file():
            raise MsaeError(f"--resume {resume}: no sweep state in {p}")
        return p
    found = []
    for state in storage.glob(f"*/{STATE_FILE}"):
        st = json.loads(state.read_text())
        if st.get("name") == name and (include_finished or st.get("status") != "finished"):
            found.append((st.get("started", 0), state.parent))
    if not found:
        raise MsaeError(f"no {'' if include_finished else 'unfinished '}sweep of spec {name!r} in {storage}")
    return max(found)[1]


def _write_state(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, folder / STATE_FILE)


def run_sweep(spec_path: str, resume: str | bool = False, overrides: Overrides = Overrides(),
              quiet: bool = False) -> dict[str, Any]:
    from msae.sweep import tracking
    from msae.sweep.space import check_trials

    spec_text = Path(spec_path).read_text() if Path(spec_path).is_file() else ""
    spec = _spec_with(load_spec(spec_path), overrides)
    train, evals, truth, paths = prepare_data(spec)
    d = train.shape[1]
    n = int(round(spec.expansion * d))
    trials = check_trials(spec, d)
    uri = spec.tracking.uri
    tracking.check_tracking_uri(uri)
    os.environ.update(tracking.tracking_env())
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own progress lines instead of Tune's tables
    cluster_mode = bool(overrides.address or os.environ.get("RAY_ADDRESS"))
    started = start_ray(overrides.address or os.environ.get("RAY_ADDRESS"), worker_env())
    try:
        spec = check_resources(spec, cluster_mode=cluster_mode)
        storage = Path(spec.storage).resolve()
        if resume:
            sweep_dir = find_sweep(storage, spec.name, resume)
            state = json.loads((sweep_dir / STATE_FILE).read_text())
            sweep_id = state["sweep_id"]
        else:
            sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
            sweep_dir = storage / sweep_id
            state = {"name": spec.name, "sweep_id": sweep_id, "status": "running", "started": time.time(),
                     "tracking_uri": uri, "experiment": spec.experiment, "spec": spec_text}
        try:
            c = tracking.client(uri)
            exp_id = tracking.experiment_id(c, spec.experiment)
            parent_id = tracking.parent_run(c, exp_id, sweep_id, spec_text, spec.name)
        except MsaeError:
            raise
        except Exception as e:  # MLflow raises many types for a bad store
            raise MsaeError(f"tracking.uri {uri}: cannot use the tracking store ({str(e).splitlines()[0][:300]})") from None
        if not resume:
            _write_state(sweep_dir, state)
            from mlflow.entities import Param
            params = {"n": n, "d": d, "expansion": spec.expansion, "search": spec.search.kind,
                      "trials": len(trials) if trials else spec.search.trials, "epochs": spec.training.epochs,
                      "batch_size": spec.training.batch_size, "train_rows": train.shape[0], **paths}
            c.log_batch(parent_id, params=[Param(k, str(v)) for k, v in params.items()])
        print(f"msae sweep {sweep_id}: {len(trials) or spec.search.trials} trials, {d} -> {n}, "
              f"tracking {uri} (experiment {spec.experiment!r})", file=sys.stderr)
        results = _tune(spec, sweep_id, sweep_dir, trials, train, evals, truth, uri, exp_id, parent_id, resume, quiet)
        from msae.sweep.fronts import format_table, log_pareto
        ref = {"l0": spec.pareto.reference_l0 or float(n), "fvu": spec.pareto.reference_fvu,
               "one_minus_cosine": spec.pareto.reference_one_minus_cosine}
        fronts = log_pareto(uri, spec.experiment, sweep_id, ref)
        c.set_terminated(parent_id, status="FINISHED")
        state.update(status="finished", finished=time.time())
        _write_state(sweep_dir, state)
        summary = {"sweep_id": sweep_id, "parent_run_id": parent_id, "experiment": spec.experiment, "uri": uri,
                   "sweep_dir": str(sweep_dir), "fronts": fronts, **results}
        print(format_table(fronts))
        print(f"tracking: {uri}  experiment {spec.experiment!r}  parent run {parent_id}\n"
              f"dashboard: msae ui --tracking-uri {uri}\n"
              f"trials: {results['done']} done, {results['failed']} failed; checkpoints in {sweep_dir}")
        return summary
    finally:
        if started:
            import ray
            ray.shutdown()


def _tune(spec, sweep_id, sweep_dir, trials, train, evals, truth, uri, exp_id, parent_id, resume, quiet):
    from ray import tune

    from msae.sweep.progress import SweepProgress
    from msae.sweep.tracking import MlflowSweepCallback
    from msae.sweep.trial import run_trial

    setup = {"spec": spec.model_dump(), "sweep_dir": str(sweep_dir), "sweep_id": sweep_id,
             "primary": next(iter(evals), None), "truth": truth, "threads": max(1, int(spec.resources.cpus))}
    trainable = tune.with_resources(tune.with_parameters(run_trial, train=train, evals=evals, setup=setup),
                                    {"cpu": spec.resources.cpus, "gpu": spec.resources.gpu})
    callbacks = [MlflowSweepCallback(uri, exp_id, parent_id, sweep_id, str(sweep_dir)),
                 SweepProgress(len(trials) or spec.search.trials, quiet)]
    if resume and tune.Tuner.can_restore(str(sweep_dir)):
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=_param_space(spec, trials), tune_config=_tune_config(spec, sweep_dir, sweep_id),
                           run_config=tune.RunConfig(
                               name=sweep_dir.name, storage_path=str(sweep_dir.parent), callbacks=callbacks, verbose=0,
                               failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                               checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))
    grid = tuner.fit()
    callbacks[0].reconcile(grid)
    done = failed = 0
    for r in grid:
        if r.error is not None or (r.metrics or {}).get("diverged"):
            failed += 1
        else:
            done += 1
    return {"done": done, "failed": failed, "results": grid}


def trial_dirname(trial) -> str:
    """Trial folders named by the readable trial key (and Tune's id, unique under Optuna)."""
    from msae.sweep.space import trial_params

    return f"{trial_params(trial.config)['key']}_{trial.trial_id}"


def _param_space(spec: SweepSpec, trials: list[dict]) -> dict:
    from ray import tune
    return {"trial": tune.grid_search(trials)} if spec.search.kind == "grid" else {}


def _tune_config(spec: SweepSpec, sweep_dir: Path, sweep_id: str):
    from ray import tune

    kw: dict[str, Any] = {"max_concurrent_trials": spec.search.concurrency, "reuse_actors": True,
                          "trial_dirname_creator": trial_dirname}
    if spec.search.kind == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        from msae.sweep.space import OptunaSpace

        s = spec.search
        sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=s.seed),
                   "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=s.seed),
                   "random": lambda: optuna.samplers.RandomSampler(seed=s.seed)}[s.sampler]()
        storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / 'optuna.db'}")
        kw["search_alg"] = OptunaSearch(space=OptunaSpace(spec), metric=["fvu", "l0"], mode=["min", "min"],
                                        sampler=sampler, storage=storage, study_name=sweep_id)
        kw["num_samples"] = s.trials
    if spec.early_stopping.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler
        e = spec.early_stopping
        kw["scheduler"] = ASHAScheduler(metric="fvu", mode="min", time_attr="training_iteration",
                                        max_t=spec.training.epochs, grace_period=e.grace_period,
                                        reduction_factor=e.reduction_factor)
    return tune.TuneConfig(**kw)
