"""The sweep folder ``STORAGE/SWEEP_ID/``: every path in it, and how each is written and read.

It is the source of truth of a sweep (MLflow is a projection of it, msae.sweep.tracking):

    msae-sweep.json              state: name, sweep id, status (running | interrupted | finished),
                                 tracking URI, experiment, spec text, times
    trials/KEY.trial.json        the trial's definition (method, hyperparameters, configs), by the driver
    trials/KEY.history.jsonl     every result the trial reported, one JSON line per epoch, appended
                                 (and fsynced) by the trial before it reports
    trials/KEY/                  the trial's latest training state (SAE + trainer.pt + complete),
                                 swapped in atomically after every epoch; removed once it finished
    trials/KEY.error.json        why the trial last failed (Tune gave up on it), by the driver
    results/KEY.json             the outcome: status finished | diverged | stopped_early, final metrics,
                                 the progressive-recovery curve
    results/KEY.sae/             the final SAE checkpoint
    optuna.db                    the Optuna study (SQLite), when searching with Optuna
    tune/RUN/                    Ray Tune's own files for one driver run; msae never reads them
    pareto/                      the fronts: fronts.json, CSV tables, PNG plots
    probe.safetensors            the linear probe of the spec's evaluation.probe (msae probe's format)
    reports/KEY/                 the latent-card report (msae report) of each method's best front model

Nothing here is a pickle: JSON, JSON lines, safetensors and SQLite only, so resuming never runs
code found in a sweep folder.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msae import atomic
from msae.errors import MsaeError

STATE = "msae-sweep.json"
STATUSES = ("running", "interrupted", "finished")
TRAINER_STATE, SAE_DIR, COMPLETE = "trainer.pt", "sae", "complete"


@dataclass(frozen=True)
class SweepDir:
    root: Path

    # ---------------------------------------------------------------- the sweep
    @classmethod
    def create(cls, storage: str | os.PathLike, name: str, state: dict[str, Any]) -> "SweepDir":
        sweep_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        sweep = cls(Path(storage).resolve() / sweep_id)
        sweep.root.mkdir(parents=True, exist_ok=False)
        sweep.write_state({"name": name, "sweep_id": sweep_id, "status": "running", "started": time.time(), **state})
        return sweep

    @property
    def sweep_id(self) -> str:
        return self.root.name

    @property
    def state_file(self) -> Path:
        return self.root / STATE

    def state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MsaeError(f"{self.state_file}: unreadable sweep state ({e})") from e
        if not isinstance(state, dict) or state.get("sweep_id") != self.sweep_id:
            raise MsaeError(f"{self.state_file}: not the state of sweep {self.sweep_id}")
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        atomic.write_json(self.state_file, state, fsync=True)

    def update_state(self, **changes: Any) -> dict[str, Any]:
        state = {**self.state(), **changes}
        self.write_state(state)
        return state

    @staticmethod
    def all(storage: str | os.PathLike) -> list["SweepDir"]:
        """Every sweep folder under ``storage``, oldest first."""
        root = Path(storage).resolve()
        found = []
        for state in root.glob(f"*/{STATE}"):
            try:
                started = float(json.loads(state.read_text()).get("started", 0))
            except (OSError, json.JSONDecodeError, TypeError, ValueError):
                continue
            found.append((started, SweepDir(state.parent)))
        return [s for _, s in sorted(found, key=lambda t: (t[0], t[1].root.name))]

    @classmethod
    def find(cls, storage: str | os.PathLike, name: str, sweep_id: str | None = None,
             unfinished: bool = True) -> "SweepDir":
        """The sweep named ``sweep_id``, else the latest sweep of spec ``name`` (unfinished only, by default)."""
        storage = Path(storage).resolve()
        if sweep_id:
            sweep = cls(storage / sweep_id)
            if not sweep.state_file.is_file():
                raise MsaeError(f"sweep {sweep_id}: no sweep state in {sweep.root}")
            return sweep
        found = [s for s in cls.all(storage) if s.state().get("name") == name
                 and (not unfinished or s.state().get("status") != "finished")]
        if not found:
            raise MsaeError(f"no {'unfinished ' if unfinished else ''}sweep of spec {name!r} in {storage}")
        return found[-1]

    # ---------------------------------------------------------------- per trial
    def trial_file(self, key: str) -> Path:
        return self.root / "trials" / f"{key}.trial.json"

    def history_file(self, key: str) -> Path:
        return self.root / "trials" / f"{key}.history.jsonl"

    def state_dir(self, key: str) -> Path:
        return self.root / "trials" / key

    def error_file(self, key: str) -> Path:
        return self.root / "trials" / f"{key}.error.json"

    def result_file(self, key: str) -> Path:
        return self.root / "results" / f"{key}.json"

    def final_sae(self, key: str) -> Path:
        return self.root / "results" / f"{key}.sae"

    def write_trial(self, key: str, record: dict[str, Any]) -> None:
        atomic.write_json(self.trial_file(key), record)

    def trial(self, key: str) -> dict[str, Any] | None:
        return _read_json(self.trial_file(key))

    def trial_keys(self) -> list[str]:
        folder = self.root / "trials"
        return sorted(p.name[:-len(".trial.json")] for p in folder.glob("*.trial.json")) if folder.is_dir() else []

    def append_history(self, key: str, metrics: dict[str, Any]) -> None:
        atomic.append_line(self.history_file(key), metrics)

    def history(self, key: str) -> list[dict[str, Any]]:
        return [h for h in atomic.read_lines(self.history_file(key)) if isinstance(h, dict) and "epoch" in h]

    def write_result(self, key: str, result: dict[str, Any]) -> None:
        atomic.write_json(self.result_file(key), {"key": key, **result}, fsync=True)

    def result(self, key: str) -> dict[str, Any] | None:
        return _read_json(self.result_file(key))

    def results(self) -> dict[str, dict[str, Any]]:
        folder = self.root / "results"
        out = {}
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            r = _read_json(p)
            if r is not None:
                out[p.stem] = r
        return out

    def write_error(self, key: str, reason: str) -> None:
        atomic.write_json(self.error_file(key), {"reason": reason, "time": time.time()})

    def error(self, key: str) -> str | None:
        e = _read_json(self.error_file(key))
        return None if e is None else str(e.get("reason", "trial failed"))

    def clear_error(self, key: str) -> None:
        self.error_file(key).unlink(missing_ok=True)

    def latest_state(self, key: str) -> Path | None:
        """The trial's saved training state, or the previous one when a swap was cut short."""
        return atomic.latest_dir(self.state_dir(key), COMPLETE)

    def save_state(self, key: str, write: Any, epoch: int) -> None:
        """Replace the trial's state with a new one: ``write(folder)`` fills a fresh folder, which is
        then marked complete and swapped in (at every moment one complete state exists)."""
        target = self.state_dir(key)
        tmp = atomic.temp_dir_beside(target)
        write(tmp)
        (tmp / COMPLETE).write_text(str(epoch))
        atomic.swap_dir(tmp, target)

    def drop_state(self, key: str) -> None:
        import shutil
        for d in (self.state_dir(key), self.state_dir(key).with_name(f".{key}.old")):
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------- the rest
    @property
    def optuna_db(self) -> Path:
        return self.root / "optuna.db"

    def new_tune_run(self) -> tuple[Path, str]:
        """(storage path, name) of a fresh Ray Tune experiment folder for one driver run."""
        base = self.root / "tune"
        base.mkdir(parents=True, exist_ok=True)
        name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        (base / name).mkdir()
        return base, name

    @property
    def pareto_dir(self) -> Path:
        return self.root / "pareto"

    @property
    def probe_file(self) -> Path:
        return self.root / "probe.safetensors"

    def report_dir(self, key: str) -> Path:
        return self.root / "reports" / key

    def counts(self) -> dict[str, int]:
        """Trials by outcome: finished, diverged, stopped_early, failed (an error recorded, no result)."""
        results = self.results()
        out = {"finished": 0, "diverged": 0, "stopped_early": 0}
        for r in results.values():
            out[r.get("status", "finished")] = out.get(r.get("status", "finished"), 0) + 1
        out["failed"] = sum(1 for k in self.trial_keys() if k not in results and self.error_file(k).is_file())
        return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise MsaeError(f"{path}: unreadable ({e})") from e
    return obj if isinstance(obj, dict) else None
