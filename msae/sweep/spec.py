"""Sweep specs: YAML validated by frozen, typed models (spec reference: docs/sweeps.md).

The ``methods`` section is derived from the method registry (each method's hyperparameter schema,
msae/sae/<method>.py) and ``training`` from :class:`msae.config.TrainConfig`, so both are declared
once. A validation error is one line that names the offending key, e.g.
``sweeps/x.yaml: methods.topk.k: expected a list of integers or {min, max}``.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from msae.config import TrainConfig
from msae.errors import MsaeError
from msae.sae import REGISTRY, Hyper, Method

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
LR = Hyper("lr", "float", "learning rate", low=0.0, low_open=True)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Model):
    """A continuous (log-uniform) or integer range; Optuna search only."""
    min: PositiveFinite
    max: PositiveFinite

    @model_validator(mode="after")
    def _ordered(self):
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


def _grid_type(h: Hyper) -> Any:
    if h.kind == "float":
        return Union[list[Finite], Range]
    if h.kind == "int":
        return Union[list[int], Range]
    if h.kind == "choice":
        return list[Literal[h.choices]]  # type: ignore[valid-type]
    return list[list[int]] if h.kind == "int_list" else list[list[Finite]]


def _check_values(h: Hyper, values: Any) -> Any:
    if isinstance(values, Range):
        for bound in (values.min, values.max):
            h.check(int(bound) if h.kind == "int" else bound, h.name)
        return values
    if not values:
        raise ValueError("expected at least one value")
    for v in values:
        h.check(v, h.name)
    return values


def _grid_model(m: Method) -> type[BaseModel]:
    """The spec section of one method: ``lr`` and each sweepable hyperparameter, as a list of
    values (grid) or a {min, max} range (Optuna); an absent hyperparameter takes its default."""
    hypers = (LR,) + tuple(h for h in m.hypers if h.sweep)
    fields = {h.name: (Optional[_grid_type(h)], None) for h in hypers}
    by_name = {h.name: h for h in hypers}

    def check(cls, v, info):
        if v is None:
            return v
        try:
            return _check_values(by_name[info.field_name], v)
        except MsaeError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from None

    def groups(self):
        for group in m.one_of:
            given = [g for g in group if getattr(self, g, None) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of {' and '.join(group)}")
        for group in m.exclusive:
            if sum(getattr(self, g, None) is not None for g in group) > 1:
                raise ValueError(f"give only one of {' and '.join(group)}")
        return self

    validators = {"check": field_validator(*by_name)(check), "groups": model_validator(mode="after")(groups)}
    model = create_model(f"{m.name.capitalize()}Grid", __base__=_Model, __validators__=validators,
                         __module__=__name__, **fields)
    globals()[model.__name__] = model  # importable by name: specs pickle by reference (Ray)
    return model


GRIDS: dict[str, type[BaseModel]] = {name: _grid_model(m) for name, m in REGISTRY.items()}


def _methods_model() -> type[BaseModel]:
    def some(self):
        if not self.enabled():
            raise ValueError(f"expected at least one of {', '.join(REGISTRY)}")
        return self

    def enabled(self) -> dict[str, BaseModel]:
        return {m: g for m in REGISTRY if (g := getattr(self, m)) is not None}

    model = create_model("Methods", __base__=_Model, __validators__={"some": model_validator(mode="after")(some)},
                         __module__=__name__, **{name: (Optional[grid], None) for name, grid in GRIDS.items()})
    model.enabled = enabled
    return model


Methods = _methods_model()


class Synthetic(_Model):
    """Make synthetic CLIP-like caches (``msae synth``) in ``out`` when they are missing."""
    out: str
    n: int = Field(20000, ge=10)
    n_val: int = Field(4000, ge=10)
    d: int = Field(64, ge=2)
    roots: int = Field(32, ge=1)
    branching: list[Annotated[int, Field(ge=1)]] = [3, 2]
    active_roots: PositiveFinite = 3.0
    seed: int = Field(0, ge=0)


class Data(_Model):
    train: str | None = None
    eval: dict[str, str] = {}
    truth: str | None = None  # ground truth of synthetic data: adds recovery metrics
    synthetic: Synthetic | None = None
    # How trials reach the arrays: auto = map the cache file where the node has it (the same data,
    # checked by a sampled fingerprint), else fetch it through Ray's object store; file = always map
    # (fail where the file is missing); object_store = always fetch.
    share: Literal["auto", "file", "object_store"] = "auto"

    @model_validator(mode="after")
    def _train(self):
        if self.train is None and self.synthetic is None:
            raise ValueError("expected train (a cache path) or synthetic")
        for name in self.eval:
            if not _NAME.match(name):
                raise ValueError(f"eval name {name!r}: expected letters, digits, '_', '.', '-'")
        return self


_TRAIN_FIELDS = ("epochs", "batch_size", "seed", "loss", "scaling", "mean_center")


def _training_model() -> type[BaseModel]:
    """``training``: the TrainConfig fields a sweep sets (their types and defaults come from
    TrainConfig) and two sweep-only settings."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    fields: dict[str, Any] = {name: (hints[name], defaults[name]) for name in _TRAIN_FIELDS}
    # per-epoch evaluation uses this many rows of each evaluation cache; the final one uses all
    fields["epoch_eval_rows"] = (Optional[Annotated[int, Field(ge=1)]], 65536)
    # the final progressive-recovery curve (k = 16, 32, ..., n) of TopK-style models
    fields["progressive"] = (bool, True)

    def valid(self):
        try:
            TrainConfig(**{k: getattr(self, k) for k in _TRAIN_FIELDS})
        except MsaeError as e:
            raise ValueError(str(e)) from None
        return self

    def train_config(self, lr: float, device: str) -> TrainConfig:
        return TrainConfig(lr=lr, device=device, **{k: getattr(self, k) for k in _TRAIN_FIELDS})

    model = create_model("Training", __base__=_Model, __validators__={"valid": model_validator(mode="after")(valid)},
                         __module__=__name__, **fields)
    model.train_config = train_config
    return model


Training = _training_model()


class Resources(_Model):
    cpus: PositiveFinite = 1.0
    gpu: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0  # a fraction packs several trials per GPU

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v):
        if v > 1 and v != int(v):
            raise ValueError("expected a fraction <= 1 or a whole number of GPUs")
        return v


class Search(_Model):
    kind: Literal["grid", "optuna"] = "grid"
    trials: int | None = Field(None, ge=1)  # optuna: the trial budget
    concurrency: int | None = Field(None, ge=1)  # at most this many trials at once
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = Field(0, ge=0)


class EarlyStopping(_Model):
    kind: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1)
    reduction_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 3.0


class Tracking(_Model):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # default: the spec name
    # At the end of a sweep, wait this long for an unreachable tracking server before giving up
    # (what could not be logged stays in the sweep folder; `msae pareto` logs it later).
    wait_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 600.0


class ProbeData(_Model):
    """Linear-probe fidelity (msae probe): the probe is trained once by the driver on ``data``'s
    original embeddings; trials are measured on ``eval`` (default: the held-out part of ``data``)."""
    data: str
    eval: str | None = None
    holdout: Annotated[float, Field(gt=0, lt=1)] = 0.1
    seed: int = Field(0, ge=0)


class Evaluation(_Model):
    """Semantic metrics of every finished trial (docs/interpret.md): ``probe`` adds probe_kl and
    probe_agreement (own code and along the progressive curve); ``vocabulary`` (a text cache) adds
    named_latents; ``report`` writes the latent-card report of each method's best front model."""
    probe: ProbeData | None = None
    vocabulary: str | None = None
    report: bool = True


class Pareto(_Model):
    """Hypervolume reference point; reference_l0 defaults to n (the number of latents), and
    reference_probe_kl to the probe KL of reconstructing every row by the train mean. ``fidelity``
    is the front the table, the parent run and the best-model reports use."""
    reference_l0: PositiveFinite | None = None
    reference_fvu: PositiveFinite = 1.0
    reference_one_minus_cosine: PositiveFinite = 1.0
    reference_probe_kl: PositiveFinite | None = None
    fidelity: Literal["fvu", "one_minus_cosine", "probe_kl"] = "fvu"

    def reference(self, n: int, mean_probe_kl: float | None = None) -> dict[str, float]:
        ref = {"l0": self.reference_l0 or float(n), "fvu": self.reference_fvu,
               "one_minus_cosine": self.reference_one_minus_cosine}
        kl = self.reference_probe_kl or mean_probe_kl
        if kl:
            ref["probe_kl"] = float(kl)
        return ref


class SweepSpec(_Model):
    name: str
    data: Data
    expansion: PositiveFinite = 8.0
    methods: Methods  # type: ignore[valid-type]
    training: Training = Training()  # type: ignore[valid-type]
    resources: Resources = Resources()
    search: Search = Search()
    early_stopping: EarlyStopping = EarlyStopping()
    tracking: Tracking = Tracking()
    pareto: Pareto = Pareto()
    evaluation: Evaluation = Evaluation()
    storage: str = "msae-sweeps"  # sweep folders: state, trial states, results, Optuna study
    max_failures: int = Field(2, ge=0)  # retries of a crashed trial, from its last saved epoch

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not _NAME.match(v):
            raise ValueError("expected 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit)")
        return v

    @model_validator(mode="after")
    def _search(self):
        ranges = [f"methods.{m}.{f}" for m, g in self.methods.enabled().items()
                  for f, v in g if isinstance(v, Range)]
        if self.search.kind == "grid" and ranges:
            raise ValueError(f"{ranges[0]}: a {{min, max}} range needs search.kind: optuna; grid search takes lists")
        if self.search.kind == "optuna" and self.search.trials is None:
            raise ValueError("search.trials: optuna search needs a trial budget")
        if self.pareto.fidelity == "probe_kl" and self.evaluation.probe is None:
            raise ValueError("pareto.fidelity: probe_kl needs an evaluation.probe section")
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)
             and not (isinstance(p, str) and ("[" in p or p in ("list", "Range")))]
    return ".".join(parts)


def parse_spec(text: str, source: str = "spec") -> SweepSpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MsaeError(f"{source}: not valid YAML{where} ({getattr(e, 'problem', e)})") from e
    if not isinstance(raw, dict):
        raise MsaeError(f"{source}: expected a mapping of sweep settings at the top level")
    return spec_from_dict(raw, source)


def spec_from_dict(raw: dict, source: str = "spec") -> SweepSpec:
    """Validate a spec mapping; the first problem becomes a one-line MsaeError naming its key."""
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        # a typo'd key first; of a union's branches, not the one whose type the input does not even have
        errors = sorted(e.errors(), key=lambda x: (x["type"] != "extra_forbidden", x["type"] in ("list_type", "model_type")))
        err = errors[0]
        loc = _loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise MsaeError(f"{source}: {loc + ': ' if loc else ''}{msg}{more}") from e


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise MsaeError(f"{p}: no such sweep spec")
    return parse_spec(p.read_text(), str(p))
