"""One Ray Tune trial: train one SAE, report every epoch, keep its state in the sweep folder.

A trial that starts (first time, retry after a crash, sweep resume) continues from its latest
saved epoch; one that finds its result reports it again and trains nothing. Per epoch, in this
order: append the result to the history (fsynced), report it to Tune, then save the training
state; a trial stopped in between repeats that epoch (logged once), never skips it.
Diagnostics (memory probes) and fault injection are optional hooks (:class:`Hooks`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msae import checkpoint
from msae.evaluate import evaluate, progressive_ks
from msae.sae import create_sae, method_of
from msae.sweep.layout import SAE_DIR, TRAINER_STATE, SweepDir
from msae.sweep.shared import SweepData, open_shared
from msae.sweep.space import Trial, TrialFactory
from msae.train import DivergedError, EpochRecord, Trainer, fit

HEADLINE = ("fvu", "fvu_dataset", "cosine", "l0", "zero_fraction", "dead_fraction", "nmse")
CRASH_ENV = "MSAE_INJECT_CRASH"  # "KEY@EPOCH:MARKER_DIR": trial KEY crashes once after reporting EPOCH
DIAGNOSTICS_ENV = "MSAE_DIAGNOSTICS"  # "memory": measure the trial's private memory around the shared data


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one sweep shares (sent once through ``tune.with_parameters``)."""

    sweep_dir: str
    sweep_id: str
    data: SweepData
    trials: TrialFactory
    epoch_eval_rows: int | None
    progressive: bool
    threads: int
    gpu_fraction: float


def run_trial(config: dict[str, Any], *, setup: TrialSetup) -> None:
    """The Tune function trainable."""
    TrialRunner(setup.trials.from_tune(config), setup).run()


class TrialRunner:
    def __init__(self, trial: Trial, setup: TrialSetup):
        self.trial, self.setup = trial, setup
        self.sweep = SweepDir(Path(setup.sweep_dir))
        self.key = trial.key
        self.hooks = Hooks.from_env(self.key)

    # ---------------------------------------------------------------- the story
    def run(self) -> None:
        from ray import tune

        done = self.sweep.result(self.key)
        if done is not None:  # finished before a resume or a retry: report it again, train nothing
            tune.report(self.tune_metrics(done.get("metrics", {}), final=True))
            return
        torch.set_num_threads(max(1, self.setup.threads))
        self.hooks.start()
        train, self.evals, how = self.open_data()
        self.hooks.data_opened(train, how)
        sae, trainer, resumed = self.resume()
        self.sae, self.resumed = sae, resumed
        rows = self.setup.epoch_eval_rows
        epoch_evals = {name: arr[:rows] if rows else arr for name, arr in self.evals.items()}
        self.hooks.training_starts()
        try:
            fit(sae, train, self.trial.train, epoch_evals, on_epoch=self.report_epoch, progress=False,
                trainer=trainer, fit_stats=False, device_share=self.setup.gpu_fraction or 1.0, eval_last=False)
        except DivergedError as e:
            self.sweep.write_result(self.key, {"status": "diverged", "failure": str(e), "metrics": {}})
            self.sweep.drop_state(self.key)
            tune.report({"diverged": 1, "final": 1})

    def open_data(self) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
        data, sid = self.setup.data, self.setup.sweep_id
        train, how = open_shared(data.train, data.share, sid)
        evals = {name: open_shared(ref, data.share, sid)[0] for name, ref in data.evals.items()}
        return train, evals, how

    def resume(self) -> tuple[Any, Trainer | None, bool]:
        """A fresh SAE with the sweep's preprocessing, or the trial's latest saved state."""
        device = self.device()
        saved = self.sweep.latest_state(self.key)
        if saved is None:
            sae = create_sae(self.trial.sae, self.trial.train.seed)
            pp = self.setup.data.preprocessing
            sae.set_preprocessing(torch.from_numpy(pp.mean), pp.scale)
            return sae, None, False
        sae = checkpoint.load(saved / SAE_DIR, device=torch.device(device))
        trainer = Trainer(sae, self.trial.train)
        trainer.load_state_dict(torch.load(saved / TRAINER_STATE, weights_only=True, map_location=device))
        return sae, trainer, True

    def device(self) -> str:
        """CUDA when this trial was given a GPU, else the CPU."""
        import ray
        return "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"

    def report_epoch(self, rec: EpochRecord, trainer: Trainer) -> None:
        from ray import tune

        final = rec.epoch == self.trial.train.epochs
        metrics = self.epoch_metrics(rec)
        if final:
            t0 = time.perf_counter()
            final_metrics, curve = self.final_metrics()
            metrics.update(final_metrics, final_seconds=time.perf_counter() - t0)
            self.save_final(metrics, curve)
        self.sweep.append_history(self.key, metrics)
        tune.report(self.tune_metrics(metrics, final))
        if final:
            self.sweep.drop_state(self.key)
        else:
            self.sweep.save_state(self.key, lambda folder: self.write_state(folder, trainer), rec.epoch)
        self.hooks.after_report(rec.epoch)

    # ---------------------------------------------------------------- the pieces
    def epoch_metrics(self, rec: EpochRecord) -> dict[str, Any]:
        metrics = rec.flat()
        primary = self.setup.data.primary
        metrics.update({k: rec.eval[primary][k] for k in HEADLINE if k in rec.eval.get(primary, {})})
        metrics.update(resumed=int(self.resumed), time=time.time())
        metrics.update(self.hooks.epoch_diagnostics())
        return metrics

    def final_metrics(self) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """Every metric on every evaluation set (all rows) and, on the primary set, the
        progressive-recovery curve of methods where it is meaningful; recovery with ground truth."""
        from msae.synthetic import recovery_score

        out: dict[str, Any] = {"final": 1}
        curve: list[dict[str, float]] = []
        primary = self.setup.data.primary
        progressive = self.setup.progressive and method_of(self.trial.method).progressive
        for name, arr in self.evals.items():
            ks: list[int | None] = [None] + (progressive_ks(self.sae.n) if name == primary and progressive else [])
            res = evaluate(self.sae, arr, ks, batch_size=self.trial.train.batch_size, cknna_for=[None],
                           orthogonality=name == primary)
            out.update({f"{name}/{k}": v for k, v in res["own"].items()})
            if name == primary:
                out.update({k: res["own"][k] for k in HEADLINE})
                out.update({k: res["own"][k] for k in ("cknna_recon", "decoder_orthogonality") if k in res["own"]})
                curve = [{"k": int(key), **{m: float(r[m]) for m in ("l0", "fvu", "cosine")}}
                         for key, r in res.items() if key != "own"]
        truth = self.setup.data.truth
        if truth is not None:
            out.update(recovery_score(self.sae.W_dec.detach().cpu().numpy(), truth))
        if self.setup.data.semantic is not None:
            out.update(self.semantic_metrics(curve))
        out.update(self.hooks.final_diagnostics())
        return out, curve

    def semantic_metrics(self, curve: list[dict[str, float]]) -> dict[str, Any]:
        """The spec's ``evaluation``: probe fidelity of the own code (and of every curve point, added
        to it in place) and the number of named latents (docs/interpret.md)."""
        from msae.interpret.naming import name_latents
        from msae.interpret.probe import probe_fidelity

        sem, sid, share = self.setup.data.semantic, self.setup.sweep_id, self.setup.data.share
        out: dict[str, Any] = {}
        if sem.probe is not None:
            x = open_shared(sem.probe_eval, share, sid)[0]
            x = x if sem.probe_rows is None else x[sem.probe_rows]
            res = probe_fidelity(self.sae, sem.probe, x, list(sem.probe_labels), [None] + [p["k"] for p in curve],
                                 batch_size=self.trial.train.batch_size)
            own = res["own"]
            out.update(probe_kl=own["kl"], probe_agreement=own["agreement"],
                       probe_accuracy=own["accuracy_reconstructed"], probe_accuracy_original=own["accuracy_original"])
            for p in curve:
                p.update(probe_kl=res[str(p["k"])]["kl"], probe_agreement=res[str(p["k"])]["agreement"])
        if sem.vocab is not None:
            vocab = open_shared(sem.vocab, share, sid)[0]
            out["named_latents"] = int(name_latents(self.sae, np.asarray(vocab), list(sem.vocab_words), top=1).named.sum())
        return out

    def checkpoint_info(self) -> dict[str, Any]:
        return {"train": self.trial.train.to_dict(), "preprocessing": self.setup.data.preprocessing.record(),
                "data": {"sweep": self.setup.sweep_id, "trial": self.key, "train": self.setup.data.train.path,
                         "rows": self.setup.data.train.rows, "fingerprint": self.setup.data.train.fingerprint}}

    def save_final(self, metrics: dict[str, Any], curve: list[dict[str, float]]) -> None:
        """The final SAE (with metrics.json) and the result; written before the final report."""
        target = self.sweep.final_sae(self.key)
        if target.exists():  # left by an attempt that died before writing its result
            import shutil
            shutil.rmtree(target)
        checkpoint.save(self.sae, target, files={"metrics.json": {"final": metrics, "curve": curve}},
                        **self.checkpoint_info())
        self.sweep.write_result(self.key, {"status": "finished", "epoch": int(metrics["epoch"]), "metrics": metrics,
                                           "curve": curve})

    def write_state(self, folder: Path, trainer: Trainer) -> None:
        checkpoint.save(self.sae, folder / SAE_DIR, **self.checkpoint_info())
        torch.save(trainer.state_dict(), folder / TRAINER_STATE)

    @staticmethod
    def tune_metrics(metrics: dict[str, Any], final: bool) -> dict[str, Any]:
        """What Tune sees (schedulers, Optuna, the driver's callbacks): numbers only."""
        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if final:
            out["final"] = 1
        return out


class Hooks:
    """Optional per-trial behaviour, switched on by environment variables of the driver
    (forwarded to the workers): memory diagnostics and fault injection (tests)."""

    def __init__(self, key: str, memory: bool, crash: tuple[str, int, Path] | None):
        self.key, self.memory, self.crash = key, memory, crash
        self.anon0 = self.steady = 0
        self.data: dict[str, Any] = {}

    @classmethod
    def from_env(cls, key: str) -> "Hooks":
        crash = None
        spec = os.environ.get(CRASH_ENV)
        if spec:
            target, rest = spec.split("@", 1)
            at, marker_dir = rest.split(":", 1)
            crash = (target, int(at), Path(marker_dir))
        return cls(key, os.environ.get(DIAGNOSTICS_ENV) == "memory", crash)

    def start(self) -> None:
        self.data["trial_start"] = time.time()  # before opening data and building the SAE
        if self.memory:
            self.anon0 = _rss_anon()

    def training_starts(self) -> None:
        self.data["train_start"] = time.time()  # the moment before the first step (bench/scale.py)

    def data_opened(self, train: np.ndarray, how: str) -> None:
        self.data.update(data_access=how)
        if self.memory:  # touch every value: a private copy would show up as anonymous memory
            checksum = float(train.sum(dtype=np.float64))
            self.data.update(data_checksum=checksum, data_mb=train.nbytes / 2**20,
                             data_touch_private_mb=(_rss_anon() - self.anon0) / 2**20, data_mapping=_mapping_of(train))

    def epoch_diagnostics(self) -> dict[str, Any]:
        out = {"node_id": _node_id(), **self.data}
        if self.memory:
            self.steady = self.steady or _rss_anon()  # steady state starts after the first epoch
            out["private_mb"] = _rss_anon() / 2**20
        return out

    def final_diagnostics(self) -> dict[str, Any]:
        return {"private_growth_mb": (_rss_anon() - self.steady) / 2**20} if self.memory else {}

    def after_report(self, epoch: int) -> None:
        if self.crash is None:
            return
        target, at, marker_dir = self.crash
        marker = marker_dir / self.key
        if self.key == target and epoch == at and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(time.time()))
            raise RuntimeError(f"injected crash after epoch {at} ({CRASH_ENV})")


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


def _node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()
