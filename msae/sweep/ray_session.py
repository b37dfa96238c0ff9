"""The Ray a sweep runs on: a private local Ray bound to 127.0.0.1, or a running cluster joined by
address; started (or joined) on entry and shut down on exit, with the sweep's cache broker."""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass

from msae.errors import MsaeError
from msae.sweep.shared import SweepData, start_broker, stop_broker

_FORWARD_ENV = ("MSAE_", "MLFLOW_", "MALLOC_")


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: msae/MLflow settings of the driver, and a fixed glibc mmap
    threshold (1 MiB) so that freed batch buffers go back to the OS instead of growing the heap."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_ENV)}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    return env


def confine_to_loopback() -> None:
    """Make the Ray this process starts listen on and advertise 127.0.0.1 only.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported; setting the variable later
    does nothing for this process. So both: the variable for the processes Ray starts (they
    inherit it), and Ray's constant in this process, whenever Ray was imported."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as constants
    constants.ENABLE_RAY_CLUSTER = False


def _object_store_size(need: int) -> int | None:
    """Object store size for a local Ray: Ray's default unless the arrays served through it need
    more (then their size plus 10% and 256 MiB), capped at 60% of the machine's memory."""
    if need <= 0:
        return None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    want = int(need * 1.1) + (256 << 20)
    if want <= 0.3 * total:
        return None
    cap = int(0.6 * total)
    if want > cap:
        print(f"msae sweep: {need / 2**30:.1f} GiB of arrays go through Ray's object store, more than it can hold "
              f"here ({cap / 2**30:.1f} GiB); Ray will spill them to disk. Store caches as float32 and keep "
              "data.share: auto so that trials map the files instead.", file=sys.stderr)
        return cap
    return want


@dataclass
class RaySession:
    address: str | None  # None: a private local Ray
    sweep_id: str
    data: SweepData
    started: bool = False

    @property
    def cluster(self) -> bool:
        return self.address is not None

    def __enter__(self) -> "RaySession":
        import ray

        if ray.is_initialized():  # a caller's own Ray (tests, notebooks): use it as it is
            self._broker()
            return self
        runtime_env = {"env_vars": worker_env()}
        if self.address:
            # inside a Ray job the job's own runtime env is merged with ours instead of refusing the overlap
            os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
            try:
                ray.init(address=self.address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise MsaeError(f"--address {self.address}: cannot join the Ray cluster ({str(e).splitlines()[0]})") from e
        else:
            confine_to_loopback()
            tmp = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
            ray.init(address="local", _temp_dir=tmp, include_dashboard=False, log_to_driver=False,
                     runtime_env=runtime_env, configure_logging=True, logging_level="ERROR",
                     object_store_memory=_object_store_size(self.data.object_store_bytes()))
        self.started = True
        self._no_colour_reset_at_exit()
        self._broker()
        return self

    @staticmethod
    def _no_colour_reset_at_exit() -> None:
        """Ray's CLI logger initialises colorama on import, which writes a stray ESC[0m to the
        terminal when the process exits; drop that exit handler."""
        import atexit
        import sys as _sys
        module = _sys.modules.get("colorama.initialise")
        if module is not None:
            atexit.unregister(module.reset_all)

    def _broker(self) -> None:
        if self.cluster or self.data.share == "object_store" or self.data.object_store_bytes():
            start_broker(self.sweep_id, self.data)

    def __exit__(self, *exc) -> None:
        import ray

        try:
            stop_broker(self.sweep_id)
        finally:
            if self.started:
                ray.shutdown()
