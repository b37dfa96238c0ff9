"""The training recipe (docs/method.md): one step is forward, loss, backward;
decoder renormalisation with compensation; removal of the parallel gradient component; global
grad-norm clip; AdamW. The learning rate decays linearly over the last 20% of epochs."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from msae.config import TrainConfig
from msae.data import ShuffledBatches, as_tensor, pick_device
from msae.errors import MsaeError
from msae.losses import LOSSES
from msae.preprocess import fit_preprocessing
from msae.sae import SAE, StepOutput

DEAD_FREQUENCY = 10 ** -5.5


class DivergedError(RuntimeError):
    """The loss became NaN or Inf."""


def lr_multiplier(epoch: int, epochs: int, decay_start: float = 0.8) -> float:
    """1 while epoch < floor(0.8 E), then (E - epoch) / (0.2 E), capped at 1 (the reference
    forgets the cap, so for E not a multiple of 5 its first decay epoch exceeds the base rate)."""
    if epoch < math.floor(decay_start * epochs):
        return 1.0
    return min(1.0, (epochs - epoch) / ((1.0 - decay_start) * epochs))


@torch.no_grad()
def renormalize_decoder(sae: SAE) -> None:
    """Scale each decoder row to unit norm; scale what produces each latent (encoder column, latent
    bias, and a method's own per-latent parameters) by the old norm (a ReLU SAE computes the same
    function afterwards)."""
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-12)
    sae.W_dec.div_(norms[:, None])
    sae.rescale_latents(norms)


@torch.no_grad()
def remove_parallel_grad(sae: SAE) -> None:
    """Remove from each decoder row's gradient its component parallel to the row."""
    g, w = sae.W_dec.grad, sae.W_dec
    if g is None:
        return
    coef = (g * w).sum(1, keepdim=True) / w.pow(2).sum(1, keepdim=True).clamp_min(1e-24)
    g.sub_(coef * w)


def _adamw(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError):  # fused unsupported for this device/dtype
        return torch.optim.AdamW(params, foreach=True, **kw)


class Trainer:
    """Owns the optimiser, the LR schedule and the firing statistics of one SAE."""

    def __init__(self, sae: SAE, cfg: TrainConfig, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or pick_device(cfg.device)
        self.sae = sae.to(self.device)
        self.params = [p for p in sae.parameters()]
        self.opt = _adamw(self.params, cfg, self.device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda e: lr_multiplier(e, cfg.epochs, cfg.decay_start))
        self.recon_loss = LOSSES[cfg.loss]
        n = sae.n
        self.samples_since_fired = torch.zeros(n, dtype=torch.long, device=self.device)
        self.window_counts = torch.zeros(n, dtype=torch.long, device=self.device)
        self.window_samples = 0
        self.window_steps = 0
        self.dead_fraction_train = float("nan")
        self.step_count = 0
        self.epoch = 0

    def dead_mask(self) -> torch.Tensor | None:
        if self.sae.cfg.auxk is None:
            return None
        return self.samples_since_fired >= self.cfg.auxk_dead_samples

    def step(self, xp: torch.Tensor) -> StepOutput:
        self.sae.train()
        self.opt.zero_grad(set_to_none=True)
        out = self.sae.training_step(xp, self.recon_loss, self.dead_mask())
        loss = out.loss.detach()
        if not bool(torch.isfinite(loss)):
            raise DivergedError(f"loss is {float(loss)} at step {self.step_count}")
        out.loss.backward()
        renormalize_decoder(self.sae)
        remove_parallel_grad(self.sae)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        self.opt.step()
        self._track_firing(out, xp.shape[0])
        self.step_count += 1
        return out

    def _track_firing(self, out: StepOutput, batch: int) -> None:
        fired = out.fire_counts > 0
        self.samples_since_fired += batch
        self.samples_since_fired[fired] = 0
        self.window_counts += out.fire_counts
        self.window_samples += batch
        self.window_steps += 1
        if self.window_steps >= self.cfg.dead_window:
            self.close_window()

    def close_window(self) -> None:
        """Training-time dead latents: fired on fewer than 10^-5.5 of the window's samples."""
        if self.window_samples:
            freq = self.window_counts.double() / self.window_samples
            self.dead_fraction_train = float((freq < DEAD_FREQUENCY).double().mean())
        self.window_counts.zero_()
        self.window_samples = self.window_steps = 0

    def end_epoch(self) -> None:
        self.sched.step()
        self.epoch += 1

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "epoch": self.epoch,
                "step": self.step_count, "samples_since_fired": self.samples_since_fired.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.epoch, self.step_count = int(state["epoch"]), int(state["step"])
        self.samples_since_fired.copy_(state["samples_since_fired"])


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    loss: float
    l0: float
    seconds: float
    dead_fraction_train: float
    eval: dict[str, dict] = field(default_factory=dict)
    eval_seconds: float = 0.0

    def flat(self) -> dict[str, float]:
        """Plain metric names for loggers: train metrics, then '<eval-set>/<metric>'."""
        out = {"epoch": self.epoch, "lr_schedule": self.lr, "train_loss": self.loss, "train_l0": self.l0,
               "epoch_seconds": self.seconds, "eval_seconds": self.eval_seconds,
               "dead_fraction_train": self.dead_fraction_train}
        for name, res in self.eval.items():
            for k, v in res.items():
                out[f"{name}/{k}"] = v
        return out


def preprocessing_record(sae: SAE, cfg: TrainConfig) -> dict:
    """How the model's inputs are processed, as recorded in its checkpoint."""
    return {"scaling": cfg.scaling, "mean_center": cfg.mean_center, "scale": float(sae.scale)}


def place_data(arr: np.ndarray, device: torch.device, share: float = 1.0) -> torch.Tensor:
    """Whole array on the GPU when it fits comfortably in this process's ``share`` of the GPU's free
    memory (several trials may share one GPU), else a zero-copy CPU tensor."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if arr.nbytes < 0.5 * free * min(1.0, share):
            return as_tensor(arr, device)
    return as_tensor(arr, torch.device("cpu"))


def fit(sae: SAE, train: np.ndarray, cfg: TrainConfig, eval_sets: dict[str, np.ndarray] | None = None,
        on_epoch: Callable[[EpochRecord, "Trainer"], None] | None = None, progress: bool = True,
        trainer: Trainer | None = None, fit_stats: bool = True, device_share: float = 1.0,
        eval_last: bool = True) -> list[EpochRecord]:
    """Train ``sae`` on ``train`` (N, d) for ``cfg.epochs``; evaluate each epoch on ``eval_sets``.

    Preprocessing statistics come from the TRAIN data and are stored in the model (``fit_stats``;
    else the model's are kept); evaluation data is processed with them. ``trainer`` may carry
    restored optimiser state (resume). ``device_share``: the fraction of a GPU this process owns.
    ``eval_last=False`` skips the last epoch's evaluation (a caller that evaluates the final model
    itself, as a sweep trial does, would otherwise evaluate it twice).
    """
    from msae.evaluate import evaluate

    if train.shape[1] != sae.d:
        raise MsaeError(f"train data: expected dimension {sae.d}, got {train.shape[1]}")
    torch.manual_seed(cfg.seed)
    if fit_stats:
        pp = fit_preprocessing(train, cfg.scaling, cfg.mean_center)
        sae.set_preprocessing(torch.from_numpy(pp.mean), pp.scale)
    trainer = trainer or Trainer(sae, cfg)
    device = trainer.device
    data = place_data(train, device, device_share)
    source = ShuffledBatches(data, cfg.batch_size, cfg.seed)
    history: list[EpochRecord] = []
    bar = _progress(cfg.epochs * len(source), trainer.epoch * len(source), progress)
    while trainer.epoch < cfg.epochs:
        t0 = time.perf_counter()
        loss_sum, l0_sum, steps = torch.zeros((), device=device), 0.0, 0
        for xb in source.epoch(trainer.epoch):
            xp = sae.preprocess(xb.to(device, non_blocking=True))
            out = trainer.step(xp)
            loss_sum += out.loss.detach()
            l0_sum += out.l0
            steps += 1
            if bar is not None:
                bar.update(1)
                if steps % 20 == 1:  # a device sync only when the bar shows new numbers
                    bar.set_postfix(epoch=trainer.epoch + 1, loss=f"{float(loss_sum) / steps:.4f}",
                                    l0=f"{l0_sum / steps:.1f}")
        loss_sum = float(loss_sum)
        rec = EpochRecord(trainer.epoch + 1, trainer.lr, loss_sum / max(steps, 1), l0_sum / max(steps, 1),
                          time.perf_counter() - t0, trainer.dead_fraction_train)
        trainer.end_epoch()
        t1 = time.perf_counter()
        if eval_last or trainer.epoch < cfg.epochs:
            for name, arr in (eval_sets or {}).items():
                rec.eval[name] = evaluate(sae, arr, batch_size=cfg.batch_size, cknna_rows=0, orthogonality=False)["own"]
        rec.eval_seconds = time.perf_counter() - t1
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec, trainer)
    if bar is not None:
        bar.close()
    sae.eval()
    return history


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)


