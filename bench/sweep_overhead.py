"""The sweep layer's own cost: `msae sweep` of 8 TopK SAEs against a plain loop over SAELens's trainer.

Grid: TopK, d 768, expansion 8 (n 6144), k in 16, 32, 64, 128 x lr in 5e-4, 1e-3, 100,000 training
rows (a synthetic CLIP-like cache), 2 epochs of batch 4096, one CPU per trial (so two trials run at
once on this 2-core machine). Measured in one run:

  msae sweep      wall time of the whole command (Ray start, data shared once, trials, final
                  evaluation on a 10,000-row validation cache, checkpoints, MLflow, Pareto fronts),
                  and the seconds each trial spent in its training epochs (its `epoch_seconds`)
  SAELens loop    the same 8 SAEs trained one after another by SAETrainer.fit (2 threads) on
                  the same rows, nothing else (no evaluation, no tracking, no checkpoints)

Overhead = the share of the sweep's wall time x slots not spent in training epochs, where slots =
concurrent trials (2): 1 - sum(epoch seconds) / (wall x slots). Target: at most 15%.

Usage: python bench/sweep_overhead.py [--rows 100000] [--out bench-out/sweep-overhead] [--no-saelens] [--no-progressive]
       (the SAELens loop needs `pip install -e '.[bench]'`)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scale import D, make_cache  # noqa: E402  (bench/ is not a package)

KS, LRS, EXPANSION, EPOCHS, BATCH = (16, 32, 64, 128), (5e-4, 1e-3), 8, 2, 4096


def run_sweep(out: Path, train: Path, val: Path, progressive: bool = True) -> dict:
    import yaml
    spec = {"name": "overhead", "data": {"train": str(train), "eval": {"val": str(val)}},
            "expansion": EXPANSION, "methods": {"topk": {"lr": list(LRS), "k": list(KS)}},
            "training": {"epochs": EPOCHS, "batch_size": BATCH, "progressive": progressive},
            "resources": {"cpus": 1}, "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}"},
            "storage": str(out / "sweeps")}
    shutil.rmtree(out / "sweeps", ignore_errors=True)
    (out / "mlflow.db").unlink(missing_ok=True)
    (out / "overhead.yaml").write_text(yaml.safe_dump(spec))
    ray_tmp = tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "msae.cli", "sweep", str(out / "overhead.yaml"), "--quiet"],
                          cwd=out, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"msae sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    from msae.sweep.layout import SweepDir
    (sweep,) = [SweepDir(p) for p in (out / "sweeps").glob("overhead-*")]
    trials = {}
    for key in sweep.trial_keys():
        hist = sweep.history(key)
        start, end = hist[0]["trial_start"], sweep.result_file(key).stat().st_mtime
        trials[key] = {"epochs_s": sum(h["epoch_seconds"] for h in hist), "first_step_s": hist[0]["train_start"] - t0,
                       "startup_s": hist[0]["train_start"] - start, "epoch_eval_s": sum(h["eval_seconds"] for h in hist),
                       "final_eval_s": hist[-1]["final_seconds"], "span_s": end - start}
    if len(trials) != len(KS) * len(LRS):
        raise SystemExit(f"expected {len(KS) * len(LRS)} finished trials, found {len(trials)}")
    return {"wall_s": wall, "trials": trials}


def run_saelens(train: Path) -> float:
    """8 SAEs one after another through SAELens's own trainer, on the same rows and batches."""
    import numpy as np
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from msae.cache import open_cache
    x = torch.from_numpy(np.array(open_cache(train).embeddings))  # a writable copy
    steps = EPOCHS * (x.shape[0] // BATCH)

    def batches(seed: int):
        g = torch.Generator().manual_seed(seed)
        for _ in range(EPOCHS):
            perm = torch.randperm(x.shape[0], generator=g)
            for s in range(0, x.shape[0] - BATCH + 1, BATCH):
                yield x[perm[s:s + BATCH]]

    torch.set_num_threads(2)
    t0 = time.time()
    for i, (k, lr) in enumerate((k, lr) for k in KS for lr in LRS):
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=EXPANSION * D, k=k))
        cfg = SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=lr,
                               lr_end=lr / 10)
        SAETrainer(cfg, sae, data_provider=batches(i)).fit()
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--out", default="bench-out/sweep-overhead")
    ap.add_argument("--no-saelens", action="store_true", help="skip the SAELens loop")
    ap.add_argument("--no-progressive", action="store_true",
                    help="spec training.progressive: false (no final progressive-recovery curve)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, val = out / f"train_{a.rows}.arrow", out / "val_10000.arrow"
    make_cache(train, a.rows, 1)
    make_cache(val, 10_000, 2)
    slots = min(os.cpu_count() or 1, len(KS) * len(LRS))
    print(f"{len(KS) * len(LRS)} TopK SAEs, d {D}, n {EXPANSION * D}, {a.rows} rows, {EPOCHS} epochs of {BATCH}; "
          f"{slots} trials at once; progressive curve {'off' if a.no_progressive else 'on'}", flush=True)
    sweep = run_sweep(out, train, val, progressive=not a.no_progressive)
    trained = sum(t["epochs_s"] for t in sweep["trials"].values())
    first = min(t["first_step_s"] for t in sweep["trials"].values())
    overhead = 1 - trained / (sweep["wall_s"] * slots)
    print(f"msae sweep: {sweep['wall_s']:.1f} s wall; training epochs {trained:.1f} trial-s over {slots} slots "
          f"= {trained / slots:.1f} s; first training step after {first:.1f} s")
    print(f"  overhead (share of wall x slots outside training epochs): {overhead:.1%} (target <= 15%)")
    parts = {p: sum(t[p] for t in sweep["trials"].values()) for p in ("startup_s", "epoch_eval_s", "final_eval_s")}
    inside = sum(t["span_s"] for t in sweep["trials"].values())
    parts["checkpoints, reports_s"] = inside - trained - sum(parts.values())
    parts["outside trials (Ray, driver, MLflow, fronts)_s"] = sweep["wall_s"] * slots - inside
    print("  where the rest of wall x slots went (trial-seconds):")
    for name, v in parts.items():
        print(f"    {name[:-2]:<45} {v:7.1f}  ({v / (sweep['wall_s'] * slots):.1%})")
    if not a.no_saelens:
        loop = run_saelens(train)
        print(f"SAELens loop (SAETrainer.fit x {len(KS) * len(LRS)}, 2 threads, training only): {loop:.1f} s")
        print(f"  msae sweep wall / SAELens loop wall: {sweep['wall_s'] / loop:.2f}x")


if __name__ == "__main__":
    main()
