import os

import numpy as np
import pytest
import torch

from msae.config import SAEConfig
from msae.sae import REGISTRY, sae_config
from msae.synthetic import make_synthetic

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

D, N = 32, 128

# Every registered method's examples (msae/sae/<method>.py); every parametrized test runs on all.
METHOD_CONFIGS = {name: sae_config(m.name, D, N, **values)
                  for m in REGISTRY.values() for name, values in m.examples.items()}


@pytest.fixture(params=list(METHOD_CONFIGS), ids=list(METHOD_CONFIGS))
def cfg(request) -> SAEConfig:
    return METHOD_CONFIGS[request.param]


@pytest.fixture(scope="session")
def synth():
    return make_synthetic(n_samples=6000, d=D, roots=16, branching=(2, 2), active_roots=2.0, seed=0)


@pytest.fixture(scope="session")
def synth_files(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("data")
    np.save(root / "train.npy", synth.x[:5000])
    np.save(root / "eval.npy", synth.x[5000:])
    return root / "train.npy", root / "eval.npy"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """A migrated, empty SQLite tracking DB (migrations take seconds: done once, copied per test)."""
    from mlflow.tracking import MlflowClient
    db = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db
