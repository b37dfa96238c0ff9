"""The C++ CPU kernels of the Matryoshka step (msae/sae/csrc/msae_cpu.cpp), built on first use.

torch.utils.cpp_extension compiles them once per machine (about 25 s; cached under
~/.cache/torch_extensions, keyed by the source and this CPU's instruction set, so a home folder
shared by different machines never runs code built for another CPU). Without a C++ compiler, or
with MSAE_NATIVE=0, :func:`kernels` returns None and the step uses the torch kernels instead.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "msae_cpu.cpp"
_LOCK = threading.Lock()
_STATE: dict = {}


def _cpu_key() -> str:
    """This CPU's model and instruction-set flags (the build uses -march=native)."""
    info = ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        info = "|".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name", "Features", "CPU part"))}))
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{info}".encode()).hexdigest()[:10]


def kernels():
    """The compiled module, or None when it cannot be built (the reason is in :func:`status`)."""
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]
        module, reason = None, "disabled (MSAE_NATIVE=0)"
        if os.environ.get("MSAE_NATIVE", "1") != "0":
            try:
                import logging
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" chatter
                from torch.utils.cpp_extension import load
                flags = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
                module = load(name=f"msae_cpu_{_cpu_key()}", sources=[str(SOURCE)], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], verbose=False)
                reason = "built"
            except Exception as e:  # no compiler, no ninja, a failed build: the torch kernels serve instead
                reason = f"unavailable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:200]})"
                print(f"msae: C++ CPU kernels {reason}; using the slower torch kernels", file=sys.stderr)
        _STATE.update(module=module, reason=reason)
        return module


def status() -> str:
    """'built', 'disabled (...)', 'unavailable (...)' or 'not loaded yet'."""
    return _STATE.get("reason", "not loaded yet")
