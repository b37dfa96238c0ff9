"""Every SAE method through one parametrized suite (shapes, sparsity, parity, recipe, training)."""
import pytest
import torch

from msae import checkpoint
from msae.config import TrainConfig
from msae.evaluate import evaluate
from msae.losses import mse, nmse
from msae.sae import create_sae, sae_config
from msae.train import Trainer, fit, lr_multiplier, remove_parallel_grad, renormalize_decoder

from conftest import D, N, check_step_against_dense


def _perturbed(cfg, seed=1):
    sae = create_sae(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(N, generator=g) * 0.02)
        sae.b_dec.add_(torch.randn(D, generator=g) * 0.1)
    return sae


def test_shapes_and_interface(cfg):
    sae = create_sae(cfg, 0)
    assert tuple(sae.W_enc.shape) == (D, N) and tuple(sae.W_dec.shape) == (N, D)
    assert tuple(sae.b_enc.shape) == (N,) and tuple(sae.b_dec.shape) == (D,)
    x = torch.randn(10, D)
    z = sae.encode(x)
    assert z.shape == (10, N) and bool((z >= 0).all())
    assert sae.decode(z).shape == (10, D)
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)))
    zk = sae.encode(x, k=5)
    assert int((zk != 0).sum(1).max()) <= 5


def test_init_recipe(cfg):
    sae = create_sae(cfg, 3)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((N,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    assert float(sae.b_enc.detach().abs().sum()) == 0 and float(sae.b_dec.detach().abs().sum()) == 0
    other = create_sae(cfg, 4)
    assert not torch.equal(sae.W_dec, other.W_dec)
    torch.testing.assert_close(create_sae(cfg, 3).W_dec, sae.W_dec, rtol=0, atol=0)


def test_exact_sparsity(cfg):
    sae = create_sae(cfg, 0)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: top-k keeps exactly k
    x = torch.randn(16, D)
    if cfg.method == "topk":
        assert (sae.encode(x) != 0).sum(1).tolist() == [cfg.k] * 16
    if cfg.method == "msae":
        prev = None
        for k in cfg.levels:
            support = sae.encode(x, k=k) != 0
            assert support.sum(1).tolist() == [k] * 16
            if prev is not None:
                assert bool((support | ~prev).all()), "level support must contain the previous level's"
            prev = support
        assert torch.equal(sae.encode(x), sae.encode(x, k=cfg.levels[-1]))


@pytest.mark.parametrize("loss", [nmse, mse], ids=["nmse", "mse"])
def test_fast_path_matches_dense_autograd(cfg, loss):
    sae = _perturbed(cfg)
    check_step_against_dense(sae, torch.randn(48, D) * 1.5 + 0.2, loss)


def test_training_step_sparsity_counts(cfg):
    sae = _perturbed(cfg)
    x = torch.randn(32, D)
    out = sae.training_step(x, nmse)
    if cfg.method == "topk":
        assert out.l0 <= cfg.k
    if cfg.method == "batchtopk":
        assert int(out.fire_counts.sum()) <= cfg.k * 32
    if cfg.method == "msae":
        assert out.l0 <= cfg.levels[-1]
    assert int(out.fire_counts.sum()) == round(out.l0 * 32)


def test_recipe_step_invariants(cfg):
    sae = _perturbed(cfg)
    tcfg = TrainConfig(lr=1e-12, epochs=5, batch_size=32)
    trainer = Trainer(sae, tcfg, torch.device("cpu"))
    x = torch.randn(32, D) * 3
    trainer.step(x)
    # rows renormalised before a (negligible) optimiser step
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N), atol=1e-5, rtol=0)
    g = sae.W_dec.grad
    parallel = (g * sae.W_dec).sum(1).abs().max()
    assert float(parallel) <= 1e-5 * float(g.norm(dim=1).max()) + 1e-12
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in sae.parameters()))
    assert float(total) <= 1.0 + 1e-5
    group = trainer.opt.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 6.25e-10 and group["weight_decay"] == 0.0


def test_renormalisation_keeps_relu_function():
    from conftest import METHOD_CONFIGS
    sae = _perturbed(METHOD_CONFIGS["relu"])
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N, 1) * 3 + 0.1)
    x = torch.randn(8, D)
    before = sae(x)
    renormalize_decoder(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))
    torch.testing.assert_close(sae(x), before, atol=1e-5, rtol=1e-5)


def test_remove_parallel_grad_hand_example():
    from conftest import METHOD_CONFIGS
    sae = create_sae(METHOD_CONFIGS["topk"], 0)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[:, 0] = 1.0
    sae.W_dec.grad = torch.zeros(N, D)
    sae.W_dec.grad[:, 0] = 2.0
    sae.W_dec.grad[:, 1] = 3.0
    remove_parallel_grad(sae)
    assert float(sae.W_dec.grad[:, 0].abs().max()) == 0.0
    assert float((sae.W_dec.grad[:, 1] - 3.0).abs().max()) == 0.0


def test_lr_schedule_values():
    assert [lr_multiplier(e, 10) for e in range(10)] == pytest.approx([1] * 8 + [1.0, 0.5])
    got = [round(lr_multiplier(e, 7), 6) for e in range(7)]
    assert got == [1, 1, 1, 1, 1, 1.0, round(1 / 1.4, 6)]  # uncapped reference would give 1.428571 at e=5
    assert lr_multiplier(29, 30) == pytest.approx(1 / 6)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_trainer_lr_follows_schedule(cfg):
    sae = create_sae(cfg, 0)
    trainer = Trainer(sae, TrainConfig(lr=1e-3, epochs=5, batch_size=8), torch.device("cpu"))
    lrs = []
    for _ in range(5):
        lrs.append(trainer.lr)
        trainer.end_epoch()
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 1e-3 * 1 / 1.0])
    trainer = Trainer(create_sae(cfg, 0), TrainConfig(lr=1e-3, epochs=10, batch_size=8), torch.device("cpu"))
    for _ in range(9):
        trainer.end_epoch()
    assert trainer.lr == pytest.approx(0.5e-3)


def test_short_training_lowers_fvu(cfg, synth):
    train, held = synth.x[:4000], synth.x[4000:]
    sae = create_sae(cfg, 0)
    tcfg = TrainConfig(lr=2e-3, epochs=3, batch_size=256, seed=0)
    from msae.preprocess import fit_preprocessing
    pp = fit_preprocessing(train)
    sae.set_preprocessing(torch.from_numpy(pp.mean), pp.scale)
    before = evaluate(sae, held)["own"]["fvu"]
    hist = fit(sae, train, tcfg, {"held": held}, progress=False)
    after = hist[-1].eval["held"]["fvu"]
    assert after < 0.6 * before, (before, after)
    assert after < 0.5
    assert hist[-1].loss < hist[0].loss


def test_training_is_reproducible(cfg, synth):
    tcfg = TrainConfig(lr=1e-3, epochs=1, batch_size=500, seed=7)
    a, b = create_sae(cfg, 7), create_sae(cfg, 7)
    fit(a, synth.x[:2000], tcfg, progress=False)
    fit(b, synth.x[:2000], tcfg, progress=False)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_checkpoint_round_trip_bit_for_bit(cfg, synth, tmp_path):
    sae = create_sae(cfg, 0)
    fit(sae, synth.x[:1000], TrainConfig(lr=1e-3, epochs=1, batch_size=250), progress=False)
    path = checkpoint.save(sae, tmp_path / "ckpt", train={"lr": 1e-3})
    loaded = checkpoint.load(path)
    x = torch.from_numpy(synth.x[1000:1100])
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))
    assert loaded.cfg == sae.cfg
    cfg_json = checkpoint.read_config(path)
    assert cfg_json["sae"]["method"] == cfg.method and "torch" in cfg_json["versions"]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_batchtopk_inference_is_batch_independent(synth):
    from conftest import METHOD_CONFIGS
    sae = create_sae(METHOD_CONFIGS["batchtopk"], 0)
    fit(sae, synth.x[:2000], TrainConfig(lr=1e-3, epochs=1, batch_size=200), progress=False)
    assert float(sae.threshold) > 0
    x = torch.from_numpy(synth.x[3000:3064])
    with torch.no_grad():
        together = sae.encode(x)
        alone = torch.cat([sae.encode(x[i:i + 1]) for i in range(64)])
        shuffled = sae.encode(torch.cat([x[32:], x[:32]]))
    # identical up to BLAS rounding between batch shapes; never a different support
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(together != 0, alone != 0)
    assert torch.equal(torch.cat([shuffled[32:], shuffled[:32]]) != 0, together != 0)
    assert 0 < float((sae.encode(x) != 0).sum(1).float().mean()) < 4 * 8


def test_auxk_revives_dead_latents(synth):
    cfg = sae_config("topk", D, N, k=4, auxk=16)
    sae = create_sae(cfg, 0)
    with torch.no_grad():
        sae.b_enc[:8] = 5.0  # 8 latents always win the top-4; the other 120 never fire
    tcfg = TrainConfig(lr=1e-3, epochs=1, batch_size=100, auxk_dead_samples=100)
    trainer = Trainer(sae, tcfg, torch.device("cpu"))
    x = sae.preprocess(torch.from_numpy(synth.x[:100]))
    trainer.step(x)
    out = trainer.step(x)
    assert "auxk" in out.parts and out.parts["auxk"] > 0
    assert int(trainer.dead_mask()[8:].sum()) == N - 8
    assert float(sae.b_enc.grad[8:].abs().sum()) > 0  # dead latents receive gradient
    plain = create_sae(sae_config("topk", D, N, k=4), 0)
    with torch.no_grad():
        plain.b_enc[:8] = 5.0
    plain.training_step(x, nmse).loss.backward()
    assert float(plain.b_enc.grad[8:].abs().sum()) == 0  # without AuxK they get none


class _Interrupt(Exception):
    pass


def test_resume_from_trainer_state_is_bit_exact(cfg, synth):
    """Stopping after epoch 1 and resuming from the saved model + trainer state ends exactly where
    an uninterrupted run ends (the basis of trial checkpoints in sweeps)."""
    train = synth.x[:1500]
    tcfg = TrainConfig(lr=1e-3, epochs=2, batch_size=300, seed=5)
    straight = create_sae(cfg, 5)
    fit(straight, train, tcfg, progress=False)

    first = create_sae(cfg, 5)
    saved = {}

    def stop_after_first(rec, trainer):
        saved["model"] = {k: v.clone() for k, v in first.state_dict().items()}
        saved["trainer"] = trainer.state_dict()
        raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(first, train, tcfg, on_epoch=stop_after_first, progress=False)
    resumed = create_sae(cfg, 99)  # different init: everything must come from the saved state
    resumed.load_state_dict(saved["model"])
    trainer = Trainer(resumed, tcfg, torch.device("cpu"))
    trainer.load_state_dict(saved["trainer"])
    hist = fit(resumed, train, tcfg, trainer=trainer, fit_stats=False, progress=False)
    assert [r.epoch for r in hist] == [2]
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
