"""SAE architectures, one module each, and the registry that builds them from a config."""
from __future__ import annotations

import torch

from msae.config import SAEConfig
from msae.sae.base import SAE, StepOutput
from msae.sae.batchtopk import BatchTopKSAE
from msae.sae.matryoshka import MatryoshkaSAE
from msae.sae.relu import ReLUSAE
from msae.sae.topk import TopKSAE

REGISTRY: dict[str, type[SAE]] = {cls.method: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, MatryoshkaSAE)}


def create_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    """Build a freshly initialised SAE of ``cfg.method`` (seeded, on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return REGISTRY[cfg.method](cfg, gen)


__all__ = ["SAE", "StepOutput", "REGISTRY", "create_sae", "SAEConfig"]
