"""The method registry is the only list of methods: every registered method has every piece (config, SAE,
dense oracle, hyperparameter schema, CLI flags, sweep grid, Optuna space, trial keys, examples), and the
suite that runs over all methods runs over it. JumpReLU, added as one file, learns."""
import dataclasses

import optuna
import pytest
import torch

from msae.cli import build_parser
from msae.config import SAEConfig, TrainConfig
from msae.sae import REGISTRY, SAE, config_from_dict, create_sae, sae_config
from msae.sweep.space import OptunaSpace, TrialFactory, expand_grid
from msae.sweep.spec import GRIDS, spec_from_dict
from msae.train import fit, renormalize_decoder

from conftest import METHOD_CONFIGS

D, N = 16, 64


def _value(h, n=N, second=False):
    """An example value of hyperparameter ``h`` (two different ones with ``second``)."""
    if h.kind == "int":
        return 4 if not second else 8
    if h.kind == "float":
        return (0.01 if not second else 0.02) if h.name != "threshold_decay" else (0.9 if not second else 0.95)
    if h.kind == "choice":
        return h.choices[1 if second else 0]
    if h.kind == "int_list":
        return [4, 16, n] if not second else [8, n]
    return None  # float_list: only valid together with other settings (msae alphas), covered below


def test_the_suites_run_over_every_method():
    assert {cfg.method for cfg in METHOD_CONFIGS.values()} == set(REGISTRY)
    assert set(GRIDS) == set(REGISTRY)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_method_has_every_piece(name):
    m = REGISTRY[name]
    assert m.name == name == m.config.method and m.summary and m.default_lr > 0 and m.examples
    assert issubclass(m.sae, SAE) and issubclass(m.config, SAEConfig) and m.config.__dataclass_params__.frozen
    assert callable(m.dense_loss)
    flags = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for h in m.hypers:
        assert h.help and h.flag in flags, (name, h.name)
        value = _value(h)
        if value is None:
            continue
        cfg = m.make_config(D, N, {h.name: value})  # the schema's names build the config
        assert config_from_dict(cfg.to_dict()) == cfg
        if h.sweep:
            assert h.name in GRIDS[name].model_fields
    for example in m.examples.values():
        cfg = sae_config(name, D, N, **example)
        assert config_from_dict(cfg.to_dict()) == cfg and create_sae(cfg).n == N
    # the sweep grid: lr x every sweepable value, each trial key distinct
    grid = {"lr": [0.001, 0.002]}
    for h in m.hypers:
        if h.sweep and _value(h) is not None and not any(h.name in g[1:] for g in m.one_of):
            grid[h.name] = [_value(h), _value(h, second=True)]
    spec = spec_from_dict({"name": "r", "data": {"train": "x"}, "expansion": N / D, "methods": {name: grid}})
    trials = expand_grid(spec, D)
    swept = [k for k in grid if k != "lr"]
    assert len(trials) == 2 ** (len(swept) + 1) and len({t.key for t in trials}) == len(trials)
    # the Optuna space draws the same kind of trials, which Tune carries as plain values
    space = OptunaSpace(spec, D)
    fixed = {f"{name}.{k}": (",".join(map(str, v[0])) if isinstance(v[0], list) else v[0]) for k, v in grid.items()}
    config = space(optuna.trial.FixedTrial(fixed))
    trial = TrialFactory.of(spec, D).from_tune(config)
    assert trial.key == trials[0].key and trial.sae == trials[0].sae


def test_jumprelu_learns_sparse_codes_with_its_threshold(synth):
    """Trained on the synthetic ground truth, JumpReLU reconstructs well, its thresholds rise from their
    initial value, and a larger L0 coefficient gives sparser codes."""
    train, held = synth.x[:4000], synth.x[4000:]
    results = {}
    for coef in (1e-4, 3e-2):
        sae = create_sae(sae_config("jumprelu", 32, 128, l0_coef=coef, bandwidth=0.01, threshold_init=0.01), 0)
        hist = fit(sae, train, TrainConfig(lr=4e-3, epochs=8, batch_size=256), {"held": held}, progress=False)
        r = hist[-1].eval["held"]
        results[coef] = (r["fvu"], r["l0"], float(sae.threshold.detach().median()))
    (fvu_lo, l0_lo, thr_lo), (fvu_hi, l0_hi, thr_hi) = results[1e-4], results[3e-2]
    assert fvu_lo < 0.02 and fvu_hi < 0.02, results
    assert l0_hi < 0.5 * l0_lo and l0_hi < 128 / 4, results
    assert thr_hi > thr_lo > 0 and thr_hi > 0.01 * 0.1, results  # 0.01 at init, x0.1 by the first renormalisation


def test_renormalisation_keeps_the_jumprelu_function():
    sae = create_sae(sae_config("jumprelu", D, N, threshold_init=0.05), 1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N, 1) * 3 + 0.1)
        sae.b_enc.add_(torch.randn(N) * 0.1)
    x = torch.randn(32, D) * 3
    before, code_before = sae(x), sae.encode(x) != 0
    renormalize_decoder(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))
    assert torch.equal(sae.encode(x) != 0, code_before)  # the same latents fire
    torch.testing.assert_close(sae(x), before, atol=1e-5, rtol=1e-5)


def test_configs_are_frozen_and_typed():
    cfg = sae_config("topk", D, N, k=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 4
    assert type(cfg).__name__ == "TopKConfig" and cfg.own_k == 8 and cfg.to_dict()["method"] == "topk"


def test_encode_and_decode_accept_numpy():
    import numpy as np
    import torch

    sae = create_sae(sae_config("topk", D, N, k=4), 0)
    x = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
    x.flags.writeable = False  # like a memory-mapped cache
    z = sae.encode(x)
    assert torch.equal(z, sae.encode(torch.from_numpy(x.copy())))
    assert torch.equal(sae.decode(z.detach().numpy()), sae.decode(z)) and sae(x).shape == (5, D)
