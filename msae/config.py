"""Frozen, validated configurations for an SAE and its training recipe."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from msae.errors import MsaeError

METHODS = ("relu", "topk", "batchtopk", "msae")
LOSSES = ("nmse", "mse")
SCALINGS = ("conventional", "reference", "none")


def doubling_levels(start: int, n: int) -> tuple[int, ...]:
    """The paper's level rule: start, 2*start, 4*start, ... while < n, then n itself."""
    if start < 1 or start > n:
        raise MsaeError(f"levels: start {start} must be between 1 and n={n}")
    levels, k = [], start
    while k < n:
        levels.append(k)
        k *= 2
    levels.append(n)
    return tuple(levels)


def weighting_alphas(weighting: str, n_levels: int) -> tuple[float, ...]:
    """UW: all ones. RW: L, L-1, ..., 1 for ascending k (the smallest k weighs most)."""
    if weighting == "uw":
        return tuple(1.0 for _ in range(n_levels))
    if weighting == "rw":
        return tuple(float(n_levels - i) for i in range(n_levels))
    raise MsaeError(f"weighting: expected 'uw' or 'rw', got {weighting!r}")


@dataclass(frozen=True)
class SAEConfig:
    """What defines an SAE's function: method, sizes and the method's own settings."""

    method: str
    d: int
    n: int
    k: int | None = None  # topk / batchtopk
    levels: tuple[int, ...] | None = None  # msae, ascending
    alphas: tuple[float, ...] | None = None  # msae, one per level
    weighting: str | None = None  # msae: 'uw', 'rw' or 'custom'
    l1: float | None = None  # relu
    auxk: int | None = None  # AuxK dead-latent loss (k_aux), None = off
    auxk_coef: float = 1.0 / 32.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MsaeError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.d < 1 or self.n < 1:
            raise MsaeError(f"sizes: d and n must be positive, got d={self.d}, n={self.n}")
        if self.method in ("topk", "batchtopk"):
            if self.k is None:
                raise MsaeError(f"k: method {self.method} needs k")
            check_k("k", self.k, self.n)
        if self.method == "relu" and self.l1 is None:
            object.__setattr__(self, "l1", 0.003)
        if self.method == "msae":
            if not self.levels:
                raise MsaeError("levels: method msae needs a list of levels")
            levels = tuple(int(k) for k in self.levels)
            for k in levels:
                check_k("levels", k, self.n)
            if any(b <= a for a, b in zip(levels, levels[1:])):
                raise MsaeError(f"levels: must be strictly ascending, got {list(levels)}")
            object.__setattr__(self, "levels", levels)
            if self.alphas is None:
                w = self.weighting or "rw"
                object.__setattr__(self, "alphas", weighting_alphas(w, len(levels)))
                object.__setattr__(self, "weighting", w)
            else:
                alphas = tuple(float(a) for a in self.alphas)
                if len(alphas) != len(levels):
                    raise MsaeError(
                        f"alphas: expected {len(levels)} weights (one per level), got {len(alphas)}"
                    )
                if any(not math.isfinite(a) or a < 0 for a in alphas) or sum(alphas) <= 0:
                    raise MsaeError(f"alphas: expected non-negative weights with a positive sum, got {list(alphas)}")
                object.__setattr__(self, "alphas", alphas)
                if self.weighting is None:
                    object.__setattr__(self, "weighting", "custom")
        if self.auxk is not None:
            check_k("auxk", self.auxk, self.n)

    @property
    def max_k(self) -> int | None:
        """The model's own sparsity at inference (largest level for MSAE)."""
        if self.method == "msae":
            return self.levels[-1]
        return self.k

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)


def check_k(name: str, k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n:
        raise MsaeError(f"{name}: expected an integer between 1 and n={n} (the number of latents), got {k!r}")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (msae-recipe.md sections 5 and 6)."""

    lr: float = 1e-4
    epochs: int = 30
    batch_size: int = 4096
    seed: int = 0
    loss: str = "nmse"
    scaling: str = "conventional"
    mean_center: bool = True
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 6.25e-10
    weight_decay: float = 0.0
    decay_start: float = 0.8  # fraction of epochs at full LR
    batchtopk_threshold_decay: float = 0.99
    dead_window: int = 1000  # steps over which training-time dead latents are counted
    auxk_dead_samples: int = 1_000_000  # AuxK: a latent is dead after this many samples unfired
    device: str = "auto"

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MsaeError(f"lr: expected a positive number, got {self.lr!r}")
        if self.epochs < 1:
            raise MsaeError(f"epochs: expected a positive integer, got {self.epochs!r}")
        if self.batch_size < 1:
            raise MsaeError(f"batch-size: expected a positive integer, got {self.batch_size!r}")
        if self.loss not in LOSSES:
            raise MsaeError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.scaling not in SCALINGS:
            raise MsaeError(f"scaling: expected one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        object.__setattr__(self, "betas", tuple(self.betas))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


DEFAULT_LR = {"relu": 5e-5, "topk": 5e-4, "batchtopk": 5e-4, "msae": 1e-4}
DEFAULT_K = {"topk": 64, "batchtopk": 32}
