"""Launching an MLflow tracking server (or UI) with lean settings, bound to 127.0.0.1 by default."""
from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request

from msae.errors import MsaeError


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def server_command(backend_uri: str, host: str = "127.0.0.1", port: int = 5000,
                   artifacts_destination: str | None = None, workers: int = 1) -> list[str]:
    """``mlflow server`` with one worker; with ``artifacts_destination`` it proxies artifacts
    (clients upload through the server, so nodes need no access to the artifact store)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", host,
           "--port", str(port), "--workers", str(workers)]
    if artifacts_destination:
        cmd += ["--serve-artifacts", "--artifacts-destination", artifacts_destination]
    return cmd


def server_env() -> dict[str, str]:
    """Lean: no background job runner (about 0.5 GB and 8 s to start instead of 2.4 GB and 40 s)."""
    return dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")


def check_bind(host: str, port: int) -> None:
    if not port_free(host, port):
        raise MsaeError(f"--port {port}: {host}:{port} is already in use; choose another port")


def wait_healthy(url: str, timeout: float = 120.0, proc=None) -> bool:
    """Poll ``url``/health until it answers 200; False on timeout or when ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False
