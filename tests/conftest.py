import os

import numpy as np
import pytest
import torch

from msae.config import SAEConfig
from msae.sae import REGISTRY, dense_training_loss, sae_config
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


def check_step_against_dense(sae, x, loss, before_dense=lambda: None):
    """The fast training step's loss and every gradient equal the dense oracle's (msae/sae/dense.py);
    returns the step's output. ``before_dense`` runs between the two (e.g. a path-taken check)."""
    out = sae.training_step(x, loss)
    out.loss.backward()
    fast = {k: p.grad.clone() for k, p in sae.named_parameters()}
    sae.zero_grad()
    before_dense()
    ref = dense_training_loss(sae, x, loss)
    ref.backward()
    assert abs(float(out.loss.detach()) - float(ref.detach())) <= 1e-5 * abs(float(ref.detach()))
    for name, p in sae.named_parameters():
        scale = float(p.grad.abs().max())
        assert scale > 0, f"{name} got no gradient"
        assert float((fast[name] - p.grad).abs().max()) <= 2e-5 * scale, name
    return out
