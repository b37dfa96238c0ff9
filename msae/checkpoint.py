"""Checkpoints: a directory with ``model.safetensors`` and ``config.json``.

A new checkpoint is built under a temporary name and renamed into place. Writing into a folder
that already holds files needs ``overwrite`` and then replaces only msae's own files there
(``config.json`` is removed first and written last, so an interrupted overwrite leaves a folder
that refuses to load, never a model paired with another model's config). Loading checks the
config's types and sizes and the tensors' shapes before allocating the model, and refuses
non-finite weights. Outputs of a loaded model equal the saved model's bit for bit.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from msae import atomic
from msae.errors import MsaeError
from msae.sae import SAE, config_from_dict, create_sae

FORMAT = "msae-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def library_versions() -> dict[str, str]:
    from msae.version import __version__
    return {"msae": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def save(sae: SAE, path: str | os.PathLike, *, train: dict[str, Any] | None = None,
         preprocessing: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
         extra: dict[str, Any] | None = None, files: dict[str, Any] | None = None,
         overwrite: bool = False) -> Path:
    """Write the checkpoint ``path/``; ``files``: more JSON files to put beside it (e.g. metrics.json)."""
    path = atomic.check_output_folder(path, "checkpoint", overwrite)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "sae": sae.cfg.to_dict(),
              "preprocessing": preprocessing or {}, "train": train or {}, "data": data or {},
              "versions": library_versions(), **(extra or {})}
    if not path.is_dir() or not any(path.iterdir()):
        with atomic.new_dir(path) as tmp:
            save_file(tensors, str(tmp / WEIGHTS))
            for name, obj in (files or {}).items():
                atomic.write_json(tmp / name, obj)
            atomic.write_json(tmp / CONFIG, config)
        return path
    (path / CONFIG).unlink(missing_ok=True)
    with atomic.new_file(path / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    for name, obj in (files or {}).items():
        atomic.write_json(path / name, obj)
    atomic.write_json(path / CONFIG, config)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``config.json`` of checkpoint ``path`` (a one-line error when it is not one)."""
    path = Path(path)
    cfg_file, w_file = path / CONFIG, path / WEIGHTS
    if not cfg_file.is_file() or not w_file.is_file():
        raise MsaeError(f"{path}: not an msae checkpoint (expected {CONFIG} and {WEIGHTS} inside)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MsaeError(f"{cfg_file}: unreadable JSON ({e})") from e
    if not isinstance(config, dict):
        raise MsaeError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise MsaeError(f"{cfg_file}: not an msae checkpoint config (format={config.get('format')!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise MsaeError(f"{cfg_file}: format_version {version!r}; this msae reads versions up to {FORMAT_VERSION}")
    if "sae" not in config:
        raise MsaeError(f"{cfg_file}: lacks the 'sae' settings")
    return config


def _tensor_shapes(w_file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(w_file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise MsaeError(f"{w_file}: unreadable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load a checkpoint directory written by :func:`save`."""
    path = Path(path)
    config = read_config(path)
    cfg = config_from_dict(config["sae"], f"{path / CONFIG}: sae")
    w_file = path / WEIGHTS
    shapes = _tensor_shapes(w_file)
    expected = {"W_enc": (cfg.d, cfg.n), "W_dec": (cfg.n, cfg.d), "b_enc": (cfg.n,), "b_dec": (cfg.d,)}
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise MsaeError(f"{w_file}: tensor {name} has shape {list(shapes[name]) if name in shapes else 'none'}; "
                            f"the config (d={cfg.d}, n={cfg.n}) needs {list(shape)}")
    sae = create_sae(cfg)
    try:
        state = load_file(str(w_file))
    except Exception as e:  # safetensors raises its own error types
        raise MsaeError(f"{w_file}: unreadable safetensors file ({e})") from e
    missing = set(sae.state_dict()) - set(state)
    if missing:
        raise MsaeError(f"{w_file}: missing tensors {sorted(missing)}")
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise MsaeError(f"{w_file}: tensors do not match the config ({str(e).splitlines()[0]})") from e
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MsaeError(f"{w_file}: tensor {name} holds NaN or Inf; expected finite weights")
    sae.checkpoint_config = config
    return sae.to(device).eval()
