"""The latent-card report (msae report, docs/interpret.md) of each method's best model on the
sweep's chosen front: the front point nearest the ideal corner (msae.sweep.fronts.best_of_front),
drawn on the primary evaluation cache with the spec's vocabulary."""
from __future__ import annotations

from typing import Any

import numpy as np

from msae import atomic, checkpoint
from msae.data import load_array
from msae.sweep.fronts import PLANES, best_of_front
from msae.sweep.layout import SweepDir

REPORT_ROWS = 20000  # rows of the primary evaluation cache shown (the first ones)


def best_models(fronts: dict[str, Any], plane: str) -> dict[str, str]:
    """method -> trial key of its front's best model."""
    out = {}
    for name, fr in sorted(fronts["fronts"].items()):
        if fr["plane"] != plane or fr["group"] == "all":
            continue
        best = best_of_front(fr, fronts["reference"])
        if best is not None:
            out[fr["group"]] = best["trial"]
    return out


def write_best_reports(sweep: SweepDir, fronts: dict[str, Any], plane: str, eval_path: str, vocab_path: str | None,
                       per_page: int = 200) -> dict[str, str]:
    """Write reports/KEY for each method's best model (replacing an earlier one); method -> key."""
    from msae.cache import is_cache, open_cache
    from msae.interpret.naming import name_latents
    from msae.interpret.report import Samples, latent_stats, write_report

    picks = best_models(fronts, plane)
    if not picks:
        return {}
    if is_cache(eval_path):
        cache = open_cache(eval_path, check_finite=False)
        x, ids, texts, labels = cache.embeddings, cache.ids, cache.texts, cache.labels
    else:
        x = load_array(eval_path, check_finite=False)
        ids, texts, labels = [str(i) for i in range(x.shape[0])], None, None
    x = np.asarray(x[:REPORT_ROWS])
    vocab = open_cache(vocab_path, check_finite=False) if vocab_path else None
    for method, key in picks.items():
        sae = checkpoint.load(sweep.final_sae(key))
        names = scores = named = None
        if vocab is not None:
            nm = name_latents(sae, vocab.embeddings, vocab.texts or vocab.ids, top=5)
            names, scores, named = nm.names, nm.scores, nm.named
        st = latent_stats(sae, x)
        with atomic.replaced_dir(sweep.report_dir(key)) as tmp:
            write_report(sae, st, tmp, Samples(ids, texts, {}, labels), names, scores, named,
                         f"{method}: best model of its (L0, {PLANES[plane]}) front ({key})", per_page)
    return picks
