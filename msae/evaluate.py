"""Evaluation of one SAE on a data set: every metric, per k (progressive recovery)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from msae.config import doubling_levels
from msae.data import as_tensor, batches
from msae.metrics import ReconStats, cknna, decoder_orthogonality
from msae.sae import SAE
from msae.sae.base import topk_relu_dense


def progressive_ks(n: int, start: int = 16) -> list[int]:
    """k = 16, 32, 64, ... up to n (n itself included): the doubling rule of MSAE levels."""
    return list(doubling_levels(min(start, n), n))


def key_of(k: int | None) -> str:
    return "own" if k is None else str(k)


@torch.no_grad()
def evaluate(sae: SAE, data: np.ndarray | torch.Tensor, ks: Sequence[int | None] = (None,),
             batch_size: int = 4096, cknna_rows: int = 1024, cknna_k: int = 10) -> dict[str, dict]:
    """Metrics keyed by k ('own' for the model's own code), computed in original CLIP space, with
    processed-space variants suffixed ``_processed``. CKNNA uses the first ``cknna_rows`` rows."""
    sae.eval()
    for k in ks:
        if k is not None:
            sae._check_k(k)
    device = sae.W_enc.device
    x_all = data if isinstance(data, torch.Tensor) else as_tensor(data, torch.device("cpu"))
    stats = {key_of(k): ReconStats(sae.n) for k in ks}
    sample: dict[str, tuple] = {}
    ortho = decoder_orthogonality(sae.W_dec)
    for xb in batches(x_all, batch_size):
        x = xb.to(device, torch.float32)
        xp = sae.preprocess(x)
        pre = sae.pre_activation(xp)
        for k in ks:
            z = sae.activate(pre) if k is None else topk_relu_dense(pre, k)
            xph = sae.decode_processed(z)
            xh = sae.postprocess(xph)
            key = key_of(k)
            stats[key].update(x, xh, xp, xph, z)
            if key not in sample:
                sample[key] = (x[:cknna_rows].cpu(), xh[:cknna_rows].cpu(), z[:cknna_rows].cpu())
    out = {}
    for key, st in stats.items():
        res = st.result()
        res["decoder_orthogonality"] = ortho
        x, xh, z = sample[key]
        if x.shape[0] >= max(4, cknna_k + 1):
            res["cknna_recon"] = cknna(x, xh, cknna_k)
            res["cknna_code"] = cknna(x, z, cknna_k)
            res["cknna_rows"] = x.shape[0]
        out[key] = res
    return out

