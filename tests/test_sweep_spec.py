"""Sweep specs, grid expansion, Pareto math: no Ray, no MLflow."""
from pathlib import Path

import pytest

from msae.errors import MsaeError
from msae.pareto import hypervolume, pareto_front
from msae.sweep.fronts import Point, compute_fronts
from msae.sweep.space import expand_grid, plan_trials
from msae.sweep.spec import load_spec, parse_spec

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"


@pytest.mark.parametrize("name", ["vitl14", "vitb16"])
@pytest.mark.parametrize("x", [8, 16, 32])
def test_paper_grids_have_60_trials(name, x):
    spec = load_spec(SWEEPS / f"paper-{name}-x{x}.yaml")
    d = 768 if name == "vitl14" else 512
    trials = plan_trials(spec, d)
    by_method = {m: sum(t.method == m for t in trials) for m in ("relu", "topk", "msae")}
    assert by_method == {"relu": 20, "topk": 20, "msae": 20} and len(trials) == 60
    assert spec.expansion == x and spec.training.epochs == (20 if x == 32 else 30)
    assert len({t.key for t in trials}) == 60
    msae = next(t for t in trials if t.method == "msae" and t.params["levels_from"] == 64).sae
    assert msae.levels[0] == 64 and msae.levels[-1] == d * x


def test_conditional_grid_expansion():
    spec = load_spec(SWEEPS / "demo.yaml")
    trials = expand_grid(spec, 64)
    assert len(trials) == 12
    for t in trials:
        own = {"relu": {"l1"}, "topk": {"k"}, "batchtopk": {"k"}, "msae": {"levels_from", "weighting"},
               "jumprelu": {"l0_coef"}}[t.method]
        assert set(t.params) == {"method", "lr"} | own
    assert [t.key for t in trials if t.method == "msae"] == [
        "msae_lr0.002_from8_rw", "msae_lr0.002_from8_uw", "msae_lr0.002_from16_rw", "msae_lr0.002_from16_uw"]


BASE = """
name: t
data: {train: x.arrow}
methods:
  topk: {lr: [0.001], k: [8]}
"""


@pytest.mark.parametrize("text, message", [
    (BASE + "bogus: 1\n", "spec: bogus: unknown key"),
    (BASE.replace("k: [8]", "kk: [8]"), "spec: methods.topk.kk: unknown key"),
    (BASE.replace("k: [8]", "k: [eight]"), "spec: methods.topk.k"),
    (BASE.replace("k: [8]", "k: []"), "methods.topk.k: expected at least one value"),
    (BASE.replace("k: [8]", "k: {min: 4, max: 64}"), "methods.topk.k: a {min, max} range needs search.kind: optuna"),
    (BASE + "search: {kind: optuna}\n", "search.trials: optuna search needs a trial budget"),
    (BASE + "search: {kind: bayes}\n", "search.kind"),
    (BASE + "resources: {gpu: 1.5}\n", "resources.gpu: expected a fraction <= 1 or a whole number of GPUs"),
    (BASE.replace("name: t", "name: 'a b'"), "name: expected 1-64 letters"),
    (BASE.replace("topk: {lr: [0.001], k: [8]}", "msae: {lr: [0.001]}"), "methods.msae: give exactly one of levels_from"),
    ("name: t\ndata: {train: x}\nmethods: {}\n", "methods: expected at least one of relu, topk, batchtopk, msae"),
    ("name: t\nmethods: {topk: {lr: [1], k: [1]}}\n", "spec: data: Field required"),
    ("name: [unclosed\n", "spec: not valid YAML at line"),
    ("- a list\n", "expected a mapping of sweep settings"),
])
def test_spec_errors_name_the_key(text, message):
    with pytest.raises(MsaeError) as e:
        parse_spec(text)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_combinations_fail_before_any_trial():
    spec = parse_spec(BASE.replace("k: [8]", "k: [8, 4096]"))
    with pytest.raises(MsaeError, match=r"methods.topk \(trial topk_lr0.001_k4096\): .*4096"):
        plan_trials(spec, 64)
    spec = parse_spec(BASE.replace("k: [8]", "k: {min: 4, max: 9999}") + "search: {kind: optuna, trials: 4}\n")
    with pytest.raises(MsaeError, match="methods.topk.k: max 9999 exceeds n = 512"):
        plan_trials(spec, 64)


def test_pareto_front_and_hypervolume_by_hand():
    pts = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 0.5), (6, 0.5)]
    # (3,4) is dominated by (2,3); the second (2,3) duplicates the first; (6,0.5) by (5,0.5)
    assert pareto_front(pts) == [0, 1, 3, 5]
    # reference (6, 6): strips (6-1)*(6-5) + (6-2)*(5-3) + (6-4)*(3-1) + (6-5)*(1-0.5) = 5 + 8 + 4 + 0.5
    assert hypervolume(pts, (6, 6)) == pytest.approx(17.5)
    assert hypervolume([(7, 1), (1, 7)], (6, 6)) == 0.0  # nothing dominates the reference
    assert hypervolume([(1, 3), (2, 1)], (4, 4)) == pytest.approx(7.0)
    assert pareto_front([]) == [] and hypervolume([], (1, 1)) == 0.0


def test_compute_fronts_groups_planes_and_fractions():
    pts = [Point("topk_a", "topk", "own", 8, 0.2, 0.1), Point("topk_a", "topk", "k=16", 16, 0.1, 0.05),
           Point("relu_a", "relu", "own", 30, 0.05, 0.2), Point("relu_b", "relu", "own", 40, 0.3, 0.01)]
    fr = compute_fronts(pts, {"l0": 100.0, "fvu": 1.0, "one_minus_cosine": 1.0})
    all_fvu = fr["fronts"]["all/fvu"]
    assert [(p["l0"], p["fvu"]) for p in all_fvu["points"]] == [(8, 0.2), (16, 0.1), (30, 0.05)]
    assert all_fvu["trials"] == ["relu_a", "topk_a"]
    assert all_fvu["hypervolume"] == pytest.approx(92 * 0.8 + 84 * 0.1 + 70 * 0.05)
    assert all_fvu["hypervolume_fraction"] == pytest.approx(all_fvu["hypervolume"] / 100)
    cos = fr["fronts"]["all/one_minus_cosine"]
    assert [p["trial"] for p in cos["points"]] == ["topk_a", "topk_a", "relu_b"]
    assert fr["fronts"]["relu/fvu"]["trials"] == ["relu_a"]
    assert set(fr["fronts"]) == {f"{g}/{p}" for g in ("all", "relu", "topk") for p in ("fvu", "one_minus_cosine")}


def test_command_line_overrides_are_validated_like_the_spec(capsys):
    from msae.cli import main
    assert main(["sweep", str(SWEEPS / "demo.yaml"), "--gpu", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "command line: resources.gpu: expected a fraction <= 1" in err and err.count("\n") == 1
