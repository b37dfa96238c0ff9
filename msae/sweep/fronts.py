"""Pareto fronts of a sweep from its MLflow child runs, written as a table, JSON and plots to the parent run.

Each finished trial contributes its own operating point (L0, FVU, 1 - cosine) on the primary
evaluation cache; TopK-style trials (TopK, BatchTopK, MSAE) also contribute every point of their
progressive-recovery curve (metrics ``curve/l0``, ``curve/fvu``, ``curve/cosine`` at step k).
"""
from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from msae.pareto import hypervolume, pareto_front
from msae.sweep import tracking

PLANES = {"fvu": "FVU", "one_minus_cosine": "1 - cosine"}


@dataclass(frozen=True)
class Point:
    run_id: str
    trial: str
    method: str
    at: str  # "own" or "k=16", ...
    l0: float
    fvu: float
    one_minus_cosine: float


def collect_points(c, exp_id: str, sweep_id: str) -> list[Point]:
    points = []
    for run in tracking.child_runs(c, exp_id, sweep_id):
        if run.info.status != "FINISHED":
            continue
        m, tags = run.data.metrics, run.data.tags
        key, method = tags.get(tracking.KEY_TAG, run.info.run_id), tags.get("msae.method", "?")
        if all(k in m for k in ("l0", "fvu", "cosine")):
            points.append(Point(run.info.run_id, key, method, "own", m["l0"], m["fvu"], 1 - m["cosine"]))
        if "curve/l0" in m:
            hist = {name: {h.step: h.value for h in c.get_metric_history(run.info.run_id, f"curve/{name}")}
                    for name in ("l0", "fvu", "cosine")}
            for k in sorted(hist["l0"]):
                if k in hist["fvu"] and k in hist["cosine"]:
                    points.append(Point(run.info.run_id, key, method, f"k={k}", hist["l0"][k], hist["fvu"][k],
                                        1 - hist["cosine"][k]))
    return points


def compute_fronts(points: list[Point], reference: dict[str, float]) -> dict[str, Any]:
    """Fronts per method and overall ("all") on each plane, with hypervolume against ``reference``
    (keys l0, fvu, one_minus_cosine) and the hypervolume as a fraction of the reference box."""
    groups = {"all": points}
    for p in points:
        groups.setdefault(p.method, []).append(p)
    out: dict[str, Any] = {"reference": reference, "fronts": {}}
    for plane in PLANES:
        ref = (reference["l0"], reference[plane])
        for group, pts in sorted(groups.items()):
            xy = [(p.l0, getattr(p, plane)) for p in pts]
            front = [pts[i] for i in pareto_front(xy)]
            hv = hypervolume(xy, ref)
            out["fronts"][f"{group}/{plane}"] = {
                "group": group, "plane": plane, "hypervolume": hv, "hypervolume_fraction": hv / (ref[0] * ref[1]),
                "points": [asdict(p) for p in front], "run_ids": sorted({p.run_id for p in front})}
    return out


def write_report(fronts: dict[str, Any], points: list[Point], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fronts.json").write_text(json.dumps(fronts, indent=2))
    with open(folder / "fronts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["front", "run_id", "trial", "method", "at", "l0", "fvu", "one_minus_cosine"])
        for name, fr in fronts["fronts"].items():
            for p in fr["points"]:
                w.writerow([name, p["run_id"], p["trial"], p["method"], p["at"], p["l0"], p["fvu"], p["one_minus_cosine"]])
    with open(folder / "points.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_id", "trial", "method", "at", "l0", "fvu", "one_minus_cosine"])
        for p in points:
            w.writerow([p.run_id, p.trial, p.method, p.at, p.l0, p.fvu, p.one_minus_cosine])
    files = [folder / "fronts.json", folder / "fronts.csv", folder / "points.csv"]
    for plane, label in PLANES.items():
        files.append(_plot(fronts, points, plane, label, folder / f"pareto_{plane}.png"))
    return files


def _plot(fronts, points, plane: str, label: str, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    methods = sorted({p.method for p in points})
    for i, m in enumerate(methods):
        color = f"C{i}"
        pts = [p for p in points if p.method == m]
        ax.scatter([p.l0 for p in pts], [getattr(p, plane) for p in pts], s=12, alpha=0.35, color=color)
        fr = fronts["fronts"].get(f"{m}/{plane}")
        if fr and fr["points"]:
            ax.plot([p["l0"] for p in fr["points"]], [p[plane] for p in fr["points"]], "-o", ms=4, color=color,
                    label=f"{m} (HV {fr['hypervolume_fraction']:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per sample)")
    ax.set_ylabel(label)
    ref = fronts["reference"]
    ax.set_title(f"Sparsity-fidelity Pareto fronts (reference L0={ref['l0']:g}, {label}={ref[plane]:g})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_pareto(uri: str, experiment: str, sweep_id: str, reference: dict[str, float | None]) -> dict[str, Any]:
    """Compute the fronts of a sweep and log them to its parent run (artifacts under ``pareto/``,
    metrics ``hv/<group>/<plane>``, tag ``msae.front_run_ids``). Returns the fronts."""
    from msae.errors import MsaeError

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    parent = tracking.find_run(c, exp.experiment_id, {tracking.SWEEP_TAG: sweep_id, tracking.KIND_TAG: "sweep"}) \
        if exp is not None else None
    if parent is None:
        raise MsaeError(f"sweep {sweep_id}: no parent run in experiment {experiment!r} at {uri}")
    ref = dict(reference)
    if ref.get("l0") is None:
        ref["l0"] = float(parent.data.params.get("n", 0)) or 1.0
    points = collect_points(c, exp.experiment_id, sweep_id)
    fronts = compute_fronts(points, ref)
    rid = parent.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        write_report(fronts, points, Path(tmp) / "pareto")
        c.log_artifacts(rid, str(Path(tmp) / "pareto"), artifact_path="pareto")
    from mlflow.entities import Metric
    import time
    now = int(time.time() * 1000)
    c.log_batch(rid, metrics=[Metric(f"hv/{name}", fr["hypervolume_fraction"], now, 0)
                              for name, fr in fronts["fronts"].items()])
    overall = fronts["fronts"].get("all/fvu", {"run_ids": []})
    c.set_tag(rid, "msae.front_run_ids", ",".join(overall["run_ids"])[:5000])
    fronts["parent_run_id"] = rid
    return fronts


def format_table(fronts: dict[str, Any], plane: str = "fvu") -> str:
    fr = fronts["fronts"].get(f"all/{plane}")
    if not fr or not fr["points"]:
        return "no finished trials: no Pareto front"
    lines = [f"Pareto front (L0, {PLANES[plane]}) over all methods; hypervolume fraction "
             f"{fr['hypervolume_fraction']:.4f} against L0={fronts['reference']['l0']:g}, "
             f"{PLANES[plane]}={fronts['reference'][plane]:g}",
             f"{'L0':>9} {PLANES[plane]:>10}  {'method':<10} {'at':<7} trial"]
    for p in fr["points"]:
        lines.append(f"{p['l0']:9.2f} {p[plane]:10.5f}  {p['method']:<10} {p['at']:<7} {p['trial']}")
    for name, f in sorted(fronts["fronts"].items()):
        if name.endswith(f"/{plane}") and not name.startswith("all/"):
            lines.append(f"  {f['group']:<10} hypervolume fraction {f['hypervolume_fraction']:.4f} "
                         f"({len(f['points'])} points on its front)")
    return "\n".join(lines)
