"""Samples/s of one full training step per method, beside the floor matmul and a reference-style
baseline, measured in the same run.

  floor     one dense [B, d] @ [d, n] matmul (the encoder's unavoidable cost)
  msae      our step: Trainer.step (forward, backward, renormalisation, gradient projection,
            clip, fused AdamW) on the method's fast path
  baseline  the same Trainer.step, with the loss computed the way the reference code does it
            (top-k per level, dense scatter, one dense decode per level; msae.sae.dense)

Ratios: step / floor (lower is better; target TopK <= 2x) and baseline / ours (speed-up; target
MSAE >= 8x). The MSAE step cost depends on how many pre-activations are positive: 'init' is a
freshly initialised model (about half positive), 'trained-sparsity' shifts the latent bias so
that 80% of latents are zero, the sparsity the paper reports for trained MSAEs.

Usage: python bench/train_step.py [--shape paper|small|both] [--repeats 3] [--methods ...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from msae.config import SAEConfig, TrainConfig
from msae.sae import create_sae, dense_training_loss, sae_config
from msae.train import Trainer

SHAPES = {"paper": (768, 6144, 4096), "small": (128, 1024, 1024)}


def configs(d: int, n: int) -> dict[str, SAEConfig]:
    return {"relu": sae_config("relu", d, n, l1=0.003), "topk": sae_config("topk", d, n, k=64),
            "batchtopk": sae_config("batchtopk", d, n, k=32),
            "msae": sae_config("msae", d, n, levels_from=64, weighting="rw"),
            "jumprelu": sae_config("jumprelu", d, n)}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _DenseLoss:
    """Wraps an SAE so that Trainer.step runs the reference-style dense loss."""

    def __init__(self, sae):
        self.sae = sae

    def __call__(self, xp, recon_loss, dead=None):
        from msae.sae.base import StepOutput
        loss = dense_training_loss(self.sae, xp, recon_loss)
        return StepOutput(loss, xp, torch.zeros(self.sae.n, dtype=torch.long), 0.0)


def sparsify(sae, x, zero_fraction: float) -> None:
    """Shift b_enc so that about ``zero_fraction`` of pre-activations are <= 0."""
    with torch.no_grad():
        pre = sae.pre_activation(x)
        q = torch.quantile(pre[:256].flatten(), zero_fraction)
        sae.b_enc.sub_(q)


def bench_shape(name: str, repeats: int, methods: list[str]) -> list[tuple]:
    d, n, B = SHAPES[name]
    torch.manual_seed(0)
    x = torch.randn(B, d)
    W = torch.randn(d, n)
    floor = timed(lambda: x @ W, repeats)
    rows = [(name, "floor matmul", "", floor, B / floor, 1.0, None)]
    for method, cfg in configs(d, n).items():
        if method not in methods:
            continue
        states = ["init", "trained-sparsity"] if method == "msae" else ["init"]
        for state in states:
            sae = create_sae(cfg, 0)
            if state != "init":
                sparsify(sae, x, 0.8)
            tcfg = TrainConfig(lr=1e-12, epochs=30, batch_size=B)
            trainer = Trainer(sae, tcfg, torch.device("cpu"))
            ours = timed(lambda: trainer.step(x), repeats)
            base_trainer = Trainer(sae, tcfg, torch.device("cpu"))
            original = sae.training_step
            sae.training_step = _DenseLoss(sae)
            try:
                base = timed(lambda: base_trainer.step(x), max(1, repeats // 2))
            finally:
                sae.training_step = original
            rows.append((name, method, state, ours, B / ours, ours / floor, base / ours))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["paper", "small", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="relu,topk,batchtopk,msae")
    a = ap.parse_args()
    shapes = ["small", "paper"] if a.shape == "both" else [a.shape]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(f"{'shape':<6} {'method':<13} {'state':<17} {'step s':>8} {'samples/s':>10} {'x floor':>8} {'speed-up vs baseline':>21}")
    for shape in shapes:
        for shape_name, method, state, sec, sps, vs_floor, speedup in bench_shape(shape, a.repeats, a.methods.split(",")):
            sp = "" if speedup is None else f"{speedup:.2f}x"
            print(f"{shape_name:<6} {method:<13} {state:<17} {sec:8.3f} {sps:10.0f} {vs_floor:7.2f}x {sp:>21}", flush=True)


if __name__ == "__main__":
    main()
