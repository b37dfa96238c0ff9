"""Building blocks of the dense oracles: every method module writes its loss a second time the
way the reference code does (a sorted top-k per level, a dense scatter, one dense decode per
level, plain autograd). The oracles check the fast paths in tests and are the baseline in bench/."""
from __future__ import annotations

import torch


def dense_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense code: ReLU of the k largest entries per row (a sorted top-k and a scatter)."""
    top = torch.topk(pre, k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

