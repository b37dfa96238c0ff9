"""One Ray Tune trial: train one SAE on the shared cache arrays, report every epoch with a checkpoint.

The arrays arrive through ``tune.with_parameters`` (the object store): read-only, zero-copy views.

State on the sweep's storage path (reached by every node):
- ``trials/KEY/``: the trial's latest training state (SAE, optimiser, epoch), replaced atomically
  after every epoch. A trial that starts again (retry, sweep resume) continues from it.
- ``trials/KEY.history.jsonl``: every result the trial reported (for the driver's MLflow logging).
- ``results/KEY.json`` and ``results/KEY.sae/``: the final result and the final SAE checkpoint. A
  trial that finds them reports the result again and trains nothing.
The Tune checkpoint of every epoch records only the epoch; Tune keeps them all (they are tiny), so a
restored experiment never points at a deleted checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msae import checkpoint
from msae.evaluate import evaluate, progressive_ks
from msae.sae import create_sae
from msae.sweep.space import sae_config, trial_params, train_config
from msae.sweep.spec import SweepSpec
from msae.train import DivergedError, Trainer, fit

TRAINER_STATE = "trainer.pt"
SAE_DIR = "sae"
HEADLINE = ("fvu", "fvu_dataset", "cosine", "l0", "zero_fraction", "dead_fraction", "nmse")
CRASH_ENV = "MSAE_INJECT_CRASH"  # "KEY@EPOCH:MARKER_DIR": trial KEY crashes once after reporting EPOCH (fault injection)


def _rss_anon() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))
    except (OSError, StopIteration):
        return 0


def _mapping_of(arr: np.ndarray) -> str:
    """The /proc/self/maps entry holding the array's memory: a shared object-store or file mapping
    means no private copy."""
    addr = arr.__array_interface__["data"][0]
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if lo <= addr < hi:
                    fields = line.split()
                    return f"{fields[1]} {fields[5] if len(fields) > 5 else '[anon]'}"
    except OSError:
        pass
    return "unknown"


def _plain(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def _device() -> str:
    """CUDA when this trial was given a GPU, else the CPU."""
    import ray
    return "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"


def _final_metrics(sae, evals: dict[str, np.ndarray], primary: str | None, spec: SweepSpec,
                   truth: dict | None) -> tuple[dict[str, float], list[dict[str, float]]]:
    out: dict[str, float] = {}
    curve: list[dict[str, float]] = []
    for name, arr in evals.items():
        ks: list[int | None] = [None]
        if name == primary and spec.training.progressive and sae.cfg.method != "relu":
            ks += progressive_ks(sae.n)
        res = evaluate(sae, arr, ks, batch_size=spec.training.batch_size)
        out.update(_plain(f"{name}/", res["own"]))
        if name == primary:
            out.update(_plain("", {k: res["own"][k] for k in HEADLINE if k in res["own"]}))
            curve = [{"k": int(key), **{m: float(r[m]) for m in ("l0", "fvu", "cosine")}}
                     for key, r in res.items() if key != "own"]
    if truth is not None:
        from msae.synthetic import GroundTruth, recovery_score
        gt = GroundTruth(truth["dictionary"], truth["level"], truth["parent"])
        out.update(recovery_score(sae.W_dec.detach().cpu().numpy(), gt))
    return out, curve


def run_trial(config: dict[str, Any], *, train: np.ndarray, evals: dict[str, np.ndarray], setup: dict[str, Any]) -> None:
    """The Tune function trainable. ``setup``: spec (dict), sweep_dir, primary eval name, truth arrays."""
    from ray import tune

    anon0 = _rss_anon()
    spec = SweepSpec.model_validate(setup["spec"])
    p = trial_params(config)
    key = p["key"]
    done = Path(setup["sweep_dir"]) / "results" / f"{key}.json"
    if done.is_file():  # finished before a resume: report the stored result, train nothing
        tune.report(json.loads(done.read_text()))
        return
    torch.set_num_threads(max(1, int(setup.get("threads", 1))))
    # zero-copy check: touch every value; a private copy would show up as anonymous memory
    checksum = float(train.sum(dtype=np.float64))
    memory = {"data_touch_private_mb": (_rss_anon() - anon0) / 2**20, "data_mb": train.nbytes / 2**20,
              "data_checksum": checksum, "data_mapping": _mapping_of(train)}
    device = _device()
    scfg, tcfg = sae_config(p, train.shape[1], spec.expansion), train_config(p, spec, device)
    sae = create_sae(scfg, tcfg.seed)
    trainer = None
    state_dir = Path(setup["sweep_dir"]) / "trials" / key
    saved = _latest_state(state_dir)
    if saved is not None:
        sae = checkpoint.load(saved / SAE_DIR, device=torch.device(device))
        trainer = Trainer(sae, tcfg)
        trainer.load_state_dict(torch.load(saved / TRAINER_STATE, weights_only=True, map_location=device))
    rows = spec.training.epoch_eval_rows
    epoch_evals = {name: arr[:rows] if rows else arr for name, arr in evals.items()}
    primary = setup.get("primary")
    crash = os.environ.get(CRASH_ENV)
    steady: dict[str, int] = {}

    def on_epoch(rec, tr) -> None:
        metrics = rec.flat()
        if primary is not None:
            metrics.update(_plain("", {k: rec.eval[primary][k] for k in HEADLINE if k in rec.eval[primary]}))
        metrics.update(memory, node_id=_node_id(), resumed=int(saved is not None), private_mb=_rss_anon() / 2**20)
        steady.setdefault("anon", _rss_anon())  # steady state starts after the first epoch (buffers, optimiser)
        final = rec.epoch == tcfg.epochs
        curve: list = []
        if final:
            fm, curve = _final_metrics(sae, evals, primary, spec, setup.get("truth"))
            metrics.update(fm)
            metrics.update(final=1, curve=json.dumps(curve),
                           private_growth_mb=(_rss_anon() - steady["anon"]) / 2**20)
        sae_info = {"train": tcfg.to_dict(), "data": {"sweep": setup["sweep_id"], "trial": key, "rows": int(train.shape[0])},
                    "preprocessing": {"scaling": tcfg.scaling, "mean_center": tcfg.mean_center, "scale": float(sae.scale)}}
        if final:
            final_sae = final_sae_dir(setup["sweep_dir"], key)
            checkpoint.save(sae, final_sae, **sae_info)
            checkpoint.write_json(final_sae / "metrics.json", {"final": metrics, "curve": curve})
            _write_done(done, metrics)
        _append_history(history_file(setup["sweep_dir"], key), metrics)
        with tempfile.TemporaryDirectory(prefix="msae-ckpt-") as tmp:
            (Path(tmp) / "epoch.json").write_text(json.dumps({"trial": key, "epoch": rec.epoch}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        # saved after the report: a trial stopped in between repeats this epoch (logged once), never skips it
        if not final:
            _save_state(state_dir, sae, tr, rec.epoch, sae_info)
        if final:
            shutil.rmtree(state_dir, ignore_errors=True)  # the final SAE lives in the last Tune checkpoint
        if crash:
            target, rest = crash.split("@", 1)
            at, marker_dir = rest.split(":", 1)
            marker = Path(marker_dir) / key
            if key == target and rec.epoch == int(at) and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(time.time()))
                raise RuntimeError(f"injected crash after epoch {at} ({CRASH_ENV})")

    try:
        fit(sae, train, tcfg, epoch_evals, on_epoch=on_epoch, progress=False, trainer=trainer,
            fit_stats=trainer is None)
    except DivergedError as e:
        result = {"diverged": 1, "failure": f"diverged: {e}", "final": 1, "node_id": _node_id()}
        _write_done(done, result)
        tune.report(result)


def final_sae_dir(sweep_dir: str | Path, key: str) -> Path:
    return Path(sweep_dir) / "results" / f"{key}.sae"


def history_file(sweep_dir: str | Path, key: str) -> Path:
    """Every result a trial reported, one JSON line each, written before the report: the driver
    logs from it what a restart kept it from logging."""
    return Path(sweep_dir) / "trials" / f"{key}.history.jsonl"


def _append_history(path: Path, metrics: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _save_state(state_dir: Path, sae, trainer: Trainer, epoch: int, sae_info: dict) -> None:
    """Replace ``state_dir`` with this epoch's state: write beside it, then swap by renames; at every
    moment either the new or the previous state is complete (marker file ``complete``)."""
    tmp = state_dir.with_name(f".{state_dir.name}.new")
    old = state_dir.with_name(f".{state_dir.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save(sae, tmp / SAE_DIR, **sae_info)
    torch.save(trainer.state_dict(), tmp / TRAINER_STATE)
    (tmp / "complete").write_text(str(epoch))
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def _latest_state(state_dir: Path) -> Path | None:
    """The trial's saved state, or the previous one when the swap was cut short."""
    for d in (state_dir, state_dir.with_name(f".{state_dir.name}.old")):
        if (d / "complete").is_file():
            return d
    return None


def _write_done(path: Path, metrics: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metrics))
    os.replace(tmp, path)


def _node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()
