"""The paper's data size on this machine: a 2.9M x 768 float32 cache (CC3M through ViT-L/14, 8.9 GB) swept
with 2 TopK trials x 1 epoch (expansion 1), and `msae evaluate` on a 1.28M-row cache (ImageNet train).

Measured in one run, from outside the processes (psutil, /proc): time from `msae sweep` start to each
trial's first training step, peak private memory (RssAnon) of the driver and of each trial, peak object
store use (/dev/shm), bytes written to disk (/proc/diskstats), and the same for `msae evaluate`.
Ratios are printed against the cache size (private memory, object store, disk) and the 30 s target.

Usage: python bench/scale.py [--rows 2900000] [--eval-rows 1280000] [--out bench-out/scale]
       (needs about 2.2x the cache size of free disk; the caches are kept for reruns unless --clean)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

D = 768


def make_cache(path: Path, rows: int, seed: int, chunk: int = 100_000) -> float:
    """A synthetic CLIP-like cache of ``rows`` x 768 written chunk by chunk (bounded memory)."""
    from msae.atomic import scratch_file
    from msae.cache import write_cache
    from msae.synthetic import make_world, sample

    if path.is_file():
        return 0.0
    t0 = time.time()
    world = make_world(d=D, roots=64, branching=(3, 2), seed=0)
    with scratch_file(path) as raw:
        mm = np.memmap(raw, dtype=np.float32, mode="w+", shape=(rows, D))
        for i, s in enumerate(range(0, rows, chunk)):
            mm[s:s + chunk] = sample(world, min(chunk, rows - s), "image", seed * 100_000 + i).x
        mm.flush()
        write_cache(path, mm, [str(i) for i in range(rows)], model="synthetic", pretrained="none", modality="image",
                    source=f"bench/scale.py rows={rows} seed={seed}", split="train")
        del mm
    return time.time() - t0


def _disk_sectors() -> int:
    dev = os.stat("/").st_dev
    major, minor = os.major(dev), os.minor(dev)
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if int(p[0]) == major and int(p[1]) == minor:
                return int(p[9])
    return 0


def _anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))
    except (OSError, StopIteration):
        return 0


def _title(p) -> str:
    """A process's title: Ray workers set theirs (ray::ImplicitFunc.train is a trial) in the command line."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    return p.name()


class Monitor:
    """Samples the private memory of a process tree (and of Ray processes of ``ray_tmp``), /dev/shm use and
    disk writes every 0.5 s while a command runs; the process list is refreshed every 3 s (cheaply: the
    monitor must not compete with the trials for the 2 cores)."""

    def __init__(self, root_pid: int, ray_tmp: str | None = None):
        import psutil
        self.psutil, self.root, self.ray_tmp = psutil, root_pid, ray_tmp
        self.peak_pid: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.shm0 = shutil.disk_usage("/dev/shm").used
        self.shm_peak = 0
        self.disk0 = _disk_sectors()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _procs(self):
        ps = self.psutil
        out = {}
        try:
            r = ps.Process(self.root)
            out = {p.pid: p for p in [r] + r.children(recursive=True)}
        except ps.NoSuchProcess:
            pass
        if self.ray_tmp:
            for p in ps.process_iter(["cmdline"]):
                try:
                    if any(self.ray_tmp in c for c in (p.info["cmdline"] or [])):
                        out[p.pid] = p
                except (ps.NoSuchProcess, ps.AccessDenied):
                    pass
        return out.values()

    def _loop(self):
        procs, listed = [], 0.0
        while not self._stop.is_set():
            if time.time() - listed > 3:
                procs, listed = list(self._procs()), time.time()
                for p in procs:  # titles change: Ray workers rename themselves once they run a task
                    try:
                        self.names[p.pid] = "driver" if p.pid == self.root else _title(p)
                    except Exception:
                        pass
            for p in procs:
                try:
                    self.peak_pid[p.pid] = max(self.peak_pid.get(p.pid, 0), _anon(p.pid))
                except Exception:  # the process ended between listing and reading
                    pass
            self.shm_peak = max(self.shm_peak, shutil.disk_usage("/dev/shm").used - self.shm0)
            self._stop.wait(0.5)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        peak = {f"{self.names.get(pid, '?')} [{pid}]" if pid != self.root else "driver": b
                for pid, b in self.peak_pid.items()}
        return {"peak_private_bytes": peak, "shm_peak_bytes": self.shm_peak,
                "disk_written_bytes": (_disk_sectors() - self.disk0) * 512}


def run_sweep(out: Path, train: Path, evalset: Path) -> dict:
    import yaml
    spec = {"name": "scale", "data": {"train": str(train), "eval": {"val": str(evalset)}},
            "expansion": 1, "methods": {"topk": {"lr": [5e-4, 1e-3], "k": [64]}},
            "training": {"epochs": 1, "batch_size": 4096, "progressive": False, "epoch_eval_rows": 65536},
            "resources": {"cpus": 1}, "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}"},
            "storage": str(out / "sweeps")}
    (out / "scale.yaml").write_text(yaml.safe_dump(spec))
    ray_tmp = tempfile.mkdtemp(prefix="msae-ray-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, MSAE_DIAGNOSTICS="memory")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "msae.cli", "sweep", str(out / "scale.yaml"), "--quiet"], cwd=out,
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mon = Monitor(proc.pid, ray_tmp)
    stdout, stderr = proc.communicate()
    wall = time.time() - t0
    stats = mon.stop()
    for p in mon._procs():  # Ray processes left by a failed run
        try:
            os.kill(p.pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"msae sweep failed ({proc.returncode}):\n{stderr[-3000:]}")
    from msae.sweep.layout import SweepDir
    (sweep,) = [SweepDir(p) for p in (out / "sweeps").glob("scale-*")]
    trials = {}
    for key in sweep.trial_keys():
        h = sweep.history(key)[0]
        trials[key] = {"first_step_s": h["train_start"] - t0, "epoch_s": h["epoch_seconds"],
                       "data_access": h["data_access"], "data_touch_private_mb": h["data_touch_private_mb"],
                       "private_mb_after_epoch": h["private_mb"]}
    ckpt = out / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(sweep.final_sae(next(iter(trials))), ckpt)
    shutil.rmtree(out / "sweeps")
    return {"wall_s": wall, "trials": trials, **stats, "ckpt": str(ckpt)}


def run_evaluate(out: Path, ckpt: Path, data: Path) -> dict:
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "msae.cli", "evaluate", str(ckpt), "--data", str(data), "--k",
                             "16,64", "--overwrite", "--out", str(out / "eval.json")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    mon = Monitor(proc.pid)
    stdout, stderr = proc.communicate()
    stats = mon.stop()
    if proc.returncode != 0:
        raise SystemExit(f"msae evaluate failed:\n{stderr[-2000:]}")
    res = json.loads((out / "eval.json").read_text())
    return {"wall_s": time.time() - t0, "rows": res["16"]["rows"], "fvu_k16": res["16"]["fvu"],
            "fvu_k64": res["64"]["fvu"], **stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_900_000)
    ap.add_argument("--eval-rows", type=int, default=1_280_000)
    ap.add_argument("--out", default="bench-out/scale")
    ap.add_argument("--clean", action="store_true", help="delete the caches afterwards")
    ap.add_argument("--only", choices=["sweep", "evaluate"], help="run one part (evaluate needs a sweep's ckpt)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, small, big = out / f"train_{a.rows}.arrow", out / "val_65536.arrow", out / f"eval_{a.eval_rows}.arrow"
    made = {"train": make_cache(train, a.rows, 1), "val": make_cache(small, 65536, 2),
            "eval": make_cache(big, a.eval_rows, 3)}
    cache_bytes = a.rows * D * 4
    print(f"caches: train {a.rows} x {D} ({cache_bytes / 2**30:.2f} GiB), made in {made['train']:.0f} s; "
          f"eval {a.eval_rows} x {D}", flush=True)
    mib = 2**20
    result = {"rows": a.rows, "d": D, "cache_bytes": cache_bytes, "made_s": made, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if os.path.exists(out / "scale.json"):
        result = {**json.loads((out / "scale.json").read_text()), **result}
    if a.only != "evaluate":
        result["sweep"] = run_sweep(out, train, small)
        print_sweep(result["sweep"], cache_bytes)
    if a.only != "sweep":
        ev = result["evaluate"] = run_evaluate(out, out / "ckpt", big)
        print(f"\nmsae evaluate on {ev['rows']} rows (k = 16, 64): {ev['wall_s']:.0f} s, "
              f"peak private memory {max(ev['peak_private_bytes'].values()) / mib:.0f} MiB "
              f"= {max(ev['peak_private_bytes'].values()) / (a.eval_rows * D * 4):.3f} x its cache")
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    if a.clean:
        for p in (train, small, big):
            p.unlink(missing_ok=True)


def print_sweep(sweep: dict, cache_bytes: int) -> None:
    mib = 2**20
    print("\nmsae sweep: 2 TopK trials x 1 epoch, expansion 1 (n = 768), batch 4096")
    print(f"  wall {sweep['wall_s']:.0f} s; object store peak (/dev/shm) {sweep['shm_peak_bytes'] / mib:.0f} MiB "
          f"= {sweep['shm_peak_bytes'] / cache_bytes:.3f} x cache; disk written {sweep['disk_written_bytes'] / mib:.0f} MiB "
          f"= {sweep['disk_written_bytes'] / cache_bytes:.3f} x cache")
    for key, t in sweep["trials"].items():
        print(f"  {key}: first step at {t['first_step_s']:.1f} s (target 30 s: {t['first_step_s'] / 30:.2f} x), "
              f"epoch {t['epoch_s']:.0f} s, data by {t['data_access']}, private memory from reading the whole cache "
              f"{t['data_touch_private_mb']:.1f} MiB = {t['data_touch_private_mb'] * mib / cache_bytes:.4f} x cache")
    for name, b in sorted(sweep["peak_private_bytes"].items(), key=lambda kv: -kv[1])[:6]:
        print(f"  peak private memory {name:<28} {b / mib:8.0f} MiB = {b / cache_bytes:.3f} x cache")


if __name__ == "__main__":
    main()
