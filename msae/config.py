"""Frozen, validated configurations: the fields every SAE shares, and the training recipe.

Each SAE method subclasses :class:`SAEConfig` with its own typed fields in its own module
(``msae/sae/<method>.py``); ``msae.sae.config_from_dict`` rebuilds the right subclass.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from msae.errors import MsaeError

LOSSES = ("nmse", "mse")
SCALINGS = ("conventional", "reference", "none")
# Sanity cap on the size of one weight matrix (n x d), checked before anything is allocated:
# 2^30 weights is 4 GiB of float32, far beyond the paper's largest model (768 x 24,576).
MAX_WEIGHTS = 1 << 30


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


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """An integer in [low, high], else a one-line error naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        upper = "" if high is None else f" and at most {high}"
        raise MsaeError(f"{name}: expected an integer of at least {low}{upper}, got {value!r}")
    return value


def check_number(name: str, value: Any, low: float | None = None, low_open: bool = False) -> float:
    """A finite real number above ``low`` (strictly when ``low_open``), else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MsaeError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise MsaeError(f"{name}: expected a number {bound}, got {value!r}")
    return float(value)


def check_k(name: str, k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n:
        raise MsaeError(f"{name}: expected an integer between 1 and n={n} (the number of latents), got {k!r}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class SAEConfig:
    """What defines an SAE's function, shared by every method: sizes and the optional AuxK loss.

    Subclasses add the method's own fields and checks (``validate``) and name the method
    (``method``); they are frozen and validated on construction.
    """

    method: ClassVar[str] = ""
    d: int
    n: int
    auxk: int | None = None  # AuxK dead-latent loss (k_aux), None = off
    auxk_coef: float = 1.0 / 32.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.d, int) or isinstance(self.d, bool) or not isinstance(self.n, int) \
                or isinstance(self.n, bool) or self.d < 1 or self.n < 1:
            raise MsaeError(f"sizes: d and n must be positive integers, got d={self.d!r}, n={self.n!r}")
        if self.n * self.d > MAX_WEIGHTS:
            raise MsaeError(f"sizes: n x d = {self.n} x {self.d} exceeds the sanity cap of {MAX_WEIGHTS} weights "
                            "per matrix")
        if self.auxk is not None:
            check_k("auxk", self.auxk, self.n)
        check_number("auxk_coef", self.auxk_coef, 0.0)

    @property
    def own_k(self) -> int | None:
        """The largest number of active latents of the model's own code (None: not fixed)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **{k: _plain(v) for k, v in dataclasses.asdict(self).items()}}


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (docs/method.md, "One training step"): optimiser, schedule, loss, preprocessing."""

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
    dead_window: int = 1000  # steps over which training-time dead latents are counted
    auxk_dead_samples: int = 1_000_000  # AuxK: a latent is dead after this many samples unfired
    device: str = "auto"

    def __post_init__(self) -> None:
        check_number("lr", self.lr, 0.0, low_open=True)
        check_int("epochs", self.epochs)
        check_int("batch-size", self.batch_size)
        check_int("seed", self.seed, low=0)
        if self.loss not in LOSSES:
            raise MsaeError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.scaling not in SCALINGS:
            raise MsaeError(f"scaling: expected one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        check_number("grad_clip", self.grad_clip, 0.0, low_open=True)
        check_number("decay_start", self.decay_start, 0.0)
        check_int("dead_window", self.dead_window)
        check_int("auxk_dead_samples", self.auxk_dead_samples)
        object.__setattr__(self, "betas", tuple(self.betas))

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
