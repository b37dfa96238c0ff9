"""Sweep specs: YAML validated by frozen, typed models (spec reference: docs/sweeps.md).

A validation error is one line that names the offending key, e.g.
``sweeps/x.yaml: methods.topk.k: expected a list of integers or {min, max}``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from msae.errors import MsaeError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Model):
    """A continuous (log-uniform) or integer range; Optuna search only."""
    min: float = Field(gt=0)
    max: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


FloatValues = Union[list[float], Range]
IntValues = Union[list[int], Range]


def _non_empty(v):
    if isinstance(v, list) and not v:
        raise ValueError("expected at least one value")
    return v


class ReluGrid(_Model):
    lr: FloatValues
    l1: FloatValues
    _check = field_validator("lr", "l1")(_non_empty)


class TopKGrid(_Model):
    lr: FloatValues
    k: IntValues
    _check = field_validator("lr", "k")(_non_empty)


class MsaeGrid(_Model):
    lr: FloatValues
    levels_from: IntValues | None = None  # levels double from this value up to n, then n
    levels: list[list[int]] | None = None  # explicit level lists
    weighting: list[Literal["uw", "rw"]] = ["rw"]
    _check = field_validator("lr", "levels_from", "weighting")(_non_empty)

    @model_validator(mode="after")
    def _one_levels(self):
        if (self.levels_from is None) == (self.levels is None):
            raise ValueError("give exactly one of levels_from and levels")
        return self


class Methods(_Model):
    relu: ReluGrid | None = None
    topk: TopKGrid | None = None
    batchtopk: TopKGrid | None = None
    msae: MsaeGrid | None = None

    @model_validator(mode="after")
    def _some(self):
        if not self.enabled():
            raise ValueError("expected at least one of relu, topk, batchtopk, msae")
        return self

    def enabled(self) -> dict[str, BaseModel]:
        return {m: g for m in ("relu", "topk", "batchtopk", "msae") if (g := getattr(self, m)) is not None}


class Synthetic(_Model):
    """Make synthetic CLIP-like caches (``msae synth``) in ``out`` when they are missing."""
    out: str
    n: int = Field(20000, ge=10)
    n_val: int = Field(4000, ge=10)
    d: int = Field(64, ge=2)
    roots: int = Field(32, ge=1)
    branching: list[int] = [3, 2]
    active_roots: float = Field(3.0, gt=0)
    seed: int = 0


class Data(_Model):
    train: str | None = None
    eval: dict[str, str] = {}
    truth: str | None = None  # ground truth of synthetic data: adds recovery metrics
    synthetic: Synthetic | None = None

    @model_validator(mode="after")
    def _train(self):
        if self.train is None and self.synthetic is None:
            raise ValueError("expected train (a cache path) or synthetic")
        for name in self.eval:
            if not _NAME.match(name):
                raise ValueError(f"eval name {name!r}: expected letters, digits, '_', '.', '-'")
        return self


class Training(_Model):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(4096, ge=1)
    seed: int = 0
    loss: Literal["nmse", "mse"] = "nmse"
    scaling: Literal["conventional", "reference", "none"] = "conventional"
    mean_center: bool = True
    epoch_eval_rows: int | None = Field(65536, ge=1)  # per-epoch evaluation uses this many rows; final uses all
    progressive: bool = True  # final progressive-recovery curve (k = 16, 32, ..., n) for TopK-style models


class Resources(_Model):
    cpus: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)  # a fraction packs several trials per GPU; ignored where there is none

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
    seed: int = 0


class EarlyStopping(_Model):
    kind: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class Tracking(_Model):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # default: the spec name


class Pareto(_Model):
    """Hypervolume reference point; reference_l0 defaults to n (the number of latents)."""
    reference_l0: float | None = Field(None, gt=0)
    reference_fvu: float = Field(1.0, gt=0)
    reference_one_minus_cosine: float = Field(1.0, gt=0)


class SweepSpec(_Model):
    name: str
    data: Data
    expansion: float = Field(8.0, gt=0)
    methods: Methods
    training: Training = Training()
    resources: Resources = Resources()
    search: Search = Search()
    early_stopping: EarlyStopping = EarlyStopping()
    tracking: Tracking = Tracking()
    pareto: Pareto = Pareto()
    storage: str = "msae-sweeps"  # Tune's folder for trial checkpoints and sweep state
    max_failures: int = Field(2, ge=0)  # retries of a crashed trial, from its last checkpoint

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
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("list", "Range")))]
    return ".".join(parts)


def parse_spec(text: str, source: str = "spec") -> SweepSpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MsaeError(f"{source}: not valid YAML{where} ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise MsaeError(f"{source}: expected a mapping of sweep settings at the top level")
    return spec_from_dict(raw, source)


def spec_from_dict(raw: dict, source: str = "spec") -> SweepSpec:
    """Validate a spec mapping; the first problem becomes a one-line MsaeError naming its key."""
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")  # a typo'd key first
        err = errors[0]
        loc = _loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise MsaeError(f"{source}: {loc + ': ' if loc else ''}{msg}{more}") from None


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise MsaeError(f"{p}: no such sweep spec")
    return parse_spec(p.read_text(), str(p))
