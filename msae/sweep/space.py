"""From a spec to trials: per-method grid expansion, the Optuna search space, and the configs of one trial.

A trial is a plain dict: ``method``, ``lr`` and the method's own hyperparameters (``l1``; ``k``;
``levels`` and ``weighting``), plus ``key``, a readable name that is stable across resumes.
"""
from __future__ import annotations

import itertools
from typing import Any

from msae.config import SAEConfig, TrainConfig, doubling_levels
from msae.errors import MsaeError
from msae.sweep.spec import Range, SweepSpec


def _key(p: dict[str, Any]) -> str:
    parts = [p["method"], f"lr{p['lr']:g}"]
    if "l1" in p:
        parts.append(f"l1{p['l1']:g}")
    if "k" in p:
        parts.append(f"k{p['k']}")
    if "levels_from" in p:
        parts.append(f"from{p['levels_from']}")
    elif "levels" in p:
        parts.append("levels" + "-".join(map(str, p["levels"])))
    if "weighting" in p:
        parts.append(p["weighting"])
    return "_".join(parts)


def expand_grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """All grid points, method by method; each method only varies its own hyperparameters."""
    trials = []
    for method, g in spec.methods.enabled().items():
        if method == "relu":
            combos = [{"lr": lr, "l1": l1} for lr, l1 in itertools.product(g.lr, g.l1)]
        elif method in ("topk", "batchtopk"):
            combos = [{"lr": lr, "k": k} for lr, k in itertools.product(g.lr, g.k)]
        else:
            levels = [("levels_from", v) for v in g.levels_from] if g.levels_from else [("levels", v) for v in g.levels]
            combos = [{"lr": lr, lk: lv, "weighting": w} for lr, (lk, lv), w in itertools.product(g.lr, levels, g.weighting)]
        for c in combos:
            p = {"method": method, **c}
            trials.append({**p, "key": _key(p)})
    keys = [t["key"] for t in trials]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise MsaeError(f"methods: the grid repeats the trial {dup}")
    return trials


class OptunaSpace:
    """A define-by-run search space for OptunaSearch: the method first, then its own parameters
    (log-uniform lr and lambda, integer k on a log scale, categorical lists). Picklable (sweep resume)."""

    def __init__(self, spec: SweepSpec):
        self.methods = spec.methods.enabled()

    @staticmethod
    def _pick(ot, name: str, values, kind: str):
        if isinstance(values, Range):
            if kind == "int":
                return ot.suggest_int(name, int(values.min), int(values.max), log=True)
            return ot.suggest_float(name, values.min, values.max, log=True)
        if len(values) == 1:
            return values[0]
        if kind == "levels":
            return [int(v) for v in ot.suggest_categorical(name, [",".join(map(str, v)) for v in values]).split(",")]
        return ot.suggest_categorical(name, list(values))

    def __call__(self, ot) -> dict[str, Any]:
        methods, pick = self.methods, self._pick
        method = ot.suggest_categorical("method", list(methods)) if len(methods) > 1 else next(iter(methods))
        g = methods[method]
        p: dict[str, Any] = {"method": method, "lr": pick(ot, f"{method}.lr", g.lr, "float")}
        if method == "relu":
            p["l1"] = pick(ot, "relu.l1", g.l1, "float")
        elif method in ("topk", "batchtopk"):
            p["k"] = pick(ot, f"{method}.k", g.k, "int")
        else:
            if g.levels_from is not None:
                p["levels_from"] = pick(ot, "msae.levels_from", g.levels_from, "int")
            else:
                p["levels"] = pick(ot, "msae.levels", g.levels, "levels")
            p["weighting"] = pick(ot, "msae.weighting", g.weighting, "cat")
        return {"trial": {**p, "key": _key(p)}}


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The trial dict inside a Tune config (grid: ``config['trial']``; Optuna: the returned constants)."""
    return dict(config["trial"])


def sae_config(p: dict[str, Any], d: int, expansion: float) -> SAEConfig:
    n = int(round(expansion * d))
    m = p["method"]
    if m == "relu":
        return SAEConfig("relu", d, n, l1=p["l1"])
    if m in ("topk", "batchtopk"):
        return SAEConfig(m, d, n, k=int(p["k"]))
    levels = tuple(p["levels"]) if "levels" in p else doubling_levels(int(p["levels_from"]), n)
    return SAEConfig("msae", d, n, levels=levels, weighting=p["weighting"])


def train_config(p: dict[str, Any], spec: SweepSpec, device: str) -> TrainConfig:
    t = spec.training
    return TrainConfig(lr=float(p["lr"]), epochs=t.epochs, batch_size=t.batch_size, seed=t.seed, loss=t.loss,
                       scaling=t.scaling, mean_center=t.mean_center, device=device)


def check_trials(spec: SweepSpec, d: int) -> list[dict[str, Any]]:
    """Expand the grid (or nothing, for Optuna) and build every trial's configs once, so that a bad
    combination (k > n, levels out of range) fails before any trial starts."""
    n = int(round(spec.expansion * d))
    if n < 1:
        raise MsaeError(f"expansion: {spec.expansion} x d={d} gives no latents")
    trials = expand_grid(spec) if spec.search.kind == "grid" else []
    for p in trials:
        try:
            sae_config(p, d, spec.expansion)
        except MsaeError as e:
            raise MsaeError(f"methods.{p['method']} (trial {p['key']}): {e}") from None
    for method, g in spec.methods.enabled().items():
        for field in ("k", "levels_from"):
            v = getattr(g, field, None)
            if isinstance(v, Range) and v.max > n:
                raise MsaeError(f"methods.{method}.{field}: max {v.max:g} exceeds n = {n} latents")
    return trials
