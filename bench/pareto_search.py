"""Optuna multi-objective search vs the full grid on the demo data: hypervolume reached per trial budget.

Runs the demo grid (sweeps/demo.yaml: 11 trials), then Optuna sweeps over continuous ranges that
cover the grid (log-uniform lr and lambda, integer k and levels_from) with N trials, all in one
private local Ray, and prints the hypervolume fraction of the overall (L0, FVU) front of each and
the ratio Optuna / grid, measured in the same run on the same data and reference points: the
spec's default (L0 = n = 512, FVU = 1) and a tight one (L0 = 64, FVU = 0.05) that only counts the
sparse, high-fidelity corner where the methods differ.

Usage: python bench/pareto_search.py [--budgets 6,11] [--sampler tpe] [--workdir bench-out/pareto]
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import yaml

from msae.sweep import tracking
from msae.sweep.fronts import collect_points, compute_fronts
from msae.sweep.runner import run_sweep

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="6,11")
    ap.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"])
    ap.add_argument("--workdir", default="bench-out/pareto")
    a = ap.parse_args()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    base["data"]["synthetic"]["out"] = str(work / "data")
    base.update(storage=str(work / "sweeps"), tracking={"uri": f"sqlite:///{work / 'mlflow.db'}"})
    base["pareto"] = {"reference_l0": 512}
    rows = []
    grid = copy.deepcopy(base)
    grid["name"] = "bench-grid"
    (work / "grid.yaml").write_text(yaml.safe_dump(grid))
    t0 = time.time()
    s = run_sweep(str(work / "grid.yaml"), quiet=True)
    n_grid = s["done"] + s["failed"]
    rows.append(("grid", n_grid, *_hv(s), time.time() - t0))
    for budget in [int(b) for b in a.budgets.split(",")]:
        opt = copy.deepcopy(base)
        opt["name"] = f"bench-optuna-{budget}"
        opt["methods"] = {"relu": {"lr": [0.002], "l1": {"min": 0.003, "max": 0.03}},
                          "topk": {"lr": [0.002], "k": {"min": 8, "max": 32}},
                          "batchtopk": {"lr": [0.002], "k": {"min": 8, "max": 32}},
                          "msae": {"lr": [0.002], "levels_from": {"min": 8, "max": 16}, "weighting": ["rw", "uw"]}}
        opt["search"] = {"kind": "optuna", "trials": budget, "sampler": a.sampler, "seed": 0}
        (work / f"optuna-{budget}.yaml").write_text(yaml.safe_dump(opt))
        t0 = time.time()
        s = run_sweep(str(work / f"optuna-{budget}.yaml"), quiet=True)
        rows.append((f"optuna-{a.sampler}", budget, *_hv(s), time.time() - t0))
    g_default, g_tight = rows[0][2], rows[0][3]
    print(f"\n{'search':<14} {'trials':>6} {'HV(512,1)':>10} {'/ grid':>7} {'HV(64,0.05)':>12} {'/ grid':>7} {'seconds':>8}")
    for name, n, hv, hv_t, secs in rows:
        print(f"{name:<14} {n:>6} {hv:10.5f} {hv / g_default:7.4f} {hv_t:12.5f} {hv_t / g_tight:7.4f} {secs:8.1f}")
    print("hypervolume fractions of the overall (L0, FVU) front on image_val; reference points (L0, FVU)")


def _hv(summary) -> tuple[float, float]:
    """Hypervolume fraction at the spec's reference point and at the tight one, same points."""
    c = tracking.client(summary["uri"])
    exp = c.get_experiment_by_name(summary["experiment"])
    points = collect_points(c, exp.experiment_id, summary["sweep_id"])
    tight = compute_fronts(points, {"l0": 64.0, "fvu": 0.05, "one_minus_cosine": 1.0})
    return summary["fronts"]["fronts"]["all/fvu"]["hypervolume_fraction"], tight["fronts"]["all/fvu"]["hypervolume_fraction"]


if __name__ == "__main__":
    main()
