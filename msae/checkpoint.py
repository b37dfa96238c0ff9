"""Checkpoints: a directory with ``model.safetensors`` and ``config.json``, written atomically
(temporary directory, then rename). Loading reproduces outputs bit for bit."""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from msae.config import SAEConfig
from msae.errors import MsaeError
from msae.sae import SAE, create_sae

FORMAT = "msae-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def library_versions() -> dict[str, str]:
    import msae
    return {"msae": msae.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def save(sae: SAE, path: str | os.PathLike, *, train: dict[str, Any] | None = None,
         preprocessing: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``path/`` atomically; an existing checkpoint there is replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS))
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "sae": sae.cfg.to_dict(),
                  "preprocessing": preprocessing or {}, "train": train or {}, "data": data or {},
                  "versions": library_versions(), **(extra or {})}
        _write_json(tmp / CONFIG, config)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load a checkpoint directory written by :func:`save`."""
    path = Path(path)
    cfg_file, w_file = path / CONFIG, path / WEIGHTS
    if not cfg_file.is_file() or not w_file.is_file():
        raise MsaeError(f"{path}: not an msae checkpoint (expected {CONFIG} and {WEIGHTS} inside)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MsaeError(f"{cfg_file}: unreadable JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise MsaeError(f"{cfg_file}: not an msae checkpoint config (format={config.get('format')!r})")
    sae = create_sae(SAEConfig.from_dict(config["sae"]))
    try:
        state = load_file(str(w_file))
    except Exception as e:  # safetensors raises its own error types
        raise MsaeError(f"{w_file}: unreadable safetensors file ({e})") from None
    missing = set(sae.state_dict()) - set(state)
    if missing:
        raise MsaeError(f"{w_file}: missing tensors {sorted(missing)}")
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise MsaeError(f"{w_file}: tensors do not match the config ({str(e).splitlines()[0]})") from None
    sae.checkpoint_config = config
    return sae.to(device).eval()


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / CONFIG).read_text())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, obj)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
