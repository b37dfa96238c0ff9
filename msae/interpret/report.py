"""Latent cards: a static, offline HTML report of one SAE on one feature cache.

``DIR/index.html`` (and ``index-2.html``, ...) lists the latents by firing frequency, most frequent
first, with their best vocabulary name; ``DIR/cards-P.html`` holds the cards of index page P: per
latent its top-activating rows (image thumbnails or texts), a histogram of its non-zero activations
and its top vocabulary words. ``DIR/overview.html`` has the figures of paper Sections 4.5-4.6
(decoder orthogonality, activation statistics; matplotlib PNGs). No script, no network: every file
is in DIR. Paginated, so that n = 24,576 latents stay usable.

The statistics take two passes of the model's own code over the rows (:func:`latent_stats`).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from msae.errors import MsaeError

BINS = 20
MARKER = "msae-report.json"
ORTHOGONALITY_SAMPLE = 4096  # latents whose max |cosine| to every other decoder row is drawn (n larger)


@dataclass(frozen=True)
class LatentStats:
    rows: int
    frequency: np.ndarray  # [n] fraction of rows on which the latent fires
    mean: np.ndarray  # [n] mean activation where it fires (0 if never)
    peak: np.ndarray  # [n] largest activation
    top_rows: np.ndarray  # [n, S] rows of the largest activations, best first (-1: fewer firing rows)
    top_values: np.ndarray  # [n, S]
    hist: np.ndarray  # [n, BINS] counts of non-zero activations in equal bins of (0, peak]
    l0: np.ndarray  # [rows] active latents per row


def _batch_size(n: int) -> int:
    return int(max(128, min(4096, 2 ** 26 // max(1, n))))  # at most about 256 MB of codes at once


@torch.no_grad()
def latent_stats(sae, data: np.ndarray, samples: int = 8) -> LatentStats:
    """Frequency, mean and peak activation, the top ``samples`` rows and an activation histogram of
    every latent of the model's own code, in two passes over ``data``."""
    n, rows = sae.n, data.shape[0]
    if rows < 1:
        raise MsaeError("report: --data has no rows")
    device = sae.W_enc.device
    bs = _batch_size(n)
    S = max(1, min(samples, rows))
    count = torch.zeros(n, dtype=torch.float64, device=device)
    total = torch.zeros(n, dtype=torch.float64, device=device)
    peak = torch.zeros(n, device=device)
    top_v = torch.full((S, n), -1.0, device=device)
    top_i = torch.full((S, n), -1, dtype=torch.long, device=device)
    l0 = np.empty(rows, dtype=np.int32)
    codes = lambda s: sae.encode(torch.from_numpy(np.array(data[s:s + bs], dtype=np.float32)).to(device))  # noqa: E731
    for s in range(0, rows, bs):
        z = codes(s)
        fires = z > 0
        count += fires.sum(0).double()
        total += z.sum(0).double()
        peak = torch.maximum(peak, z.max(0).values)
        l0[s:s + z.shape[0]] = fires.sum(1).cpu().numpy()
        idx = torch.arange(s, s + z.shape[0], device=device)[:, None].expand_as(z)
        vals, pos = torch.cat([top_v, z]).topk(S, dim=0)
        top_i = torch.cat([top_i, idx]).gather(0, pos)
        top_v = vals
    hist = torch.zeros(n * BINS, dtype=torch.float64, device=device)
    scale = BINS / peak.clamp_min(1e-30)
    for s in range(0, rows, bs):
        z = codes(s)
        r, j = (z > 0).nonzero(as_tuple=True)
        b = (z[r, j] * scale[j]).ceil().long().clamp(1, BINS) - 1
        hist.scatter_add_(0, j * BINS + b, torch.ones_like(b, dtype=torch.float64))
    top_i = torch.where(top_v > 0, top_i, -1)
    freq = (count / rows).cpu().numpy()
    mean = (total / count.clamp_min(1)).cpu().numpy()
    return LatentStats(rows, freq, mean, peak.cpu().numpy(), top_i.T.cpu().numpy(), top_v.T.clamp_min(0).cpu().numpy(),
                       hist.view(n, BINS).cpu().numpy(), l0)


@torch.no_grad()
def max_decoder_cosine(W_dec: torch.Tensor, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(latents, their largest |cosine| to any other decoder row); every latent when n <= 4096,
    else a seeded sample of 4096 of them (each still against all n rows)."""
    W = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    n = W.shape[0]
    pick = np.arange(n) if n <= ORTHOGONALITY_SAMPLE else \
        np.sort(np.random.default_rng(seed).choice(n, ORTHOGONALITY_SAMPLE, replace=False))
    out = np.empty(pick.size, dtype=np.float32)
    for s in range(0, pick.size, 1024):
        rows = torch.from_numpy(pick[s:s + 1024])
        c = (W[rows] @ W.T).abs()
        c[torch.arange(rows.numel()), rows] = 0
        out[s:s + 1024] = c.max(1).values.numpy()
    return pick, out


# ---------------------------------------------------------------- figures (matplotlib, Agg)

def _figures(sae, st: LatentStats, folder: Path) -> dict[str, float]:
    from msae.metrics import decoder_orthogonality
    from msae.plotting import LOCK, pyplot

    _, maxcos = max_decoder_cosine(sae.W_dec)
    ortho = decoder_orthogonality(torch.nn.functional.normalize(sae.W_dec.detach().double().cpu(), dim=1))
    alive = st.frequency > 0
    with LOCK:
        plt = pyplot()
        fig, ax = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        ax[0].hist(maxcos, bins=50, color="C0")
        ax[0].set_xlabel("largest |cosine| to another decoder row")
        ax[0].set_ylabel("latents")
        ax[0].set_title(f"Decoder orthogonality (mean off-diagonal cos² = {ortho:.2e})")
        ax[1].hist(_random_pair_cosines(sae.W_dec), bins=60, color="C1")
        ax[1].set_xlabel("cosine between two random decoder rows")
        ax[1].set_title("Decoder rows, random pairs")
        fig.tight_layout()
        fig.savefig(folder / "orthogonality.png")
        plt.close(fig)
        fig, ax = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
        if alive.any():
            ax[0].hist(np.log10(st.frequency[alive]), bins=50, color="C2")
            ax[1].scatter(np.log10(st.frequency[alive]), st.mean[alive], s=4, alpha=0.5, color="C3")
        ax[0].set_xlabel("log10 firing frequency")
        ax[0].set_ylabel("latents")
        ax[0].set_title(f"Firing frequency ({int((~alive).sum())} latents never fire)")
        ax[1].set_xlabel("log10 firing frequency")
        ax[1].set_ylabel("mean activation when firing")
        ax[1].set_title("Activation magnitude against frequency")
        ax[2].hist(st.l0, bins=50, color="C4")
        ax[2].set_xlabel("active latents per row (L0)")
        ax[2].set_ylabel("rows")
        ax[2].set_title(f"L0 per row (mean {st.l0.mean():.1f})")
        fig.tight_layout()
        fig.savefig(folder / "activations.png")
        plt.close(fig)
    return {"decoder_orthogonality": float(ortho), "mean_max_cosine": float(maxcos.mean())}


def _random_pair_cosines(W_dec: torch.Tensor, pairs: int = 100_000, seed: int = 0) -> np.ndarray:
    W = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(W.shape[0], (2, pairs), generator=g)
    keep = a != b
    return (W[a[keep]] * W[b[keep]]).sum(1).numpy()


# ---------------------------------------------------------------- HTML

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}
td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}td.l,th.l{text-align:left}
a{color:#0b5cad;text-decoration:none}.nav{margin:12px 0}.nav a,.nav b{margin-right:6px}
.card{border:1px solid #ccc;border-radius:6px;padding:10px 14px;margin:14px 0;display:flex;gap:18px}
.card h3{margin:0 0 6px}.meta{color:#555;min-width:230px}.samples{display:flex;flex-wrap:wrap;gap:8px;flex:1;align-content:flex-start;align-items:flex-start}
.s{width:110px;font-size:12px;word-break:break-word}.s img{width:96px;height:96px;object-fit:cover;display:block}
.t{width:170px;font-size:12px;border-left:3px solid #9bd;padding-left:6px}.dead{color:#999}"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def _nav(pages: int, current: int, prefix: str) -> str:
    def name(p: int) -> str:
        return f"{prefix}.html" if p == 1 and prefix == "index" else f"{prefix}-{p}.html"
    shown = sorted({1, pages, *range(max(1, current - 3), min(pages, current + 3) + 1)})
    parts, last = [], 0
    for p in shown:
        if p > last + 1:
            parts.append("…")
        parts.append(f"<b>{p}</b>" if p == current else f"<a href='{name(p)}'>{p}</a>")
        last = p
    return f"<div class='nav'>page {' '.join(parts)} of {pages} · <a href='overview.html'>overview</a></div>"


def _svg_hist(counts: np.ndarray, peak: float) -> str:
    """A small inline SVG bar chart of one latent's activation histogram (log-scaled heights)."""
    w, h, bw = 200, 60, 200 / len(counts)
    top = math.log1p(float(counts.max())) if counts.max() > 0 else 1.0
    bars = "".join(f"<rect x='{i * bw:.1f}' y='{h - v:.1f}' width='{bw - 1:.1f}' height='{v:.1f}' fill='#4a86c5'/>"
                   for i, c in enumerate(counts) if (v := h * math.log1p(float(c)) / top) > 0)
    return (f"<svg width='{w}' height='{h + 14}' role='img'><title>activations in (0, {peak:.3g}], "
            f"log-scaled counts</title>{bars}<text x='0' y='{h + 12}' font-size='10'>0</text>"
            f"<text x='{w}' y='{h + 12}' font-size='10' text-anchor='end'>{peak:.3g}</text></svg>")


@dataclass(frozen=True)
class Samples:
    """How a row is shown: an image thumbnail (file name in DIR/thumbs) or its text/id."""
    ids: Sequence[str]
    texts: Sequence[str] | None
    thumbs: dict[int, str]
    labels: Sequence[str] | None = None  # the cache's class labels, shown beside the id

    def html(self, row: int, value: float) -> str:
        label = html.escape(self.ids[row] + (f" [{self.labels[row]}]" if self.labels else ""))
        if row in self.thumbs:
            return (f"<div class='s'><img src='thumbs/{self.thumbs[row]}' alt='{label}' loading='lazy'>"
                    f"{label}<br>{value:.3g}</div>")
        if self.texts:
            return (f"<div class='t'>{html.escape(self.texts[row])}<br>"
                    f"<span class='meta'>{label} · {value:.3g}</span></div>")
        return f"<div class='t'>{label}<br><span class='meta'>activation {value:.3g}</span></div>"


def make_thumbnails(rows: Sequence[int], ids: Sequence[str], root: Path, folder: Path, size: int = 96) -> tuple[dict[int, str], int]:
    """thumbs/ROW.jpg for every row whose image ROOT/ID opens; returns (row -> file, failures)."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    out, failed = {}, 0
    for r in sorted(set(int(r) for r in rows if r >= 0)):
        try:
            with Image.open(root / ids[r]) as im:
                im = im.convert("RGB")
                im.thumbnail((size * 2, size * 2))
                im.save(folder / f"{r}.jpg", quality=85)
            out[r] = f"{r}.jpg"
        except Exception:  # noqa: BLE001 - PIL raises many types; the row falls back to its id
            failed += 1
    return out, failed


def write_report(sae, st: LatentStats, folder: Path, samples: Samples, names: list[list[str]] | None,
                 scores: np.ndarray | None, named: np.ndarray | None, title: str, per_page: int = 200) -> dict:
    """Write the index pages, the card pages and the overview into ``folder`` (which exists)."""
    figs = _figures(sae, st, folder)
    order = np.lexsort((np.arange(sae.n), -st.frequency))  # most frequent first, then by index
    pages = max(1, math.ceil(sae.n / per_page))
    page_of = {int(j): i // per_page + 1 for i, j in enumerate(order)}

    def label(j: int) -> str:
        if names is None:
            return ""
        return html.escape(names[j][0]) + ("" if named is None or named[j] else " <span class='dead'>(unnamed)</span>")

    for p in range(1, pages + 1):
        chunk = order[(p - 1) * per_page:p * per_page]
        head = ("<tr><th>rank</th><th>latent</th>" + ("<th class='l'>name</th><th>score</th>" if names else "")
                + "<th>frequency</th><th>mean act.</th><th>peak</th></tr>")
        rows = []
        for rank, j in enumerate(chunk, (p - 1) * per_page + 1):
            j = int(j)
            cls = " class='dead'" if st.frequency[j] == 0 else ""
            rows.append(f"<tr{cls}><td>{rank}</td><td><a href='cards-{p}.html#l{j}'>{j}</a></td>"
                        + (f"<td class='l'>{label(j)}</td><td>{scores[j, 0]:.3f}</td>" if names else "")
                        + f"<td>{st.frequency[j]:.5f}</td><td>{st.mean[j]:.4g}</td><td>{st.peak[j]:.4g}</td></tr>")
        body = (f"<h1>{html.escape(title)}</h1><p>{sae.n} latents, {st.rows} rows; sorted by firing frequency. "
                + (f"{int(named.sum())} latents named. " if named is not None else "")
                + f"Cards of this page: <a href='cards-{p}.html'>cards-{p}.html</a>.</p>"
                + _nav(pages, p, "index") + f"<table>{head}{''.join(rows)}</table>" + _nav(pages, p, "index"))
        (folder / ("index.html" if p == 1 else f"index-{p}.html")).write_text(_page(title, body), encoding="utf-8")
        cards = []
        for j in (int(j) for j in chunk):
            shown = [(int(r), float(v)) for r, v in zip(st.top_rows[j], st.top_values[j]) if r >= 0]
            words = "" if names is None else "<br>".join(
                f"{html.escape(w)} ({s:.3f})" for w, s in zip(names[j], scores[j]))
            cards.append(
                f"<div class='card' id='l{j}'><div class='meta'><h3>latent {j}</h3>"
                + (f"<b>{label(j)}</b><br>" if names else "")
                + f"frequency {st.frequency[j]:.5f}<br>mean activation {st.mean[j]:.4g}<br>peak {st.peak[j]:.4g}<br>"
                + _svg_hist(st.hist[j], float(st.peak[j]))
                + (f"<br><b>top words</b><br>{words}" if words else "") + "</div><div class='samples'>"
                + ("".join(samples.html(r, v) for r, v in shown) or "<i class='dead'>never fires on these rows</i>")
                + "</div></div>")
        body = (f"<h1>{html.escape(title)}: cards, page {p}</h1><p><a href='{'index.html' if p == 1 else f'index-{p}.html'}'>"
                f"back to the index</a></p>" + _nav(pages, p, "cards") + "".join(cards) + _nav(pages, p, "cards"))
        (folder / f"cards-{p}.html").write_text(_page(title, body), encoding="utf-8")
    dead = int((st.frequency == 0).sum())
    summary = {"format": "msae-report", "n": sae.n, "d": sae.d, "rows": st.rows, "pages": pages,
               "per_page": per_page, "dead_latents": dead, "mean_l0": float(st.l0.mean()),
               "named_latents": None if named is None else int(named.sum()), **figs}
    body = (f"<h1>{html.escape(title)}: overview</h1><p><a href='index.html'>back to the index</a></p>"
            f"<p>Mean off-diagonal squared cosine of the unit decoder rows: {figs['decoder_orthogonality']:.3e}; mean "
            f"largest |cosine| of a latent to another decoder row: {figs['mean_max_cosine']:.4f}"
            f"{' (over a sample of 4096 latents)' if sae.n > ORTHOGONALITY_SAMPLE else ''}.</p>"
            "<img src='orthogonality.png' alt='decoder orthogonality' style='max-width:100%'>"
            f"<p>{dead} of {sae.n} latents never fire on the {st.rows} rows; mean L0 {st.l0.mean():.2f}.</p>"
            "<img src='activations.png' alt='activation statistics' style='max-width:100%'>")
    (folder / "overview.html").write_text(_page(title, body), encoding="utf-8")
    (folder / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
