"""PNG plots of a sweep: the Pareto fronts, and one trial's progressive-recovery curve (each drawn
under the package's one matplotlib lock, msae.plotting)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from msae.plotting import locked as _locked, pyplot as _pyplot


@_locked
def plot_fronts(fronts: dict[str, Any], points: Sequence, plane: str, label: str, path: Path) -> Path:
    """Every point faded (one colour per method), each method's front as a line, the overall front
    in black with each of its points labelled by trial and k."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110)
    methods = sorted({p.method for p in points})
    for i, m in enumerate(methods):
        color = f"C{i}"
        pts = [p for p in points if p.method == m]
        ax.scatter([p.l0 for p in pts], [getattr(p, plane) for p in pts], s=12, alpha=0.3, color=color)
        fr = fronts["fronts"].get(f"{m}/{plane}")
        if fr and fr["points"]:
            ax.plot([p["l0"] for p in fr["points"]], [p[plane] for p in fr["points"]], "-o", ms=4, color=color,
                    lw=1.2, label=f"{m} front (HV {fr['hypervolume_fraction']:.3f})")
    overall = fronts["fronts"].get(f"all/{plane}")
    if overall and overall["points"]:
        xs, ys = [p["l0"] for p in overall["points"]], [p[plane] for p in overall["points"]]
        ax.plot(xs, ys, "--", color="black", lw=1.0, label=f"overall front (HV {overall['hypervolume_fraction']:.3f})")
        import math
        placed: list[tuple[float, float]] = []
        for p, x, y in zip(overall["points"], xs, ys):
            # a label close to one already placed goes below its point instead of above
            near = any(abs(math.log10(x) - math.log10(px)) < 0.08 and abs(math.log10(y) - math.log10(py)) < 0.08
                       for px, py in placed)
            ax.annotate(f"{p['trial']} {p['at']}", (x, y), textcoords="offset points", xytext=(4, -9 if near else 3),
                        fontsize=6, color="0.25")
            placed.append((x, y))
    ax.scatter([], [], s=12, alpha=0.3, color="0.5", label="faded: every point (own code and k-curve) of every trial")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per sample)")
    ax.set_ylabel(label)
    ref = fronts["reference"]
    ax.set_title(f"Sparsity-fidelity Pareto fronts (lower-left is better; hypervolume against "
                 f"L0={ref['l0']:g}, {label}={ref[plane]:g})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@_locked
def plot_curve(curve: list[dict[str, float]], own: dict[str, float] | None, title: str, path: Path) -> Path:
    """One trial's progressive-recovery curve: FVU and 1 - cosine against L0, one point per k."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    for ax, (metric, label) in zip(axes, (("fvu", "FVU"), ("cosine", "1 - cosine"))):
        ys = [p[metric] if metric == "fvu" else 1 - p[metric] for p in curve]
        ax.plot([p["l0"] for p in curve], ys, "-o", ms=3, label="top-k of ReLU(pre)")
        for p, y in zip(curve, ys):
            ax.annotate(f"k={p['k']}", (p["l0"], y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        if own is not None:
            y = own[metric] if metric == "fvu" else 1 - own[metric]
            ax.scatter([own["l0"]], [y], marker="*", s=80, color="C3", zorder=3, label="own code")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L0")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
