"""AutoAttack's "rand" suite for randomized models: APGD with expectation over transformation
(EOT: each step's loss and gradient averaged over `eot` passes), the suite's cascade, the
randomness check of evaluate and its notes, the zoo's randomized option (input_noise_std), and
the suite through the service."""
from __future__ import annotations

import io

import pytest
import torch

from advex.client.cli import main as cli_main
from advex.engine import zoo
from advex.engine.apgd import apgd
from advex.engine.attacks import MAX_EOT, AttackConfig, attack
from advex.engine.data import ArrayDataset
from advex.engine.evaluate import SUITES, AttackSweep, evaluate, gradient_masking_notes, is_randomized, suite_sweeps
from advex.engine.models import ModelInfo, ModelWrapper

from conftest import linear_model, linear_points

D = 1024          # inputs [1, 32, 32]
P_NEG, BIG = 0.55, 2.0  # the mask: s = -1 w.p. 0.55, +2 w.p. 0.45
E_S = -P_NEG + (1 - P_NEG) * BIG  # E[s] = 0.35
MARGIN = 0.01     # the expected model's logit difference at every clean point


class MaskedLinear(torch.nn.Module):
    """Two classes with logit difference f(x) = b + (1/D) sum_i v_i s_i (x_i - 1/2), s_i drawn
    afresh per coordinate, example and pass. A single pass's gradient points against the
    expected one on 55% of the coordinates (s = -1), the expectation E f = b + E[s]/D v.(x - 1/2)
    is an ordinary linear model: its smallest Linf perturbation to class 0 is b / E[s].
    seen / grads: rows of every forward pass, and of every backward pass through the input."""

    def __init__(self, v: torch.Tensor, b: float = MARGIN) -> None:
        super().__init__()
        self.v, self.b = v, b
        self.seen: list[int] = []
        self.grads: list[int] = []

    def forward(self, x):
        self.seen.append(len(x))
        if x.requires_grad:
            x.register_hook(lambda g: self.grads.append(len(g)))
        z = x.flatten(1) - 0.5
        s = torch.where(torch.rand_like(z) < P_NEG, -1.0, BIG)
        f = (self.v * s * z).sum(1) / D + self.b
        return torch.stack([-f / 2, f / 2], 1)


def masked_task(n: int = 16):
    """(model, v, x [n,1,32,32], y): points near the centre where the expected model says 1 with margin b."""
    g = torch.Generator().manual_seed(0)
    v = torch.where(torch.rand(D, generator=g) < 0.5, -1.0, 1.0)
    u = 0.05 * (2 * torch.rand((n, D), generator=g) - 1)
    u = u - (u @ v)[:, None] * v / D  # v.u = 0: E f = b at every clean point
    return MaskedLinear(v), v, (0.5 + u).view(n, 1, 32, 32), torch.ones(n, dtype=torch.long)


def draws_wrong(model, x, y, draws: int = 50) -> torch.Tensor:
    """Per example, the fraction of `draws` passes that misclassify x."""
    with torch.no_grad():
        return torch.stack([model(x).argmax(1) != y for _ in range(draws)]).float().mean(0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ------------------------------------------------------------------ EOT in APGD

def test_eot_follows_the_expected_gradient_where_single_samples_mislead():
    """eps* = b / E[s] = 0.029 breaks every point of the expected model; at eps = 0.2 APGD-CE with
    eot=20 lands near its worst-case corner (x - v eps) and the randomized model misclassifies
    the points it returns on nearly every pass. With eot=1 (the bug: eot ignored) each step follows
    one pass's gradient, which is wrong on 55% of the coordinates: it walks to the opposite corner."""
    model, v, x, y = masked_task()
    eps_star = MARGIN / E_S
    eps = 0.2
    assert eps > 5 * eps_star and x.min() - eps > 0 and x.max() + eps < 1  # breakable inside the box

    def run(eot: int):
        torch.manual_seed(1)
        out = attack(model, x, y, AttackConfig(norm="Linf", eps=eps, method="apgd-ce", steps=100, eot=eot),
                     early_stop=True, clean_pred=y)
        assert (out.distance <= eps + 1e-6).all()
        align = ((out.x_adv - x).flatten(1) * -v).sum(1) / (eps * D)  # 1 at the expected model's worst corner
        return out, align, draws_wrong(model, out.x_adv, y)

    out20, align20, wrong20 = run(20)
    assert out20.config.eot == 20
    assert align20.min() > 0.5, align20
    assert wrong20.min() > 0.9 and out20.success.all(), wrong20
    out1, align1, wrong1 = run(1)
    assert align1.max() < 0.1, align1
    assert wrong1.mean() < 0.1, wrong1
    # attack() reports the verdict of the pass that chose each point (exact on a deterministic model);
    # evaluate, which knows the model is randomized, scores each point once afresh instead: the lucky
    # single-pass "successes" do not hold there
    assert out1.success.sum() > len(y) // 2
    torch.manual_seed(1)
    report = evaluate(ModelWrapper(model, ModelInfo("linear", (1, 32, 32), 2)), ArrayDataset(x, y, 2),
                      [AttackSweep(AttackConfig(norm="Linf", method="apgd-ce", steps=100), (eps,))], batch_size=len(y))
    assert report.randomized and report.clean_correct == len(y)
    assert report.rows[0].robust_correct > 3 * len(y) // 4  # (9 of 16 when scored by the choosing pass)


def test_the_averaged_gradient_has_the_expected_sign():
    """One step of eot=20 from x: the step (the sign of the mean gradient of CE) agrees with the
    closed-form expected direction -v on most coordinates (P(mean of 20 s > 0) = 0.85); with one
    pass, on fewer than half (P(s > 0) = 0.45)."""
    model, v, x, y = masked_task(8)

    def agreement(eot: int) -> float:
        torch.manual_seed(2)
        out = attack(model, x, y, AttackConfig(norm="Linf", eps=0.01, method="apgd-ce", steps=1, eot=eot),
                     clean_pred=y)
        # one step of 2 eps from a random start in the ball, projected back onto it: every coordinate
        # ends at x +- eps, on the side of the step's gradient sign (or the start, if its loss was higher)
        return float(((out.x_adv - x).flatten(1).sign() == -v).float().mean())

    assert agreement(20) > 0.75
    assert agreement(1) < 0.55


def test_the_loss_apgd_tracks_is_the_mean_over_eot_passes():
    """A model whose logit is 4 + xi, xi ~ N(0, 1) afresh per pass, flat in x: every iterate has the
    same expected loss L = E softplus(-(4 + xi)) = 0.029. The best loss APGD reports is the highest
    of its 102 evaluations: with eot=20 each is a mean of 20 passes (their highest, about 1.9 L),
    with one pass the highest single draw (about 7 L; the bug if the schedule and the best point
    followed one pass's loss)."""
    class Flat(torch.nn.Module):
        def forward(self, x):
            xi = torch.randn(len(x))
            return torch.stack([torch.zeros(len(x)), 4 + xi + 0 * x.flatten(1).sum(1)], 1)

    xi = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    expected = float(torch.nn.functional.softplus(-(4 + xi)).mean())  # 0.029
    x, y = torch.full((32, 1, 4, 4), 0.5), torch.ones(32, dtype=torch.long)
    torch.manual_seed(3)
    out20 = apgd(Flat(), x, y, eps=0.01, steps=100, eot=20, early_stop=False)
    out1 = apgd(Flat(), x, y, eps=0.01, steps=100, eot=1, early_stop=False)
    assert not out20.success.any()
    assert expected < float(out20.loss.mean()) < 2.5 * expected, (expected, out20.loss.mean())
    assert float(out1.loss[~out1.success].mean()) > 5 * expected


def test_pass_counters_include_every_eot_sample():
    """forwards = eot * (1 clean + runs * (steps + 1)), backwards = eot * runs * steps; and they
    are the passes the model really saw."""
    net, w, b = linear_model()
    x, y = linear_points(w, b, n=6)

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen, self.grads = 0, 0

        def forward(self, v):
            self.seen += len(v)
            if v.requires_grad:
                v.register_hook(lambda g: setattr(self, "grads", self.grads + len(g)))
            return net(v)

    model = Counting()
    out = apgd(model, x, y, norm="Linf", eps=1e-4, steps=10, restarts=1, early_stop=False, eot=3)
    assert not out.success.any()
    assert (out.forwards == 3 * (1 + 2 * 11)).all() and (out.backwards == 3 * 2 * 10).all()
    assert model.seen == int(out.forwards.sum()) == 6 * 69 and model.grads == int(out.backwards.sum()) == 6 * 60

    y_wrong = y.clone()
    y_wrong[:3] = 1 - y_wrong[:3]  # misclassified already: only the clean passes
    out = apgd(model, x, y_wrong, norm="Linf", eps=1e-4, steps=10, eot=5)
    assert out.forwards[:3].tolist() == [5] * 3 and out.backwards[:3].tolist() == [0] * 3
    assert out.forwards[3:].tolist() == [5 * 12] * 3 and out.backwards[3:].tolist() == [5 * 10] * 3

    # a deterministic model: eot averages identical passes, the attack is the same
    a = apgd(net, x, y, norm="Linf", eps=0.05, steps=10, eot=1, seed=3, early_stop=False)
    c = apgd(net, x, y, norm="Linf", eps=0.05, steps=10, eot=4, seed=3, early_stop=False)
    assert torch.allclose(a.x, c.x, atol=1e-6) and torch.equal(a.success, c.success)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "apgd-ce", "eot": -1}, "eot must be in"),
    ({"method": "apgd-dlr", "eot": MAX_EOT + 1}, "eot must be in"),
    ({"method": "pgd", "eot": 2}, "supported by"),
    ({"method": "fgsm", "eot": 20}, "supported by"),
    ({"method": "square", "eot": 20}, "supported by"),
    ({"method": "fab-t", "eot": 20}, "supported by"),
])
def test_attack_config_refuses_bad_eot(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttackConfig(**kwargs).resolved()


def test_eot_defaults_and_apgd_bounds():
    assert AttackConfig(method="apgd-t").resolved().eot == 1  # 0 = one pass
    assert AttackConfig(method="pgd", eot=1).resolved().eot == 1
    assert AttackConfig(method="apgd-t", eot=MAX_EOT).resolved().eot == MAX_EOT
    net, w, b = linear_model()
    x, y = linear_points(w, b, n=2)
    for bad in (0, -3, 101):
        with pytest.raises(ValueError, match="eot"):
            apgd(net, x, y, eps=0.1, steps=2, eot=bad)


def test_the_service_cost_counts_eot_passes():
    from advex.service.convert import _per_example

    assert _per_example(AttackConfig(method="apgd-ce", steps=100, eot=20))[0] == 2000
    assert "20 EOT passes" in _per_example(AttackConfig(method="apgd-dlr", steps=100, eot=20))[1]
    assert _per_example(AttackConfig(method="apgd-ce", steps=100))[0] == 100


# ------------------------------------------------------------------ the suite and the randomness check

def test_the_rand_suite_is_apgd_ce_then_apgd_dlr_with_eot_20():
    assert [(c.method, c.steps, c.eot, c.restarts) for c in SUITES["rand"]] == [
        ("apgd-ce", 100, 20, 0), ("apgd-dlr", 100, 20, 0)]
    sweeps = suite_sweeps("rand", "L2", (0.5, 1.0), seed=4)
    assert [(s.suite, s.config.norm, s.config.seed, s.eps) for s in sweeps] == [("rand", "L2", 4, (0.5, 1.0))] * 2
    assert [c.eot for s in sweeps for c in s.configs()] == [20] * 4


def ten_class_task(n: int = 48):
    """Random 8x8 images labelled by a random 10-class linear teacher (as in test_suites)."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    with torch.no_grad():
        teacher[1].bias.copy_(-0.5 * teacher[1].weight.sum(1))
    x = (torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    with torch.no_grad():
        y = teacher(x.float() / 255).argmax(1)
    return teacher, ArrayDataset(x, y, 10)


def test_the_rand_suite_is_a_cascade_and_eot_on_a_deterministic_model_is_noted():
    teacher, data = ten_class_task()
    calls: list[int] = []

    class Counting(torch.nn.Module):
        def forward(self, v):
            calls.append(len(v))
            return teacher(v)

    model = ModelWrapper(Counting(), ModelInfo("linear", (1, 8, 8), 10))
    marks: dict[str, int] = {}
    report = evaluate(model, data, suite_sweeps("rand", "Linf", (0.03,)), batch_size=64,
                      on_progress=lambda d, t, stage: marks.setdefault(stage, len(calls)))
    assert [(r.suite, r.config.method, r.config.eot, r.config.steps) for r in report.rows] == [
        ("rand", "apgd-ce", 20, 100), ("rand", "apgd-dlr", 20, 100)]
    ce, dlr = report.rows
    assert ce.robust_correct < report.clean_correct  # the radius breaks something
    assert not (dlr.robust_mask & ~ce.robust_mask).any()  # cumulative
    assert torch.equal(report.worst_case[0].robust_mask, dlr.robust_mask)
    # APGD-DLR attacked only what APGD-CE left, with 20 passes of its clean check
    after_ce = marks[next(stage for stage in marks if "apgd-ce" in stage)]
    if ce.robust_correct:
        assert calls[after_ce:after_ce + 20] == [ce.robust_correct] * 20
    assert report.randomized is False
    assert gradient_masking_notes(report.rows) == []
    assert len(report.notes) == 1 and "deterministic" in report.notes[0] and "x20" in report.notes[0]


def test_evaluate_spends_one_forward_pass_on_the_randomness_check():
    teacher, data = ten_class_task(40)
    calls: list[int] = []

    class Counting(torch.nn.Module):
        def forward(self, v):
            calls.append(len(v))
            return teacher(v)

    report = evaluate(ModelWrapper(Counting(), ModelInfo("linear", (1, 8, 8), 10)), data, [], batch_size=16)
    assert calls == [16, 16, 16, 8]  # the first batch twice, then the rest
    assert report.randomized is False and report.notes == []


def noisy_linear(std: float):
    """zoo.build's linear architecture with input_noise_std, weights of conftest.linear_model."""
    net, w, b = linear_model()
    noisy = zoo.build("linear", (1, 8, 8), 2, {"input_noise_std": str(std)})
    noisy.load_state_dict(net.net.state_dict())
    return ModelWrapper(noisy, ModelInfo("linear", (1, 8, 8), 2, arch_args={"input_noise_std": str(std)})).eval(), w, b


def test_the_randomness_note_for_a_randomized_model_without_eot():
    noisy, w, b = noisy_linear(0.05)
    x, y = linear_points(w, b, n=4)
    data = ArrayDataset(x, y, 2)
    torch.manual_seed(0)
    report = evaluate(noisy, data, suite_sweeps("autoattack-fast", "Linf", (0.01,)), batch_size=4)
    assert report.randomized is True
    notes = gradient_masking_notes(report.rows)
    assert len(notes) == 1 and "randomized" in notes[0] and "suite rand" in notes[0] and "autoattack-fast" in notes[0]

    det, _, _ = noisy_linear(0.0)
    report = evaluate(det, data, suite_sweeps("autoattack-fast", "Linf", (0.01,)), batch_size=4)
    assert report.randomized is False and gradient_masking_notes(report.rows) == [] and report.notes == []

    torch.manual_seed(0)  # the rand suite on it: no masking note, a note on how its verdicts are drawn
    report = evaluate(noisy, data, suite_sweeps("rand", "Linf", (0.01,)), batch_size=4)
    assert report.randomized is True and gradient_masking_notes(report.rows) == []
    assert len(report.notes) == 1 and "single draws" in report.notes[0]


# ------------------------------------------------------------------ the zoo's randomized option

def test_input_noise_std_makes_any_zoo_network_randomized():
    x = torch.rand(3, 1, 8, 8)
    for arch in ("linear", "mlp", "small_cnn"):
        plain = zoo.build(arch, (1, 8, 8), 10).eval()
        noisy = zoo.build(arch, (1, 8, 8), 10, {"input_noise_std": "0.2"}).eval()
        assert list(noisy.state_dict()) == list(plain.state_dict())  # the same weights load into both
        noisy.load_state_dict(plain.state_dict())
        assert not is_randomized(plain, x, plain(x))
        assert is_randomized(noisy, x, noisy(x))
        assert not torch.equal(noisy.features(x), noisy.features(x))
    zero = zoo.build("linear", (1, 8, 8), 2, {"input_noise_std": "0"})
    assert torch.equal(zero(x), zero(x))


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "inf", "loud"])
def test_input_noise_std_is_bounded(value):
    with pytest.raises(ValueError, match="input_noise_std"):
        zoo.build("linear", (1, 8, 8), 2, {"input_noise_std": value})


# ------------------------------------------------------------------ through the service

def _linear_upload(client, net, tmp_path, name, **arch_args):
    from safetensors.torch import save_file

    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return client.upload_model(path, format="safetensors", architecture="linear", num_classes=2, input_shape=[101],
                               name=name, arch_args={k: str(v) for k, v in arch_args.items()})


def test_the_service_runs_the_rand_suite_and_flags_a_randomized_model(client, server, capsys, tmp_path):
    """Zoo weights with input noise (arch_args input_noise_std) and the same weights without."""
    import numpy as np

    torch.manual_seed(0)
    plain = zoo.build("linear", (101,), 2).eval()
    ids = {"noisy": _linear_upload(client, plain, tmp_path, "noisy", input_noise_std=0.3).id,
           "plain": _linear_upload(client, plain, tmp_path, "plain").id}
    x = np.random.default_rng(0).normal(size=(4, 101)).astype(np.float32)
    with torch.no_grad():
        y = plain(torch.from_numpy(x)).argmax(1).numpy()
    data = client.upload_dataset((x, y), name="four", num_classes=2, domain="real").id

    ev = client.evaluate(ids["noisy"], data, suite="rand", attacks=[{"norm": "L2", "eps": [2.0]}]).result(progress=False)
    assert [(r.suite, r.attack.method, r.attack.steps, r.attack.eot) for r in ev.robust] == [
        ("rand", "apgd-ce", 100, 20), ("rand", "apgd-dlr", 100, 20)]
    assert ev.robust[1].robust_correct <= ev.robust[0].robust_correct <= ev.clean_correct
    assert ev.worst_case[0].robust_correct == ev.robust[1].robust_correct
    assert not ev.gradient_masking_suspected

    ev = client.evaluate(ids["noisy"], data, suite="autoattack-fast",
                         attacks=[{"norm": "L2", "eps": [0.5]}]).result(progress=False)
    assert ev.gradient_masking_suspected and any("suite rand" in note for note in ev.notes), list(ev.notes)
    # the CLI says it too, after the table
    assert cli_main(["--target", server.target, "evaluate", "--model", ids["noisy"], "--dataset", data,
                     "--suite", "rand", "--attack", "norm=L2,eps=0.5"]) == 0
    out = capsys.readouterr().out
    assert "rand: after apgd-dlr L2 (100 steps x 20 EOT)" in out and "note: the model is randomized" in out
    assert cli_main(["--target", server.target, "evaluate", "--model", ids["noisy"], "--dataset", data,
                     "--suite", "autoattack-fast", "--attack", "norm=L2,eps=0.5"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: gradient masking suspected" in out and "evaluate it with suite rand" in out
    ev = client.evaluate(ids["plain"], data, suite="autoattack-fast",
                         attacks=[{"norm": "L2", "eps": [0.5]}]).result(progress=False)
    assert not ev.gradient_masking_suspected and not any("randomized" in note for note in ev.notes)
    # the engine's informational notes reach the result: EOT on a deterministic model costs for nothing
    ev = client.evaluate(ids["plain"], data, suite="rand", attacks=[{"norm": "L2", "eps": [0.5]}]).result(progress=False)
    assert any("EOT" in note and "unnecessary" in note for note in ev.notes), list(ev.notes)


@pytest.mark.parametrize("value", ["1.5", "nan", "-0.1", "loud"])
def test_the_service_refuses_an_out_of_range_input_noise_std(client, tmp_path, value):
    import grpc

    net = zoo.build("linear", (101,), 2)
    with pytest.raises(grpc.RpcError) as err:
        _linear_upload(client, net, tmp_path, "bad", input_noise_std=value)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "arch_args[input_noise_std]" in err.value.details()


@pytest.mark.parametrize("method, eot, message", [
    ("pgd", 5, "expectation over transformation is for"),
    ("apgd-ce", 101, "must be in [0, 100]"),
    ("apgd-ce", -1, "must be in [0, 100]"),
])
def test_the_service_refuses_eot_where_it_does_not_apply(client, tmp_path, method, eot, message):
    import grpc
    import numpy as np

    model = _linear_upload(client, zoo.build("linear", (101,), 2), tmp_path, "m").id
    x = np.zeros((2, 101), np.float32)
    with pytest.raises(grpc.RpcError) as err:
        client.attack(model, x, np.zeros(2, np.int64), method=method, norm="L2", eps=0.5, eot=eot)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("attack.eot") and message in err.value.details(), err.value.details()
