"""From a spec to trials: frozen :class:`Trial` objects, by grid expansion or from the Optuna space.

Both are derived from each method's hyperparameter schema (msae/sae/<method>.py): a method
varies only its own hyperparameters, and the trial key (a readable name, stable across resumes)
is built by the method.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from msae.config import SAEConfig, TrainConfig
from msae.errors import MsaeError
from msae.sae import REGISTRY, method_of
from msae.sweep.spec import LR, Range, SweepSpec


@dataclass(frozen=True)
class Trial:
    """One SAE to train: its key, the values it was given, and the configs built from them."""

    key: str
    method: str
    lr: float
    values: tuple[tuple[str, Any], ...]  # the method's hyperparameters as the spec gave them
    sae: SAEConfig
    train: TrainConfig

    @property
    def params(self) -> dict[str, Any]:
        """method, lr and the given hyperparameters (lists for level lists)."""
        return {"method": self.method, "lr": self.lr, **{k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in self.values}}

    @property
    def run_name(self) -> str:
        """A short readable name: the method, its own values, then the learning rate."""
        own = " ".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, tuple) else format(v, 'g') if isinstance(v, float) else v}"
                       for k, v in self.values)
        return " ".join(p for p in (self.method, own, f"lr={self.lr:g}") if p)

    def record(self) -> dict[str, Any]:
        """What the sweep folder keeps of the trial (trials/KEY.trial.json)."""
        return {"key": self.key, "method": self.method, "params": self.params, "run_name": self.run_name,
                "sae": self.sae.to_dict(), "train": self.train.to_dict()}

    def tune_config(self) -> dict[str, Any]:
        """The trial as Ray Tune carries it: plain values only (Tune swaps objects in a search space
        for object-store placeholders that only the worker resolves)."""
        return {"key": self.key, **self.params}


@dataclass(frozen=True)
class TrialFactory:
    """Builds the trials of one sweep: its sizes and training settings."""

    d: int
    n: int
    training: dict[str, Any]  # the spec's TrainConfig fields (all but lr and device)

    @classmethod
    def of(cls, spec: SweepSpec, d: int) -> "TrialFactory":
        t = spec.training.train_config(1.0, "auto").to_dict()
        return cls(d, n_latents(spec, d), {k: v for k, v in t.items() if k not in ("lr", "device")})

    def make(self, method: str, lr: float, values: dict[str, Any]) -> Trial:
        """A trial of ``method`` with learning rate ``lr`` and hyperparameter ``values`` (one-line
        error naming the trial when the combination is invalid, e.g. k > n)."""
        m = method_of(method)
        lr = float(LR.check(lr, "lr"))
        key = m.key(lr, values)
        try:
            sae = m.make_config(self.d, self.n, values)
        except MsaeError as e:
            raise MsaeError(f"methods.{method} (trial {key}): {e}") from e
        train = TrainConfig(lr=lr, **self.training)
        ordered = tuple((h.name, tuple(values[h.name]) if isinstance(values[h.name], list) else values[h.name])
                        for h in m.hypers if values.get(h.name) is not None)
        return Trial(key, method, lr, ordered, sae, train)

    def from_tune(self, config: dict[str, Any]) -> Trial:
        """The trial of a Tune config (see :meth:`Trial.tune_config`)."""
        c = dict(config["trial"])
        key, method, lr = c.pop("key"), c.pop("method"), c.pop("lr")
        trial = self.make(method, lr, c)
        if trial.key != key:
            raise MsaeError(f"trial {key}: its parameters make the key {trial.key}")
        return trial


def n_latents(spec: SweepSpec, d: int) -> int:
    n = int(round(spec.expansion * d))
    if n < 1:
        raise MsaeError(f"expansion: {spec.expansion} x d={d} gives no latents")
    return n


def expand_grid(spec: SweepSpec, d: int) -> list[Trial]:
    """All grid points, method by method; each method only varies its own hyperparameters."""
    factory = TrialFactory.of(spec, d)
    trials = []
    for method, grid in spec.methods.enabled().items():
        m = REGISTRY[method]
        given = {h.name: getattr(grid, h.name) for h in m.hypers if h.sweep and getattr(grid, h.name) is not None}
        names = list(given)
        lrs = grid.lr if grid.lr is not None else [m.default_lr]
        for lr, combo in itertools.product(lrs, itertools.product(*(given[k] for k in names))):
            trials.append(factory.make(method, lr, dict(zip(names, combo))))
    keys = [t.key for t in trials]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise MsaeError(f"methods: the grid repeats the trial {dup}")
    return trials


class OptunaSpace:
    """A define-by-run search space for OptunaSearch: the method first, then its own parameters
    (log-uniform floats, integers on a log scale, categorical lists). Returns a Tune config
    (``{"trial": Trial.tune_config()}``)."""

    def __init__(self, spec: SweepSpec, d: int):
        self.factory = TrialFactory.of(spec, d)
        self.methods = spec.methods.enabled()

    @staticmethod
    def _pick(ot, name: str, values, kind: str):
        if isinstance(values, Range):
            if kind == "int":
                return ot.suggest_int(name, int(values.min), int(values.max), log=True)
            return ot.suggest_float(name, values.min, values.max, log=True)
        if len(values) == 1:
            return values[0]
        if kind in ("int_list", "float_list"):
            return [type(values[0][0])(v) for v in
                    ot.suggest_categorical(name, [",".join(map(str, v)) for v in values]).split(",")]
        return ot.suggest_categorical(name, list(values))

    def __call__(self, ot) -> dict[str, Any]:
        methods = self.methods
        method = ot.suggest_categorical("method", list(methods)) if len(methods) > 1 else next(iter(methods))
        grid, m = methods[method], REGISTRY[method]
        lr = self._pick(ot, f"{method}.lr", grid.lr if grid.lr is not None else [m.default_lr], "float")
        values = {h.name: self._pick(ot, f"{method}.{h.name}", getattr(grid, h.name), h.kind)
                  for h in m.hypers if h.sweep and getattr(grid, h.name) is not None}
        return {"trial": self.factory.make(method, lr, values).tune_config()}


def check_ranges(spec: SweepSpec, d: int) -> None:
    """Optuna ranges of k-like integers must fit in n (checked before any trial starts)."""
    n = n_latents(spec, d)
    for method, grid in spec.methods.enabled().items():
        for h in REGISTRY[method].hypers:
            v = getattr(grid, h.name, None) if h.sweep else None
            if isinstance(v, Range) and h.kind == "int" and v.max > n:
                raise MsaeError(f"methods.{method}.{h.name}: max {v.max:g} exceeds n = {n} latents")


def plan_trials(spec: SweepSpec, d: int) -> list[Trial]:
    """The grid's trials (none for Optuna, whose trials are drawn as the sweep runs), every one
    built once so that a bad combination (k > n, levels out of range) fails before anything starts."""
    n_latents(spec, d)
    check_ranges(spec, d)
    return expand_grid(spec, d) if spec.search.kind == "grid" else []
