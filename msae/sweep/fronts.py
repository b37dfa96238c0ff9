"""Pareto fronts of a sweep, computed from its folder (no tracking store needed).

Each finished trial contributes its own operating point (L0, FVU, 1 - cosine, and the probe KL
when the spec has an ``evaluation.probe``) on the primary evaluation cache; trials of methods with a
progressive-recovery curve (TopK, BatchTopK, MSAE) also contribute every point of that curve
(k = 16, 32, ..., n).
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from msae import atomic
from msae.pareto import hypervolume, pareto_front
from msae.sweep.layout import SweepDir

PLANES = {"fvu": "FVU", "one_minus_cosine": "1 - cosine", "probe_kl": "probe KL"}
NAN = float("nan")


@dataclass(frozen=True)
class Point:
    trial: str  # the trial key
    method: str
    at: str  # "own" (the model's own code) or "k=16", ...
    l0: float
    fvu: float
    one_minus_cosine: float
    probe_kl: float = NAN  # NaN: no probe in the spec


def _kl(m: dict[str, Any]) -> float:
    v = m.get("probe_kl")
    return float(v) if isinstance(v, (int, float)) else NAN


def collect_points(sweep: SweepDir) -> list[Point]:
    points = []
    for key, result in sweep.results().items():
        if result.get("status") != "finished":
            continue
        m = result.get("metrics", {})
        method = (sweep.trial(key) or {}).get("method", key.split("_", 1)[0])
        if all(isinstance(m.get(k), (int, float)) for k in ("l0", "fvu", "cosine")):
            points.append(Point(key, method, "own", m["l0"], m["fvu"], 1 - m["cosine"], _kl(m)))
        for p in result.get("curve", []):
            points.append(Point(key, method, f"k={p['k']}", p["l0"], p["fvu"], 1 - p["cosine"], _kl(p)))
    return points


def _plain(p: Point) -> dict[str, Any]:
    return {k: (None if v != v else v) for k, v in asdict(p).items()}  # NaN (no probe KL): null in JSON


def planes(points: list[Point], reference: dict[str, float]) -> list[str]:
    """The planes with data: FVU and 1 - cosine always, the probe KL when some point has one."""
    return [p for p in PLANES if p != "probe_kl" or ("probe_kl" in reference and any(q.probe_kl == q.probe_kl
                                                                                      for q in points))]


def best_of_front(front: dict[str, Any], reference: dict[str, float]) -> dict[str, Any] | None:
    """A front's best model: the point nearest the ideal corner (0, 0) with both axes divided by the
    reference point (the knee of the front)."""
    plane = front["plane"]
    pts = front["points"]
    if not pts:
        return None
    return min(pts, key=lambda p: (p["l0"] / reference["l0"]) ** 2 + (p[plane] / reference[plane]) ** 2)


def compute_fronts(points: list[Point], reference: dict[str, float]) -> dict[str, Any]:
    """Fronts per method and overall ("all") on each plane, with hypervolume against ``reference``
    (keys l0, fvu, one_minus_cosine) and the hypervolume as a fraction of the reference box."""
    groups = {"all": points}
    for p in points:
        groups.setdefault(p.method, []).append(p)
    out: dict[str, Any] = {"reference": reference, "fronts": {}}
    for plane in planes(points, reference):
        ref = (reference["l0"], reference[plane])
        for group, pts in sorted(groups.items()):
            pts = [p for p in pts if getattr(p, plane) == getattr(p, plane)]  # the probe KL may be missing
            xy = [(p.l0, getattr(p, plane)) for p in pts]
            front = [pts[i] for i in pareto_front(xy)]
            hv = hypervolume(xy, ref)
            out["fronts"][f"{group}/{plane}"] = {
                "group": group, "plane": plane, "hypervolume": hv, "hypervolume_fraction": hv / (ref[0] * ref[1]),
                "points": [_plain(p) for p in front], "trials": sorted({p.trial for p in front})}
    return out


def format_table(fronts: dict[str, Any], plane: str = "fvu", markdown: bool = False) -> str:
    """The overall front, whole, as a terminal table (or markdown), then each method's hypervolume."""
    fr = fronts["fronts"].get(f"all/{plane}")
    if not fr or not fr["points"]:
        return "no finished trials: no Pareto front"
    ref = fronts["reference"]
    head = (f"Pareto front (L0, {PLANES[plane]}) over all methods: {len(fr['points'])} points, hypervolume fraction "
            f"{fr['hypervolume_fraction']:.4f} against L0={ref['l0']:g}, {PLANES[plane]}={ref[plane]:g}")
    note = ("'at' is where on a trial's curve the point lies: 'own' is the model's own code, 'k=16' its "
            "progressive-recovery point with the top-16 latents of ReLU(pre)")
    methods = [(f["group"], f["hypervolume_fraction"], len(f["points"])) for name, f in sorted(fronts["fronts"].items())
               if name.endswith(f"/{plane}") and not name.startswith("all/")]
    if markdown:
        lines = [head, "", f"| L0 | {PLANES[plane]} | method | at | trial |", "|---:|---:|---|---|---|"]
        lines += [f"| {p['l0']:.2f} | {p[plane]:.5f} | {p['method']} | {p['at']} | `{p['trial']}` |" for p in fr["points"]]
        lines += ["", note + ".", "", "| method | hypervolume fraction | points on its front |", "|---|---:|---:|"]
        lines += [f"| {g} | {hv:.4f} | {n} |" for g, hv, n in methods]
        return "\n".join(lines)
    lines = [head, f"{'L0':>9} {PLANES[plane]:>10}  {'method':<10} {'at':<7} trial"]
    lines += [f"{p['l0']:9.2f} {p[plane]:10.5f}  {p['method']:<10} {p['at']:<7} {p['trial']}" for p in fr["points"]]
    lines.append(f"({note})")
    lines += [f"  {g:<10} hypervolume fraction {hv:.4f} ({n} points on its front)" for g, hv, n in methods]
    return "\n".join(lines)


def write_report(fronts: dict[str, Any], points: list[Point], folder: Path) -> list[Path]:
    """fronts.json, fronts.csv (front points), points.csv (all points) and one PNG per plane."""
    from msae.sweep.plots import plot_fronts

    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(folder / "fronts.json", json.dumps(fronts, indent=2))
    rows = [["front", "trial", "method", "at", "l0", "fvu", "one_minus_cosine", "probe_kl"]]
    rows += [[name, p["trial"], p["method"], p["at"], p["l0"], p["fvu"], p["one_minus_cosine"], p["probe_kl"]]
             for name, fr in fronts["fronts"].items() for p in fr["points"]]
    _write_csv(folder / "fronts.csv", rows)
    _write_csv(folder / "points.csv", [["trial", "method", "at", "l0", "fvu", "one_minus_cosine", "probe_kl"]]
               + [[p.trial, p.method, p.at, p.l0, p.fvu, p.one_minus_cosine, p.probe_kl] for p in points])
    files = [folder / "fronts.json", folder / "fronts.csv", folder / "points.csv"]
    for plane in planes(points, fronts["reference"]):
        label = PLANES[plane]
        if points:  # no finished trial yet (an interrupted sweep): tables only
            files.append(plot_fronts(fronts, points, plane, label, folder / f"pareto_{plane}.png"))
    return files


def _write_csv(path: Path, rows: list[list]) -> None:
    import io
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    atomic.write_text(path, buf.getvalue())


def sweep_fronts(sweep: SweepDir, reference: dict[str, float]) -> dict[str, Any]:
    """Compute the fronts of ``sweep`` and write them to its ``pareto/`` folder."""
    points = collect_points(sweep)
    fronts = compute_fronts(points, reference)
    write_report(fronts, points, sweep.pareto_dir)
    return fronts
