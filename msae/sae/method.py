"""What a method module declares about itself, and the one place that turns it into configs.

Every SAE method lives in one module (``msae/sae/<method>.py``) that defines its frozen config
(a subclass of :class:`msae.config.SAEConfig`), its SAE class, its dense oracle and a
:class:`Method` record: its hyperparameter schema and capabilities. The sweep grid and Optuna
space (msae.sweep.spec / space), the ``msae train`` flags (msae.cli) and the trial keys are all
derived from that schema; ``msae.sae.REGISTRY`` is the only list of methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from msae.config import SAEConfig, check_int, check_number
from msae.errors import MsaeError

KINDS = ("float", "int", "choice", "int_list", "float_list")


@dataclass(frozen=True)
class Hyper:
    """One setting of a method.

    ``kind``: float, int, choice (one of ``choices``), int_list or float_list. Numbers must be
    finite and at least ``low`` (greater when ``low_open``). ``sweep``: may be swept (a list of
    values in a grid; a {min, max} range for Optuna, log scale). ``key``: the prefix of its part
    of a trial key (None: not part of the key).
    """

    name: str
    kind: str
    help: str
    low: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    sweep: bool = True
    key: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"hyperparameter {self.name}: unknown kind {self.kind!r}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def numeric(self) -> bool:
        return self.kind in ("float", "int")

    def check(self, value: Any, where: str) -> Any:
        """``value`` validated and normalised (lists become tuples); one-line error naming ``where``."""
        if self.kind == "int":
            return check_int(where, value, low=int(self.low if self.low is not None else 0))
        if self.kind == "float":
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            return check_number(where, value, self.low, self.low_open)
        if self.kind == "choice":
            if value not in self.choices:
                raise MsaeError(f"{where}: expected one of {', '.join(self.choices)}, got {value!r}")
            return value
        if not isinstance(value, (list, tuple)) or not value:
            raise MsaeError(f"{where}: expected a non-empty list, got {value!r}")
        one = Hyper(self.name, "int" if self.kind == "int_list" else "float", self.help, self.low, self.low_open)
        return tuple(one.check(v, where) for v in value)

    def key_part(self, value: Any) -> str:
        if self.kind == "float":
            return f"{self.key}{value:g}"
        if self.kind in ("int_list", "float_list"):
            return self.key + "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        return f"{self.key}{value}"


def _default_build(config: type[SAEConfig]) -> Callable[[int, int, dict[str, Any]], SAEConfig]:
    def build(d: int, n: int, values: dict[str, Any]) -> SAEConfig:
        return config(d=d, n=n, **values)
    return build


@dataclass(frozen=True)
class Method:
    """A registered SAE method.

    ``build(d, n, values)`` turns hyperparameter values (the schema's names; absent ones take the
    config's defaults) into the method's config; by default ``config(d=d, n=n, **values)``.
    ``exclusive``: groups of hyperparameters of which at most one may be given; ``one_of``: groups
    of which a sweep grid must give exactly one (a single config may omit them: the default applies).
    ``progressive``: the progressive-recovery curve (top-k restrictions of ReLU(pre)) is a
    meaningful evaluation of this method's models (TopK-style methods).
    ``examples``: named small variants (hyperparameter values) that the tests run.
    """

    name: str
    summary: str
    config: type[SAEConfig]
    sae: type
    dense_loss: Callable
    hypers: tuple[Hyper, ...]
    default_lr: float
    progressive: bool
    examples: Mapping[str, dict[str, Any]]
    exclusive: tuple[tuple[str, ...], ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()
    build: Callable[[int, int, dict[str, Any]], SAEConfig] | None = field(default=None)

    def hyper(self, name: str) -> Hyper:
        return next(h for h in self.hypers if h.name == name)

    def make_config(self, d: int, n: int, values: Mapping[str, Any] | None = None, **shared: Any) -> SAEConfig:
        """Validated config from hyperparameter values; ``shared``: fields every SAE has (auxk, ...)."""
        values = dict(values or {})
        names = {h.name for h in self.hypers}
        unknown = sorted(set(values) - names)
        if unknown:
            raise MsaeError(f"{unknown[0]}: not a setting of method {self.name} "
                            f"(its settings: {', '.join(sorted(names)) or 'none'})")
        for group in self.exclusive + self.one_of:
            given = [g for g in group if values.get(g) is not None]
            if len(given) > 1:
                raise MsaeError(f"{' and '.join(given)}: give only one of them")
        checked = {k: self.hyper(k).check(v, k) for k, v in values.items() if v is not None}
        build = self.build or _default_build(self.config)
        cfg = build(d, n, checked)
        if shared:
            import dataclasses
            cfg = dataclasses.replace(cfg, **shared)
        return cfg

    def key(self, lr: float, values: Mapping[str, Any]) -> str:
        """A readable trial key, stable across resumes: method, lr, then each keyed value in schema order."""
        parts = [self.name, f"lr{lr:g}"]
        parts += [h.key_part(values[h.name]) for h in self.hypers if h.key is not None and values.get(h.name) is not None]
        return "_".join(parts)
