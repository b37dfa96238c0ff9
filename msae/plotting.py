"""matplotlib for the whole package: the Agg backend, and one lock under which every figure is drawn
(matplotlib is not thread-safe: a sweep's tracking thread plots curves while the driver plots fronts)."""
from __future__ import annotations

import functools
import threading

LOCK = threading.Lock()


def locked(fn):
    """Run ``fn`` under :data:`LOCK`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with LOCK:
            return fn(*args, **kwargs)
    return wrapper


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
