"""How trials reach the sweep's arrays without copying them.

The driver opens every cache once (memory-mapped), checks it, computes the train set's
preprocessing statistics once and describes each array by a :class:`SharedArray`: its path,
shape and a sampled fingerprint. A trial then

* maps the file itself when its node has it (the same data: same shape and fingerprint) and it is
  stored as float32: the pages are shared through the page cache by every trial on the node, no
  object store, no copy, nothing spilled; or
* otherwise (no such file on the node, a float16 cache that must be upcast, or ``data.share:
  object_store``) asks the sweep's cache broker, a Ray actor on the driver's node that puts each
  array into Ray's object store once, on first request; Ray ships it to the nodes that ask.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msae.data import fingerprint, load_array, mappable
from msae.errors import MsaeError
from msae.preprocess import Preprocessing
from msae.synthetic import GroundTruth


@dataclass(frozen=True)
class SharedArray:
    name: str  # "train" or "eval/<name>"
    path: str  # absolute path on the driver's node
    rows: int
    d: int
    fingerprint: str  # sampled (shape, dtype, 1024 evenly spaced rows)
    mappable: bool  # stored as float32: a trial maps the file directly
    nbytes: int


@dataclass(frozen=True)
class SemanticData:
    """The spec's ``evaluation`` section, prepared once by the driver: the probe (trained on the
    probe data's original embeddings), the rows it is measured on, and the vocabulary."""

    probe: Any | None  # msae.interpret.probe.Probe
    probe_eval: SharedArray | None  # the array the probe is measured on
    probe_rows: np.ndarray | None  # of which these rows (the held-out part), or None for all
    probe_labels: tuple[str, ...] | None
    probe_mean_kl: float | None  # KL of reconstructing every row by the train mean: the front's reference
    vocab: SharedArray | None
    vocab_words: tuple[str, ...] | None

    def arrays(self) -> list[SharedArray]:
        return [a for a in (self.probe_eval, self.vocab) if a is not None]


@dataclass(frozen=True)
class SweepData:
    """Everything about the data that every trial of a sweep shares (sent to trials once)."""

    train: SharedArray
    evals: dict[str, SharedArray]  # name -> array; the first is the primary evaluation set
    preprocessing: Preprocessing  # of the train set, for the spec's scaling and centring
    truth: GroundTruth | None
    share: str  # auto | file | object_store
    semantic: SemanticData | None = None

    @property
    def primary(self) -> str:
        return next(iter(self.evals))

    def arrays(self) -> list[SharedArray]:
        return [self.train, *self.evals.values(), *(self.semantic.arrays() if self.semantic else [])]

    def object_store_bytes(self) -> int:
        """Bytes that trials on the driver's node will fetch through the object store."""
        return sum(a.nbytes for a in self.arrays() if self.share == "object_store" or not a.mappable)


def describe(name: str, path: str | os.PathLike, arr: np.ndarray) -> SharedArray:
    return SharedArray(name, str(Path(path).resolve()), int(arr.shape[0]), int(arr.shape[1]), fingerprint(arr),
                       mappable(path), int(arr.nbytes))


def broker_name(sweep_id: str) -> str:
    return f"msae-cache-broker-{sweep_id}"


class CacheBroker:
    """Serves the sweep's arrays through the object store (a Ray actor on the driver's node)."""

    def __init__(self, paths: dict[str, str]):
        self.paths = paths
        self.refs: dict = {}

    def get(self, name: str) -> list:
        """``[ObjectRef]`` of array ``name`` (wrapped so that Ray does not resolve it here)."""
        import ray
        if name not in self.refs:
            self.refs[name] = ray.put(load_array(self.paths[name], check_finite=False))
        return [self.refs[name]]


def start_broker(sweep_id: str, data: SweepData):
    """The sweep's broker actor (detached, pinned to this node); the driver kills it at the end."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(CacheBroker).options(
        name=broker_name(sweep_id), lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
    return actor.remote({a.name: a.path for a in data.arrays()})


def stop_broker(sweep_id: str) -> None:
    import ray
    try:
        ray.kill(ray.get_actor(broker_name(sweep_id)))
    except ValueError:  # never started
        pass


def open_shared(ref: SharedArray, share: str, sweep_id: str) -> tuple[np.ndarray, str]:
    """The array ``ref`` inside a trial, and how it was reached ('file' or 'object_store')."""
    if share != "object_store" and ref.mappable and Path(ref.path).is_file():
        arr = load_array(ref.path, check_finite=False)
        if arr.shape == (ref.rows, ref.d) and fingerprint(arr) == ref.fingerprint:
            return arr, "file"
        if share == "file":
            raise MsaeError(f"{ref.path}: on this node the file holds other data than on the driver's "
                            f"(shape {list(arr.shape)}, fingerprint differs); data.share: file needs the same file")
    elif share == "file":
        raise MsaeError(f"{ref.path}: {'no such file on this node' if ref.mappable else 'not stored as float32'}; "
                        "data.share: file needs every node to map the cache (use auto or object_store)")
    import ray
    broker = ray.get_actor(broker_name(sweep_id))
    (obj,) = ray.get(broker.get.remote(ref.name))
    return ray.get(obj), "object_store"
