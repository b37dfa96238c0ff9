"""Zero-copy sharing of a feature cache with sweep trials, measured inside a trial.

Writes a float32 cache of --gb gigabytes, runs a one-trial sweep on it (private local Ray), and
prints what the trial measured: the cache size, the private memory added by reading every value,
the private memory growth over the steady-state epochs, the trial's whole private memory, and the
ratio of each to the cache size (target: a few percent at most).

Usage: python bench/shared_cache.py [--gb 1.0] [--d 1024] [--workdir bench-out/shared-cache]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from msae.cache import write_cache
from msae.sweep.runner import run_sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--workdir", default="bench-out/shared-cache")
    a = ap.parse_args()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = int(a.gb * 2**30 / (4 * a.d))
    cache = work / "cache.arrow"
    if not cache.is_file():
        rng = np.random.default_rng(0)
        x = np.lib.format.open_memmap(work / "tmp.npy", mode="w+", dtype=np.float32, shape=(rows, a.d))
        for s in range(0, rows, 65536):
            x[s:s + 65536] = rng.standard_normal((min(65536, rows - s), a.d), dtype=np.float32)
        write_cache(cache, x, [str(i) for i in range(rows)], model="bench", pretrained="none", modality="image",
                    source="bench/shared_cache.py")
        write_cache(work / "val.arrow", np.asarray(x[:4096]), [str(i) for i in range(4096)], model="bench",
                    pretrained="none", modality="image", source="bench/shared_cache.py", split="val")
        del x
        (work / "tmp.npy").unlink()
    spec = {"name": "bench-shared-cache", "data": {"train": str(cache), "eval": {"val": str(work / "val.arrow")}},
            "expansion": 0.25, "methods": {"topk": {"lr": [0.001], "k": [8]}},
            "training": {"epochs": 3, "batch_size": 4096, "progressive": False},
            "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}, "storage": str(work / "sweeps")}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    s = run_sweep(str(work / "spec.yaml"), quiet=True)
    (r,) = list(s["results"])
    m = r.metrics
    size = m["data_mb"]
    print(f"\ncache {size:.0f} MB, mapped in the trial as: {m['data_mapping']}")
    for name in ("data_touch_private_mb", "private_growth_mb", "private_mb"):
        print(f"{name:<24} {m[name]:9.1f} MB  = {m[name] / size:7.2%} of the cache")


if __name__ == "__main__":
    main()
