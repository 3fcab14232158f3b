"""The paper's constructed datasets (Ilyas et al. §3.1, §3.2) on distributions with known
robust and non-robust features, and the builders' invariants."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from advex.engine import zoo
from advex.engine.attacks import AttackConfig
from advex.engine.builders import (BuildConfig, InversionConfig, PAPER_RELABEL_ATTACK, build, build_all,
                                   relabel_targets, start_indices)
from advex.engine.data import ArrayDataset, PlantedParams, planted_l2
from advex.engine.evaluate import AttackSweep, evaluate
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import TrainConfig, train

P = PlantedParams()           # robust x1 of size 3 (p = 0.9); non-robust signal 0.5 along u
EVAL_EPS = 1.0                # flips the non-robust signal, not the robust feature
D = planted_l2(3000, P, seed=1)
TEST = planted_l2(2000, P, seed=2)
DIM = P.k + 1


# The two models whose representations are inverted (D_R, D_NR) share one architecture and
# differ only in training: a one-unit representation g(x) = softplus(w.x + b). The theory needs
# g itself, not just the head, to ignore the non-robust direction u. A wider adversarially
# trained hidden layer does not: its units mix x1 and u in slightly different proportions, so g
# determines u.x although the head ignores it; matching g then copies x's u-component into D_R
# and a model trained on D_R is not robust (2 or 16 units, ReLU / GELU / softplus: robust
# accuracy 0.0). Softplus, not ReLU: no flat region where inversion stalls at g = 0.
SCALAR_G = {"hidden": 1, "activation": "softplus"}


def fit(data: ArrayDataset, adv_eps: float = 0.0, epochs: int = 5, wd: float = 0.0,
        arch_args: dict | None = None) -> ModelWrapper:
    """Models trained on the constructed datasets use a generic MLP (16 ReLU units)."""
    torch.manual_seed(0)
    model = ModelWrapper(zoo.build("mlp", (DIM,), 2, arch_args or {"hidden": 16}), ModelInfo("mlp", (DIM,), 2))
    adv = AttackConfig(norm="L2", eps=adv_eps, steps=10) if adv_eps else None
    train(model, data, TrainConfig(epochs=epochs, batch_size=100, lr=0.1, weight_decay=wd, schedule="constant",
                                   adversarial=adv, seed=0))
    return model


def accuracies(model: ModelWrapper) -> tuple[float, float]:
    rep = evaluate(model, TEST, [AttackSweep(AttackConfig(norm="L2", steps=20), eps=(EVAL_EPS,))], batch_size=500)
    return rep.clean_accuracy, rep.rows[0].robust_accuracy


@pytest.fixture(scope="module")
def standard():
    return fit(D, arch_args=SCALAR_G)


@pytest.fixture(scope="module")
def robust():
    return fit(D, adv_eps=2.0, epochs=10, wd=5e-3, arch_args=SCALAR_G)


def test_models_behave_as_the_theory_says(standard, robust):
    clean, rob = accuracies(standard)
    assert clean > 0.99 and rob < 0.05          # leans on the non-robust signal
    clean, rob = accuracies(robust)
    assert abs(clean - P.p) < 0.03 and abs(rob - P.p) < 0.03  # leans on x1: accuracy p, attacked or not


def test_d_det_generalizes_to_the_original_test_set(standard):
    attack = AttackConfig(norm="L2", eps=EVAL_EPS, steps=20, step_size=0.1, random_start=False, targeted=True)
    d_det, diag = build_all(standard, D, BuildConfig("d_det", attack=attack))
    assert torch.equal(d_det.y, (D.y + 1) % 2)
    # every D_det label is "wrong" for the robust feature ...
    robust_says = (d_det.x[:, 0] > 0).long()
    assert float((robust_says == d_det.y).float().mean()) < 1 - P.p + 0.03
    assert diag["target_hit_rate"] > 0.95
    # ... yet a model trained on it classifies the original test set far above chance
    clean, _ = accuracies(fit(d_det))
    assert clean > 0.9


def test_d_r_gives_robust_models_and_d_nr_does_not(standard, robust):
    inversion = InversionConfig(steps=200, step_size=0.1)
    d_r, diag_r = build_all(robust, D, BuildConfig("d_r", inversion=inversion))
    d_nr, _ = build_all(standard, D, BuildConfig("d_nr", inversion=inversion))
    assert torch.equal(d_r.y, D.y) and torch.equal(d_nr.y, D.y)
    # the optimizer works: the relative feature distance falls by orders of magnitude
    assert diag_r["feature_distance_mean"] < diag_r["feature_distance_start_mean"] / 100
    # a standard model trained on D_R learns x1 alone, like the robust model: accuracy p,
    # attacked or not (the unmoved start images, D itself or D_NR give chance or robust accuracy ~0)
    clean_r, rob_r = accuracies(fit(d_r))
    assert abs(clean_r - P.p) < 0.05 and rob_r > P.p - 0.05, (clean_r, rob_r)
    # trained on D or on D_NR, it learns the task through the non-robust signal
    for data in (D, d_nr):
        clean, rob = accuracies(fit(data))
        assert clean > 0.99 and rob < 0.05, (clean, rob)


# ------------------------------------------------------------------ invariants (images, 10 classes)

def tiny_images(n: int = 48, arch: str = "linear") -> tuple[ModelWrapper, ArrayDataset]:
    """Random 8x8 images labelled by a random model (every target class is reachable)."""
    torch.manual_seed(3)
    net = zoo.build(arch, (1, 8, 8), 10, {"width": 4}).eval()
    model = ModelWrapper(net, ModelInfo(arch, (1, 8, 8), 10))
    x = (torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    return model, ArrayDataset(x, y, 10)


@pytest.mark.parametrize("mode", ["d_rand", "d_det"])
def test_relabelled_sets_hit_targets_within_eps(mode):
    model, data = tiny_images()
    attack = PAPER_RELABEL_ATTACK.__class__(**{**PAPER_RELABEL_ATTACK.to_dict(), "eps": 2.0, "steps": 50})
    out, diag = build_all(model, data, BuildConfig(mode, attack=attack, batch_size=16))
    l2 = (out.x - data.x.float() / 255).flatten(1).norm(dim=1)
    assert (l2 <= 2.0 + 1e-4).all() and diag["max_l2"] <= 2.0 + 1e-4
    assert out.x.min() >= 0 and out.x.max() <= 1 and out.x.dtype == torch.float32
    assert (out.y != data.y).all()  # D_rand never keeps y; D_det moves it on
    if mode == "d_det":
        assert torch.equal(out.y, (data.y + 1) % 10)
    with torch.no_grad():
        hit = float((model(out.x).argmax(1) == out.y).float().mean())
    assert hit == pytest.approx(diag["target_hit_rate"]) and hit > 0.9


def test_d_rand_targets_are_uniform_over_the_other_classes():
    y = torch.arange(10).repeat(2000)
    t = relabel_targets(y, 10, "d_rand", seed=0)
    assert (t != y).all()
    counts = torch.bincount((t - y) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * len(y) / 9


def test_start_images_are_other_examples():
    s = start_indices(1000, seed=5)
    assert (s != torch.arange(1000)).all() and s.unique().numel() > 990


@pytest.mark.parametrize("mode", ["d_r", "d_rand", "d_det"])
def test_a_build_started_at_a_batch_boundary_gives_the_rest_bit_for_bit(mode):
    """What resuming an interrupted build relies on: the batches from `start` on are the
    uninterrupted build's, whatever came before."""
    model, data = tiny_images(arch="small_cnn")
    cfg = BuildConfig(mode, inversion=InversionConfig(steps=20), attack=PAPER_RELABEL_ATTACK, batch_size=8, seed=11)
    whole = list(build(model, data, cfg))
    tail = list(build(model, data, cfg, start=16))
    assert [p.start for p in tail] == [p.start for p in whole if p.start >= 16]
    for a, b in zip(tail, [p for p in whole if p.start >= 16]):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert all(torch.equal(a.stats[k], b.stats[k]) for k in a.stats)
    if mode != "d_det":  # the seed picks start images (D_R) or targets (D_rand); D_det has no randomness
        other = list(build(model, data, replace(cfg, seed=12)))
        assert not torch.equal(torch.cat([p.x for p in whole]), torch.cat([p.x for p in other]))
    with pytest.raises(ValueError, match="batch boundary"):
        next(build(model, data, cfg, start=5))


def test_noise_start_and_bad_configs():
    model, data = tiny_images(16, arch="small_cnn")
    out, diag = build_all(model, data, BuildConfig("d_nr", inversion=InversionConfig(steps=30, start="noise"), batch_size=8))
    assert out.x.shape == (16, 1, 8, 8) and diag["feature_distance_mean"] < diag["feature_distance_start_mean"]
    with pytest.raises(ValueError):
        build_all(model, data, BuildConfig("d_xx"))
    with pytest.raises(ValueError):
        build_all(model, data, BuildConfig("d_rand", attack=AttackConfig(norm="L2", eps=0.5)))  # untargeted
