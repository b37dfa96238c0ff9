"""Importer for the reference code's (github WolodjaZ/MSAE) ``.pth`` checkpoints.

The file is a torch-pickled dict (recipe section 11). It is read with
``torch.load(weights_only=True)``, allowing only the numpy scalar types it needs; its
configuration is rebuilt from the file name
``{n}_{d}_{activation}[_{k}][_RW|_UW]_{tied}_{normalize}_{softcap}_{train-file}.pth``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from msae.config import SAEConfig, doubling_levels
from msae.errors import MsaeError
from msae.sae import SAE, create_sae, sae_config

_NAME = re.compile(
    r"^(?P<n>\d+)_(?P<d>\d+)_(?P<act>[A-Za-z]+)(?:_(?P<k>\d+))?(?:_(?P<w>RW|UW))?"
    r"_(?P<tied>True|False)_(?P<norm>True|False)_(?P<softcap>[0-9.]+)(?:_(?P<train>.*))?\.pth$")

_ACTIVATIONS = {"relu": "relu", "topk": "topk", "topkrelu": "topk", "batchtopk": "batchtopk",
                "batchtopkrelu": "batchtopk"}


@dataclass(frozen=True)
class ReferenceName:
    n: int
    d: int
    activation: str
    k: int | None
    weighting: str | None
    tied: bool
    normalize: bool
    softcap: float
    train_file: str | None

    @property
    def config(self) -> SAEConfig:
        method = _ACTIVATIONS.get(self.activation.lower())
        if method is None:
            raise MsaeError(f"activation {self.activation!r} in the file name is not one of "
                            "ReLU, TopKReLU, TopK, BatchTopKReLU")
        if self.weighting is not None:  # a Matryoshka model: levels double from k up to n
            if method != "topk" or self.k is None:
                raise MsaeError("file name: RW/UW weighting needs a TopK activation with a first level k")
            return sae_config("msae", self.d, self.n, levels=doubling_levels(self.k, self.n),
                              weighting=self.weighting.lower())
        if method == "relu":
            return sae_config("relu", self.d, self.n)
        if self.k is None:
            raise MsaeError(f"file name: activation {self.activation} needs k")
        return sae_config(method, self.d, self.n, k=self.k)


def parse_name(name: str) -> ReferenceName:
    m = _NAME.match(name)
    if not m:
        raise MsaeError(f"{name}: file name does not follow the reference pattern "
                        "{n}_{d}_{activation}[_{k}][_RW|_UW]_{tied}_{normalize}_{softcap}_{train}.pth")
    g = m.groupdict()
    return ReferenceName(int(g["n"]), int(g["d"]), g["act"], int(g["k"]) if g["k"] else None, g["w"],
                         g["tied"] == "True", g["norm"] == "True", float(g["softcap"]), g["train"])


def _safe_globals() -> list:
    """The only non-tensor types a reference checkpoint holds: numpy float64 scalars."""
    allowed = [np.dtype, type(np.dtype(np.float64)), np.float64]
    core = getattr(np, "_core", None) or np.core
    allowed.append(core.multiarray.scalar)
    return allowed


def read_reference(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MsaeError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a bad, truncated or malicious file
        raise MsaeError(f"{path}: not a loadable reference checkpoint "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise MsaeError(f"{path}: expected a dict with a 'model' state dict (reference format)")
    return obj


def _scale(path: Path, value) -> float:
    """The reference's scaling_factor: a positive finite number (a float or a 0-d tensor/array)."""
    import math
    try:
        v = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError) as e:
        raise MsaeError(f"{path}: scaling_factor should be a positive number, got {type(value).__name__}") from e
    if isinstance(value, (str, bytes)) or not math.isfinite(v) or v <= 0:
        raise MsaeError(f"{path}: scaling_factor should be a positive finite number, got {value!r}")
    return v


def _target_norm(value) -> float | None:
    """Recorded for provenance only: a number, or None when absent or unreadable."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def import_reference(path: str | Path) -> tuple[SAE, dict]:
    """Build an msae SAE from a reference checkpoint; returns the model and provenance info."""
    path = Path(path)
    ref = parse_name(path.name)
    if ref.softcap != 0.0:
        raise MsaeError(f"{path.name}: latent soft cap {ref.softcap} is not supported (every paper model uses 0.0)")
    if ref.tied:
        raise MsaeError(f"{path.name}: tied encoder/decoder models are not supported")
    cfg = ref.config
    obj = read_reference(path)
    sd = obj["model"]
    need = {"pre_bias": (cfg.d,), "encoder": (cfg.d, cfg.n), "latent_bias": (cfg.n,), "decoder": (cfg.n, cfg.d)}
    for key, shape in need.items():
        t = sd.get(key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise MsaeError(f"{path}: model.{key} should be a tensor of shape {list(shape)}, got {got}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise MsaeError(f"{path}: model.{key} should hold finite floating-point values")
    mean = obj.get("mean_center")
    if mean is not None:
        if not isinstance(mean, torch.Tensor) or mean.numel() != cfg.d or not bool(torch.isfinite(mean.float()).all()):
            got = list(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
            raise MsaeError(f"{path}: mean_center should be a finite tensor of {cfg.d} values, got {got}")
    scale = _scale(path, obj.get("scaling_factor", 1.0))
    sae = create_sae(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(sd["pre_bias"])
        sae.W_enc.copy_(sd["encoder"])
        sae.b_enc.copy_(sd["latent_bias"])
        sae.W_dec.copy_(sd["decoder"])
        mean = torch.zeros(cfg.d) if mean is None else mean.to(torch.float32).reshape(cfg.d)
        sae.set_preprocessing(mean, scale)
    info = {"source": str(path.name), "reference_name": ref.__dict__,
            "target_norm": _target_norm(obj.get("target_norm"))}
    return sae, info
