"""Concept naming (paper Section 5): each latent gets the vocabulary entries whose text embeddings
point most like its decoder direction.

Two mappings, named plainly:

* ``centred`` (default): cosine between the decoder row W_dec[j] (a direction in CLIP space) and
  the vocabulary embeddings minus the vocabulary's mean (which removes the shared text offset);
* ``reference``: the reference code's sae_naming, cosine between W_dec[j] / s + mean (the point a
  unit code of latent j decodes to, with the training data's scale s and mean) and the raw
  vocabulary embeddings. CLIP's modality gap puts every image-side point at a similar angle to
  every text embedding, so its scores are high and flat.

A latent is ``named`` when its best score exceeds a threshold calibrated on a null: the 99th
percentile of the best score that random unit directions (1,000, seeded) reach against the same
vocabulary under the same mapping, so a random dictionary names about 1% of its latents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from msae.data import to_tensor
from msae.errors import MsaeError

MAPPINGS = ("centred", "reference")
NULL_DIRECTIONS, NULL_QUANTILE = 1000, 0.99


@dataclass(frozen=True)
class Naming:
    names: list[list[str]]  # per latent, its top names, best first
    scores: np.ndarray  # [n, top] cosine scores, best first
    threshold: float
    frequency: np.ndarray | None  # [n] firing frequency on --data, when given

    @property
    def named(self) -> np.ndarray:
        return self.scores[:, 0] > self.threshold


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _latent_points(sae, mapping: str, W: torch.Tensor | None = None) -> torch.Tensor:
    """The vectors compared with the vocabulary, one per row of W (default: the decoder)."""
    W = sae.W_dec.detach().cpu().double() if W is None else W.double()
    if mapping == "centred":
        return W
    return W / float(sae.scale) + sae.mean.detach().cpu().double()


def _vocab_side(vocab: np.ndarray, mapping: str) -> torch.Tensor:
    v = torch.from_numpy(np.asarray(vocab, dtype=np.float64))
    return v - v.mean(0) if mapping == "centred" else v


def name_latents(sae, vocab: np.ndarray, vocab_names: Sequence[str], *, top: int = 5, mapping: str = "centred",
                 threshold: float | None = None, data: np.ndarray | None = None, seed: int = 0) -> Naming:
    """Name every latent of ``sae`` from a vocabulary of text embeddings [V, d] and their names."""
    if mapping not in MAPPINGS:
        raise MsaeError(f"--mapping: expected one of {', '.join(MAPPINGS)}, got {mapping!r}")
    if vocab.ndim != 2 or vocab.shape[1] != sae.d:
        raise MsaeError(f"--vocab: embeddings of dimension {vocab.shape[-1]}; the model has d = {sae.d}")
    if len(vocab_names) != vocab.shape[0]:
        raise MsaeError(f"--vocab: {vocab.shape[0]} embeddings but {len(vocab_names)} names")
    top = max(1, min(top, vocab.shape[0]))
    V = _unit(_vocab_side(vocab, mapping))
    P = _unit(_latent_points(sae, mapping))
    scores, idx = torch.empty(P.shape[0], top, dtype=torch.float64), torch.empty(P.shape[0], top, dtype=torch.long)
    for s in range(0, P.shape[0], 4096):
        sc, ix = (P[s:s + 4096] @ V.T).topk(top, dim=1)
        scores[s:s + 4096], idx[s:s + 4096] = sc, ix
    if threshold is None:
        g = torch.Generator().manual_seed(seed)
        null = torch.randn(NULL_DIRECTIONS, sae.d, generator=g, dtype=torch.float64)
        null *= sae.W_dec.detach().cpu().double().norm(dim=1).mean()
        best = (_unit(_latent_points(sae, mapping, null)) @ V.T).max(1).values
        threshold = float(torch.quantile(best, NULL_QUANTILE))
    frequency = None
    if data is not None:
        frequency = firing_frequency(sae, data)
    names = [[vocab_names[i] for i in row] for row in idx.tolist()]
    return Naming(names, scores.numpy(), threshold, frequency)


@torch.no_grad()
def firing_frequency(sae, data: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Fraction of rows on which each latent of the model's own code is non-zero."""
    counts = torch.zeros(sae.n, dtype=torch.float64)
    xt = to_tensor(np.asarray(data, dtype=np.float32), "cpu") if not isinstance(data, torch.Tensor) else data
    for s in range(0, xt.shape[0], batch_size):
        counts += (sae.encode(xt[s:s + batch_size]) > 0).sum(0).cpu().double()
    return (counts / max(1, xt.shape[0])).numpy()
