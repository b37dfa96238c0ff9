"""Everything a sweep needs before Ray starts: the spec, its trials, the data, the sweep folder.

Every check that can fail does so here, before anything is written: a bad spec, a missing or
mismatched cache, a bad combination (k > n), an unreachable tracking store. Data the spec asks
to make (``data.synthetic``) is made only after the trials passed, and never over someone else's
files.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msae.data import load_array
from msae.errors import MsaeError
from msae.preprocess import fit_preprocessing
from msae.arrays import first_nonfinite_row
from msae.sweep.layout import SweepDir
from msae.sweep.shared import SemanticData, SweepData, describe
from msae.sweep.space import Trial, n_latents, plan_trials
from msae.sweep.spec import SweepSpec, load_spec, spec_from_dict


@dataclass(frozen=True)
class Overrides:
    """The few settings in which a local and a cluster run of one spec differ."""
    address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    cpus: float | None = None
    gpu: float | None = None


@dataclass(frozen=True)
class Plan:
    spec: SweepSpec
    spec_text: str
    d: int
    n: int
    trials: list[Trial]  # the grid (empty for Optuna: its trials are drawn as the sweep runs)
    data: SweepData | None  # None in a dry run


def load(spec_path: str, overrides: Overrides) -> tuple[SweepSpec, str]:
    spec = load_spec(spec_path)
    text = Path(spec_path).read_text()
    raw = spec.model_dump()
    if overrides.storage:
        raw["storage"] = overrides.storage
    if overrides.tracking_uri:
        raw["tracking"]["uri"] = overrides.tracking_uri
    for name in ("cpus", "gpu"):
        if getattr(overrides, name) is not None:
            raw["resources"][name] = getattr(overrides, name)
    return spec_from_dict(raw, "command line"), text


def data_paths(spec: SweepSpec) -> tuple[str, dict[str, str], str | None]:
    """Train path, named evaluation paths and ground truth, with synthetic defaults filled in."""
    from msae.synthetic import synthetic_files

    data = spec.data
    train, evals, truth = data.train, dict(data.eval), data.truth
    if data.synthetic is not None:
        files = synthetic_files(data.synthetic.out)
        train = train or str(files["image_train"])
        evals = evals or {"image_val": str(files["image_val"]), "text_val": str(files["text_val"])}
        truth = truth or str(files["truth"])
    return train, evals, truth


def make_synthetic(spec: SweepSpec) -> None:
    """Write the spec's synthetic data when it is missing, into a new or empty folder, or one that
    holds nothing but msae synth's own files (never over anything else)."""
    from msae.synthetic import synthetic_files, write_synthetic

    s = spec.data.synthetic
    if s is None:
        return
    out = Path(s.out)
    files = synthetic_files(out)
    if all(p.is_file() for p in files.values()):
        return
    ours = {p.name for p in files.values()}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if others:
        raise MsaeError(f"data.synthetic.out {out}: holds other files ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); expected a new or empty folder for the synthetic data")
    print(f"msae sweep: making synthetic CLIP-like data in {out}", file=sys.stderr)
    write_synthetic(out, s.n, s.n_val, overwrite=True, d=s.d, roots=s.roots, branching=tuple(s.branching),
                    active_roots=s.active_roots, seed=s.seed)


def dimension(spec: SweepSpec) -> int:
    """The embedding dimension, without making or scanning any data."""
    if spec.data.synthetic is not None and not spec.data.train:
        return spec.data.synthetic.d
    train, _, _ = data_paths(spec)
    return load_array(train, check_finite=False).shape[1]


def open_data(spec: SweepSpec) -> SweepData:
    """Open every array (memory-mapped), check it, and compute the train set's preprocessing
    statistics once for all trials (the same pass proves the train set finite)."""
    from msae.synthetic import GroundTruth

    train_path, eval_paths, truth_path = data_paths(spec)
    train = load_array(train_path, check_finite=False, min_rows=2)
    d = train.shape[1]
    t = spec.training
    pp = fit_preprocessing(train, t.scaling, t.mean_center, where=str(train_path))
    evals = {}
    for name, path in eval_paths.items():
        try:
            arr = load_array(path, expect_dim=d, check_finite=False)
            bad = first_nonfinite_row(arr)
            if bad is not None:
                raise MsaeError(f"{path}: row {bad} contains NaN or Inf; expected finite embeddings")
        except MsaeError as e:
            raise MsaeError(f"data.eval.{name}: {e}") from e
        evals[name] = describe(f"eval/{name}", path, arr)
    if not evals:
        print("msae sweep: no evaluation caches given; trials are evaluated on the train cache", file=sys.stderr)
        evals = {"train": describe("train", train_path, train)}
    truth = None
    if truth_path:
        truth = GroundTruth.load(truth_path)
        if truth.dictionary.shape[1] != d:
            raise MsaeError(f"data.truth {truth_path}: dimension {truth.dictionary.shape[1]}, the train cache has {d}")
    return SweepData(describe("train", train_path, train), evals, pp, truth, spec.data.share,
                     open_semantic(spec, d))


def open_semantic(spec: SweepSpec, d: int) -> SemanticData | None:
    """The ``evaluation`` section: the probe trained once (seeded, deterministic), its evaluation
    rows and the mean-reconstruction KL; the vocabulary. None without the section."""
    from msae.cache import open_input_cache

    ev = spec.evaluation
    if ev.probe is None and ev.vocabulary is None:
        return None
    probe = probe_eval = rows = labels = mean_kl = vocab = words = None
    if ev.probe is not None:
        import numpy as np
        from msae.interpret.probe import mean_reconstruction_kl, split_holdout, train_probe

        pd = ev.probe
        data = open_input_cache(pd.data, "evaluation.probe.data", d, labelled=True)
        probe, _ = train_probe(data.embeddings, data.labels, seed=pd.seed, holdout=pd.holdout)
        if pd.eval:
            ev_cache = open_input_cache(pd.eval, "evaluation.probe.eval", d, labelled=True)
            probe_eval, labels = describe("probe/eval", pd.eval, ev_cache.embeddings), tuple(ev_cache.labels)
            x_eval = ev_cache.embeddings
        else:
            _, rows = split_holdout(data.embeddings.shape[0], pd.holdout, pd.seed)
            probe_eval, labels = describe("probe/eval", pd.data, data.embeddings), tuple(data.labels[i] for i in rows)
            x_eval = np.asarray(data.embeddings)[rows]
        mean_kl = mean_reconstruction_kl(probe, x_eval)
    if ev.vocabulary is not None:
        vc = open_input_cache(ev.vocabulary, "evaluation.vocabulary", d)
        vocab, words = describe("vocab", ev.vocabulary, vc.embeddings), tuple(vc.texts or vc.ids)
    return SemanticData(probe, probe_eval, rows, labels, mean_kl, vocab, words)


def check_resources(spec: SweepSpec, cluster: bool) -> SweepSpec:
    """A trial may not ask for more CPUs or GPUs than this machine has (a cluster may gain nodes
    later: not checked there). Without any GPU here, trials run on the CPU."""
    from ray._private.utils import get_num_cpus

    r = spec.resources
    if cluster:
        return spec
    cpus = get_num_cpus()
    if r.cpus > cpus:
        raise MsaeError(f"resources.cpus: a trial asks for {r.cpus:g} CPUs, this machine has {cpus:g}")
    if r.gpu > 0:
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            print("msae sweep: no GPU here; trials run on the CPU", file=sys.stderr)
            return spec.model_copy(update={"resources": r.model_copy(update={"gpu": 0.0})})
        if r.gpu > gpus:
            raise MsaeError(f"resources.gpu: a trial asks for {r.gpu:g} GPUs, this machine has {gpus}")
    return spec


def prepare(spec_path: str, overrides: Overrides, dry_run: bool = False, cluster: bool = False) -> Plan:
    """Spec, trials and data, checked; the tracking store and resources checked too (except in a
    dry run)."""
    from msae.sweep.tracking import check_tracking_uri

    spec, text = load(spec_path, overrides)
    d = dimension(spec)
    trials = plan_trials(spec, d)
    if dry_run:
        return Plan(spec, text, d, n_latents(spec, d), trials, None)
    check_tracking_uri(spec.tracking.uri)
    spec = check_resources(spec, cluster)
    make_synthetic(spec)
    data = open_data(spec)
    return Plan(spec, text, d, n_latents(spec, d), trials, data)


def sweep_folder(plan: Plan, resume: str | bool) -> SweepDir:
    """The folder of the sweep to resume, or a new one."""
    spec = plan.spec
    if resume:
        sweep = SweepDir.find(spec.storage, spec.name, resume if isinstance(resume, str) else None)
        state = sweep.state()
        if state.get("name") != spec.name:
            raise MsaeError(f"--resume {sweep.sweep_id}: a sweep of spec {state.get('name')!r}, not {spec.name!r}")
        return sweep
    state: dict[str, Any] = {"tracking_uri": spec.tracking.uri, "experiment": spec.experiment, "spec": plan.spec_text,
                             "trials_planned": len(plan.trials) or spec.search.trials, "d": plan.d, "n": plan.n,
                             "caches": list(plan.data.evals) if plan.data else [],
                             "probe_mean_kl": plan.data.semantic.probe_mean_kl if plan.data and plan.data.semantic else None}
    sweep = SweepDir.create(spec.storage, spec.name, state)
    if plan.data and plan.data.semantic and plan.data.semantic.probe is not None:
        plan.data.semantic.probe.save(sweep.probe_file)
    return sweep
