"""Terminal progress of a sweep (no Ray here; msae.sweep.callbacks feeds it).

On a terminal: one overall line (done / running / failed out of the total) and one live line per
running trial moving with its epochs, redrawn in place; a line is printed when a trial ends.
Elsewhere (logs, CI): only the lines of trials that end, and the overall count with each.
"""
from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class SweepProgress:
    def __init__(self, total: int, done: int = 0, failed: int = 0, quiet: bool = False, stream=None):
        self.total, self.done, self.failed, self.quiet = total, done, failed, quiet
        self.stream = stream or sys.stderr
        self.live = (not quiet) and self.stream.isatty()
        self.bars: dict[str, tqdm] = {}
        self.overall = tqdm(total=total, initial=done, position=0, file=self.stream, dynamic_ncols=True,
                            bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]", disable=not self.live)
        self._describe()

    def _describe(self) -> None:
        self.overall.set_description_str(f"sweep: {self.done} done, {len(self.bars)} running, {self.failed} failed of")
        self.overall.refresh()

    def say(self, line: str) -> None:
        """A line above the live lines (or plainly, without a terminal)."""
        if self.quiet:
            return
        if self.live:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def started(self, key: str, epochs: int) -> None:
        if key in self.bars or not self.live:
            self.bars.setdefault(key, None)
            return
        used = {b.pos for b in self.bars.values() if b is not None}
        pos = next(p for p in range(1, len(used) + 2) if p not in used and -p not in used)
        self.bars[key] = tqdm(total=epochs, position=pos, leave=False, file=self.stream, dynamic_ncols=True,
                              desc=key, unit="epoch", bar_format="  {desc} {bar:12} epoch {n_fmt}/{total_fmt}{postfix}")
        self._describe()

    def epoch(self, key: str, epoch: int, metrics: dict[str, Any]) -> None:
        bar = self.bars.get(key)
        if bar is None:
            return
        bar.n = epoch
        shown = {k: metrics[k] for k in ("fvu", "l0") if isinstance(metrics.get(k), (int, float))}
        bar.set_postfix_str(" ".join(f"{k}={v:.4g}" for k, v in shown.items()), refresh=False)
        bar.refresh()

    def ended(self, key: str, outcome: str, detail: str) -> None:
        """``outcome``: finished, stopped early, diverged, failed."""
        bar = self.bars.pop(key, None)
        if bar is not None:
            bar.close()
        if outcome in ("finished", "stopped early"):
            self.done += 1
            self.overall.update(1)
        else:
            self.failed += 1
        self._describe()
        self.say(f"[sweep] {key} {outcome}{': ' + detail if detail else ''} "
                 f"({self.done}/{self.total} done, {len(self.bars)} running, {self.failed} failed)")

    def close(self) -> None:
        for bar in self.bars.values():
            if bar is not None:
                bar.close()
        self.bars.clear()
        self.overall.close()
