"""Concept-based similarity search and concept steering (paper Section 5).

* :func:`top_rows`: the rows of a cache that activate one latent most (the model's own code);
* :func:`steer`: a query embedding's code plus ``scale`` units of one latent, decoded back to CLIP
  space, and the rows nearest to that steered embedding by cosine.
"""
from __future__ import annotations

import numpy as np
import torch

from msae.data import to_tensor
from msae.errors import MsaeError


def _batches(x: np.ndarray, size: int = 4096):
    for s in range(0, x.shape[0], size):
        yield s, to_tensor(np.asarray(x[s:s + size], dtype=np.float32), "cpu")


def check_latent(sae, latent: int) -> int:
    if not 0 <= latent < sae.n:
        raise MsaeError(f"--latent: {latent} is out of range; expected 0..{sae.n - 1}")
    return latent


@torch.no_grad()
def latent_activations(sae, data: np.ndarray, latent: int) -> np.ndarray:
    """Latent ``latent``'s activation on every row (the model's own code)."""
    check_latent(sae, latent)
    out = np.empty(data.shape[0], dtype=np.float32)
    for s, xb in _batches(data):
        out[s:s + xb.shape[0]] = sae.encode(xb)[:, latent].cpu().numpy()
    return out


def top_rows(sae, data: np.ndarray, latent: int, top: int = 10) -> list[tuple[int, float]]:
    """(row, activation) of the ``top`` rows where the latent fires most, strongest first."""
    act = latent_activations(sae, data, latent)
    order = np.argsort(-act, kind="stable")[:top]
    return [(int(i), float(act[i])) for i in order if act[i] > 0]


@torch.no_grad()
def steer(sae, data: np.ndarray, query: int, latent: int, scale: float, top: int = 10) -> list[tuple[int, float]]:
    """(row, cosine) of the rows nearest to the query row's embedding steered along ``latent``:
    decode(encode(x_q) + scale * e_latent), where ``scale`` is in units of the latent's largest
    activation on ``data`` (1.0: as strongly as the latent ever fires there)."""
    check_latent(sae, latent)
    peak = float(latent_activations(sae, data, latent).max())
    if peak <= 0:
        raise MsaeError(f"--add: latent {latent} never fires on --data; it cannot be used for steering")
    z = sae.encode(to_tensor(np.asarray(data[query:query + 1], dtype=np.float32), "cpu"))
    z[0, latent] += scale * peak
    target = torch.nn.functional.normalize(sae.decode(z).cpu(), dim=1)[0]
    cos = np.empty(data.shape[0], dtype=np.float32)
    for s, xb in _batches(data):
        cos[s:s + xb.shape[0]] = (torch.nn.functional.normalize(xb, dim=1) @ target).numpy()
    order = np.argsort(-cos, kind="stable")[:top]
    return [(int(i), float(cos[i])) for i in order]
