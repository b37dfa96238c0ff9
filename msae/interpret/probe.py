"""Linear-probe fidelity (paper Section 4.4): does a reconstruction keep what a classifier reads
from the original embedding?

A multinomial linear probe is trained on ORIGINAL embeddings (standardised inside the probe by the
training rows' mean and scale), full-batch deterministic AdamW, early-stopped on a held-out part
with the best weights kept. Fidelity of a model at a given k: on evaluation rows, the mean
KL(p(x) || p(x_hat)), the argmax agreement, and the probe's accuracy on x and on x_hat.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from msae.data import to_tensor
from msae.errors import MsaeError


@dataclass(frozen=True)
class Probe:
    """p(class | x) = softmax(((x - mean) * scale) @ weight.T + bias)."""

    weight: torch.Tensor  # [C, d]
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [d]
    scale: float
    classes: tuple[str, ...]

    @property
    def d(self) -> int:
        return self.weight.shape[1]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) * self.scale) @ self.weight.T + self.bias

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from msae.atomic import new_file
        meta = {"format": "msae-probe", "classes": json.dumps(list(self.classes)), "scale": repr(self.scale)}
        with new_file(Path(path)) as tmp:
            save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous(),
                       "mean": self.mean.contiguous()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Probe":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("weight", "bias", "mean")}
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise MsaeError(f"--probe {path}: not a probe file written by msae probe ({type(e).__name__})") from None
        if meta.get("format") != "msae-probe":
            raise MsaeError(f"--probe {path}: not a probe file written by msae probe")
        return cls(tensors["weight"], tensors["bias"], tensors["mean"], float(meta["scale"]),
                   tuple(json.loads(meta["classes"])))


def class_indices(labels: Sequence[str], classes: Sequence[str], where: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    missing = next((lab for lab in labels if lab not in index), None)
    if missing is not None:
        raise MsaeError(f"{where}: label {missing!r} is not one of the probe's {len(classes)} classes")
    return torch.tensor([index[lab] for lab in labels], dtype=torch.long)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (train, held-out) split of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(round(n * fraction)))
    if n - cut < 1:
        raise MsaeError(f"probe: {n} labelled rows are too few to hold out {fraction:.0%}")
    return np.sort(perm[cut:]), np.sort(perm[:cut])


def train_probe(x: np.ndarray, labels: Sequence[str], *, seed: int = 0, holdout: float = 0.1, lr: float = 1e-2,
                weight_decay: float = 1e-4, max_epochs: int = 500, patience: int = 20) -> tuple[Probe, dict]:
    """Train on a seeded (1 - holdout) part, early-stop on the rest; returns the probe (the best
    held-out cross-entropy's weights) and a report (epochs, held-out accuracy, held-out rows)."""
    if len(labels) != x.shape[0]:
        raise MsaeError(f"probe: {x.shape[0]} embeddings but {len(labels)} labels")
    classes = tuple(sorted(set(labels)))
    if len(classes) < 2:
        raise MsaeError(f"probe: expected at least 2 classes in the labels, found {len(classes)}")
    y = class_indices(labels, classes, "probe")
    tr, ho = split_holdout(x.shape[0], holdout, seed)
    xt = to_tensor(np.asarray(x, dtype=np.float32), "cpu")
    mean = xt[tr].mean(0)
    msq = float((xt[tr] - mean).pow(2).sum(1).mean())
    scale = math.sqrt(x.shape[1] / msq) if msq > 0 else 1.0
    z = (xt - mean) * scale
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(len(classes), x.shape[1], generator=g) * 0.01)
    b = torch.nn.Parameter(torch.zeros(len(classes)))
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=weight_decay)
    best, best_state, since, epoch = math.inf, None, 0, 0
    for epoch in range(1, max_epochs + 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(z[tr] @ W.T + b, y[tr]).backward()
        opt.step()
        with torch.no_grad():
            val = float(torch.nn.functional.cross_entropy(z[ho] @ W.T + b, y[ho]))
        if val < best - 1e-6:
            best, best_state, since = val, (W.detach().clone(), b.detach().clone()), 0
        else:
            since += 1
            if since >= patience:
                break
    probe = Probe(best_state[0], best_state[1], mean, scale, classes)
    with torch.no_grad():
        acc = float((probe.logits(xt[ho]).argmax(1) == y[ho]).float().mean())
    return probe, {"epochs": epoch, "holdout_rows": int(ho.size), "holdout_accuracy": acc,
                   "holdout_cross_entropy": best, "classes": len(classes)}


@torch.no_grad()
def probe_fidelity(sae, probe: Probe, x: np.ndarray | torch.Tensor, labels: Sequence[str] | None,
                   ks: Sequence[int | None] = (None,), batch_size: int = 4096) -> dict[str, dict]:
    """Per k ('own' for the model's code): kl, agreement, accuracy_original, accuracy_reconstructed
    (accuracies only when ``labels`` are given), rows."""
    from msae.evaluate import key_of, reconstructions

    if probe.d != sae.d:
        raise MsaeError(f"probe: trained on dimension {probe.d}, the model has d = {sae.d}")
    xt = x if isinstance(x, torch.Tensor) else to_tensor(np.asarray(x, dtype=np.float32), "cpu")
    y = None if labels is None else class_indices(labels, probe.classes, "--eval labels")
    sums = {key_of(k): {"kl": 0.0, "agree": 0, "acc_x": 0, "acc_xh": 0} for k in ks}
    sae.eval()
    device = sae.W_enc.device
    for s in range(0, xt.shape[0], batch_size):
        xb = xt[s:s + batch_size].to(device, torch.float32)
        logp = torch.log_softmax(probe.logits(xb.cpu()), 1)
        pre = sae.pre_activation(sae.preprocess(xb))
        for k, xph, _, _ in reconstructions(sae, pre, ks):
            xh = sae.postprocess(xph).cpu()
            logq = torch.log_softmax(probe.logits(xh), 1)
            acc = sums[key_of(k)]
            acc["kl"] += float((logp.exp() * (logp - logq)).sum())
            acc["agree"] += int((logp.argmax(1) == logq.argmax(1)).sum())
            if y is not None:
                yb = y[s:s + batch_size]
                acc["acc_x"] += int((logp.argmax(1) == yb).sum())
                acc["acc_xh"] += int((logq.argmax(1) == yb).sum())
    n = xt.shape[0]
    out = {}
    for key, acc in sums.items():
        res = {"kl": acc["kl"] / n, "agreement": acc["agree"] / n, "rows": n}
        if y is not None:
            res.update(accuracy_original=acc["acc_x"] / n, accuracy_reconstructed=acc["acc_xh"] / n)
        out[key] = res
    return out


@torch.no_grad()
def mean_reconstruction_kl(probe: Probe, x: np.ndarray, batch_size: int = 65536) -> float:
    """Mean KL(p(x) || p(mean)) over the rows of ``x``, with the probe's training mean: the fidelity
    of a model that reconstructs every row by the mean (the probe-KL counterpart of FVU = 1)."""
    logq = torch.log_softmax(probe.logits(probe.mean[None]), 1)
    total = 0.0
    for s in range(0, x.shape[0], batch_size):
        logp = torch.log_softmax(probe.logits(torch.from_numpy(np.array(x[s:s + batch_size], dtype=np.float32))), 1)
        total += float((logp.exp() * (logp - logq)).sum())
    return total / max(1, x.shape[0])
