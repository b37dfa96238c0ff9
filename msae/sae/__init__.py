"""SAE methods, one module each, and the registry: the only list of methods.

Adding a method: write ``msae/sae/<method>.py`` (its config, SAE class, dense oracle and a
:class:`~msae.sae.method.Method` record, see docs/architecture.md) and add it to ``REGISTRY``.
"""
from __future__ import annotations

from typing import Any

import torch

from msae.config import SAEConfig
from msae.errors import MsaeError
from msae.sae import batchtopk, jumprelu, matryoshka, relu, topk
from msae.sae.base import SAE, StepOutput
from msae.sae.method import Hyper, Method

REGISTRY: dict[str, Method] = {m.name: m for m in (
    relu.METHOD, topk.METHOD, batchtopk.METHOD, matryoshka.METHOD, jumprelu.METHOD)}
METHODS = tuple(REGISTRY)


def method_of(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MsaeError(f"method: expected one of {', '.join(METHODS)}, got {name!r}") from None


def sae_config(method: str, d: int, n: int, **values: Any) -> SAEConfig:
    """A validated config of ``method`` from its hyperparameters, e.g. ``sae_config("topk", 768, 6144, k=64)``.
    Fields every SAE has (``auxk``, ``auxk_coef``) may be given too."""
    shared = {k: values.pop(k) for k in ("auxk", "auxk_coef") if k in values}
    return method_of(method).make_config(d, n, values, **shared)


def config_from_dict(raw: Any, where: str = "sae") -> SAEConfig:
    """Rebuild a config saved by ``SAEConfig.to_dict`` (checkpoints); types and sizes are checked
    before anything is allocated. Unknown keys (other methods' fields in old checkpoints) are ignored."""
    import dataclasses

    if not isinstance(raw, dict):
        raise MsaeError(f"{where}: expected an object with the SAE's settings, got {type(raw).__name__}")
    cls = method_of(raw.get("method")).config
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MsaeError(f"{where}: lacks {', '.join(missing)}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}
    try:
        return cls(**kw)
    except MsaeError as e:
        raise MsaeError(f"{where}: {e}") from None


def create_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    """Build a freshly initialised SAE of ``cfg.method`` (seeded, on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return method_of(cfg.method).sae(cfg, gen)


def dense_training_loss(sae: SAE, xp: torch.Tensor, recon_loss) -> torch.Tensor:
    """The dense oracle of ``sae``'s method (its module's ``dense_loss``)."""
    return method_of(sae.cfg.method).dense_loss(sae, xp, recon_loss)


__all__ = ["SAE", "StepOutput", "REGISTRY", "METHODS", "Method", "Hyper", "SAEConfig", "create_sae", "sae_config",
           "config_from_dict", "method_of", "dense_training_loss"]
