#!/usr/bin/env python
"""Run a sweep spec on the running Ray cluster, from its head node.

    ray submit ray_cluster.yaml scripts/cluster_sweep.py -- sweeps/paper-vitl14-x8.yaml [--resume]
    ray job submit --address http://127.0.0.1:8265 -- python scripts/cluster_sweep.py sweeps/demo.yaml

It changes to the project folder on the head (MSAE_PROJECT_DIR, default ~/msae, where the cluster
config syncs this checkout), starts the shared MLflow server there if it is not answering, and
runs `msae sweep SPEC` with the cluster's settings, the only ones that differ from a local run:
  --address          RAY_ADDRESS, default auto (the cluster this node belongs to)
  --storage          MSAE_STORAGE, default /mnt/msae/sweeps (a path every node reaches)
  --tracking-uri     MSAE_TRACKING_URI, default http://127.0.0.1:5000 (the head's server)
Extra arguments after the spec (e.g. --resume, --gpu 0.25) are passed to `msae sweep`.
"""
from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: cluster_sweep.py SPEC.yaml [msae sweep options]", file=sys.stderr)
        return 2
    project = os.path.expanduser(os.environ.get("MSAE_PROJECT_DIR", "~/msae"))
    storage = os.environ.get("MSAE_STORAGE", "/mnt/msae/sweeps")
    tracking = os.environ.get("MSAE_TRACKING_URI", "http://127.0.0.1:5000")
    os.chdir(project)
    from msae.sweep.server import wait_healthy

    if tracking.startswith("http://127.0.0.1") and not wait_healthy(tracking, timeout=3):
        subprocess.run([os.path.join(project, "mlflow", "tracking-server.sh"), "start"], check=True)
    from msae.cli import main as msae_main

    return msae_main(["sweep", *argv, "--address", os.environ.get("RAY_ADDRESS", "auto"), "--storage", storage,
                      "--tracking-uri", tracking])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
