"""Launching an MLflow tracking server (or UI) with lean settings, bound to 127.0.0.1 by default."""
from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request

from msae import atomic
from msae.errors import MsaeError


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR, as servers set it: a port
    held only by TIME-WAIT sockets of a server that just stopped is free to listen on again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        if health_error(url) is None:
            return True
        time.sleep(0.5)
    return False


def health_error(url: str, timeout: float = 5.0) -> str | None:
    """One probe of ``url``/health: None when it answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return None if r.status == 200 else f"health check answered {r.status}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


PID_FILE, LOG_FILE = "server.pid", "server.log"


def serve_ui(tracking_uri: str, host: str, port: int, links: list[str] | None = None) -> int:
    """``msae ui``: an MLflow server in its own process group, in the foreground; Ctrl-C or SIGTERM
    stops the whole group (mlflow, its uvicorn workers), so nothing keeps listening after it.
    ``links``: lines to print first (the sweeps' dashboard links)."""
    import signal
    import subprocess

    check_bind(host, port)
    print(f"MLflow dashboard for {tracking_uri} at http://{host}:{port} (Ctrl-C stops it)", file=sys.stderr)
    if links:
        print("the latest sweep of each experiment (its runs and front):\n" + "\n".join(links), file=sys.stderr)
    proc = subprocess.Popen(server_command(tracking_uri, host, port), env=server_env(), start_new_session=True)
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _stop_group(proc.pid)
    return 0 if stopping else code


def _stop_group(pgid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group we started, SIGKILL what is left after ``timeout``."""
    import signal
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_server(backend_uri: str, artifacts: str, host: str, port: int, state_dir: str | os.PathLike,
                 timeout: float = 180.0) -> dict:
    """Start ``mlflow server`` detached (its own process group), wait for its health check, record its PID."""
    import subprocess
    from pathlib import Path

    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    running = server_status(state)
    if running["running"]:
        raise MsaeError(f"tracking server already running (pid {running['pid']}, {running['url']}); "
                        f"stop it first: msae tracking-server stop --state-dir {state}")
    if backend_uri.startswith("sqlite:///"):
        folder = Path(backend_uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise MsaeError(f"--backend-uri {backend_uri}: folder {folder} does not exist")
    check_bind(host, port)
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = str(Path(artifacts).resolve())
    log = open(state / LOG_FILE, "ab")
    proc = subprocess.Popen(server_command(backend_uri, host, port, artifacts_destination=artifacts),
                            env=server_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    url = f"http://{host}:{port}"
    info = {"pid": proc.pid, "url": url, "backend_uri": backend_uri, "artifacts": artifacts, "host": host, "port": port}
    atomic.write_json(state / PID_FILE, info)
    if not wait_healthy(url, timeout, proc):
        stop_server(state)
        tail = (state / LOG_FILE).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise MsaeError(f"tracking server did not become healthy at {url} within {timeout:.0f} s ({tail[0][:200]}); "
                        f"log: {state / LOG_FILE}")
    return info


def server_status(state_dir: str | os.PathLike) -> dict:
    import json
    from pathlib import Path

    pid_file = Path(state_dir) / PID_FILE
    if not pid_file.is_file():
        return {"running": False}
    info = json.loads(pid_file.read_text())
    alive = _alive(info["pid"])
    healthy = alive and wait_healthy(info["url"], timeout=3)
    return {**info, "running": alive, "healthy": healthy}


def stop_server(state_dir: str | os.PathLike, timeout: float = 30.0) -> bool:
    """SIGTERM the server's process group (we started it as its own session), SIGKILL after ``timeout``."""
    import json
    from pathlib import Path

    pid_file = Path(state_dir) / PID_FILE
    if not pid_file.is_file():
        return False
    pid = json.loads(pid_file.read_text())["pid"]
    if _alive(pid):
        _stop_group(pid, timeout)
    pid_file.unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as stopped
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
