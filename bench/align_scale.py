"""`msae align` at the paper's largest dictionary: two SAEs of n = 24,576 latents (expansion 32 at
d = 768), the second a "second seed" of the first (its decoder rows permuted and perturbed, so that
matched cosines spread as between real seeds), and a random pair (the solver's hard case).

Measured in one run, per pair: the wall time of the whole `msae align` command (load, the n x n
cosine matrix, the Hungarian assignment, the JSON), and its peak resident memory (the child's
ru_maxrss), printed against the float64 cosine matrix it must hold (8 n^2 bytes) and against this
machine's memory.

Usage: python bench/align_scale.py [--n 24576] [--noise 0.6] [--out bench-out/align] [--no-random]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

D = 768


def make_pair(out: Path, n: int, noise: float, seed: int, related: bool) -> tuple[Path, Path]:
    """Two checkpoints: A random unit rows; B either A permuted plus noise, or independent."""
    from msae import checkpoint
    from msae.sae import create_sae, sae_config

    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(2):
        sae = create_sae(sae_config("topk", D, n, k=64), seed + i)
        with torch.no_grad():
            if i == 0:
                W = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
                first = W
            elif related:
                W = first[torch.randperm(n, generator=g)] + noise * torch.randn(n, D, generator=g) / D ** 0.5
            else:
                W = torch.randn(n, D, generator=g)
            sae.W_dec.copy_(torch.nn.functional.normalize(W, dim=1))
        p = out / f"{'seed' if related else 'random'}-{i}"
        if not p.exists():
            checkpoint.save(sae, p)
        paths.append(p)
    return paths[0], paths[1]


def run_align(a: Path, b: Path, out: Path) -> dict:
    res_file = out / f"{a.name}-{b.name}.json"
    res_file.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "msae.cli", "align", str(a), str(b), "--out", str(res_file)],
                          capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"msae align failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        print("  (peak memory: an earlier child was larger; rerun the pair alone for its own peak)")
    return {"wall_s": wall, "peak_gb": peak_kb * 1024 / 1e9, **json.loads(res_file.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24_576)
    ap.add_argument("--noise", type=float, default=0.6, help="perturbation of the second seed's rows")
    ap.add_argument("--out", default="bench-out/align")
    ap.add_argument("--no-random", action="store_true", help="skip the random pair (the solver's slow case)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import psutil
    total = psutil.virtual_memory().total / 1e9
    matrix = 8 * a.n * a.n / 1e9
    print(f"msae align, n = {a.n}, d = {D}: float64 cosine matrix {matrix:.2f} GB; machine {total:.1f} GB, "
          f"{os.cpu_count()} CPUs", flush=True)
    pairs = [("second seed", True)] + ([] if a.no_random else [("random pair", False)])
    for label, related in pairs:
        ca, cb = make_pair(out, a.n, a.noise, 0, related)
        r = run_align(ca, cb, out)
        print(f"{label}: {r['wall_s']:.1f} s; peak RSS {r['peak_gb']:.2f} GB = {r['peak_gb'] / matrix:.2f}x the "
              f"matrix, {r['peak_gb'] / total:.1%} of the machine; mean matched cosine {r['mean_cosine']:.4f}, "
              f"{r['fraction_above_0.9']:.1%} above 0.9", flush=True)


if __name__ == "__main__":
    main()
