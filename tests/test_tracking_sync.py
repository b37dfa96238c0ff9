"""The MLflow projection of a sweep folder (SweepTracker.sync) on a real SQLite store: a run is never
FINISHED without every epoch its trial trained."""
import shutil

from mlflow.tracking import MlflowClient

from msae.sweep.layout import SweepDir
from msae.sweep.tracking import SweepTracker


def _epoch(e: int) -> dict:
    return {"epoch": e, "train_loss": 1.0 / e, "fvu": 0.5 / e, "l0": 8.0, "cosine": 0.9, "time": 1.0e9 + e}


def _tracked_trial(tmp_path, mlflow_template, name: str, key: str, epochs: int = 3):
    """A real SQLite store, a sweep folder with one trial of ``epochs`` epochs, its tracker opened."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = SweepDir.create(tmp_path / "sweeps", name, {})
    sweep.write_trial(key, {"method": "topk", "params": {"k": 8}, "sae": {"n": 64, "d": 16},
                            "train": {"epochs": epochs}})
    tracker = SweepTracker(uri, name, sweep, caches=[])
    tracker.open(f"name: {name}\n", name, {})
    return uri, sweep, tracker


def test_a_finished_result_written_before_its_last_history_line_still_logs_every_epoch(tmp_path, mlflow_template):
    """A trial writes its result just before appending its last epoch to the history; a sync that runs
    in between must log that epoch (from the result) before it marks the run FINISHED, and the history
    line that follows must not log it twice."""
    key = "topk_k8"
    uri, sweep, tracker = _tracked_trial(tmp_path, mlflow_template, "race", key)
    for e in (1, 2):
        sweep.append_history(key, _epoch(e))
    tracker.sync(key)
    sweep.write_result(key, {"status": "finished", "epoch": 3, "metrics": {**_epoch(3), "final": 1}})
    tracker.sync(key)  # between the result and the last history line
    c = MlflowClient(uri)
    run = c.get_run(tracker.runs[key])
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    sweep.append_history(key, _epoch(3))
    tracker.sync(key)
    hist = c.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, round(m.value, 6)) for m in hist] == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]


def test_a_result_written_while_a_sync_reads_the_history_never_finishes_a_run_short(tmp_path, mlflow_template):
    """The trial writes its result while a sync is between reading the history and deciding the run's
    status: the sync must either log the last epoch too or leave the run RUNNING, never FINISHED short."""
    key = "topk_k4"
    uri, sweep, tracker = _tracked_trial(tmp_path, mlflow_template, "race2", key)
    for e in (1, 2):
        sweep.append_history(key, _epoch(e))
    read_history = sweep.history

    def history_then_trial_finishes(k):  # the trial thread runs right after the sync read the history
        rows = read_history(k)
        if sweep.result(k) is None:
            sweep.write_result(k, {"status": "finished", "epoch": 3, "metrics": {**_epoch(3), "final": 1}})
        return rows

    object.__setattr__(sweep, "history", history_then_trial_finishes)  # SweepDir is frozen
    tracker.sync(key)
    c = MlflowClient(uri)
    run = c.get_run(tracker.runs[key])
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
    assert run.info.status == "RUNNING" and steps == [1, 2]
    object.__delattr__(sweep, "history")
    tracker.sync(key)
    run = c.get_run(tracker.runs[key])
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
