"""Evaluate with a suite: APGD-CE then APGD-T ("autoattack-fast") or PGD-50, as a cascade at
each radius (each attack only on what the earlier ones left; the last row is the worst case),
through the engine, the service, the SDK and the CLI; and the requests a suite refuses."""
from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
import torch

from advex.client.cli import main as cli_main
from advex.engine.attacks import AttackConfig
from advex.engine.data import ArrayDataset
from advex.engine.evaluate import AttackSweep, RobustRow, evaluate, gradient_masking_notes, suite_sweeps
from advex.engine.models import ModelInfo, ModelWrapper


class Counting(torch.nn.Module):
    """A model that records how many examples each forward pass saw."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(len(x))
        return self.net(x)


def linear_task(n: int = 64):
    """Random 8x8 images labelled by a random 10-class linear teacher (every class occurs)."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    with torch.no_grad():  # centred on the images' mean, so that every class has a region
        teacher[1].bias.copy_(-0.5 * teacher[1].weight.sum(1))
    x = (torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    with torch.no_grad():
        y = teacher(x.float() / 255).argmax(1)
    return teacher, ArrayDataset(x, y, 10)


def test_a_suite_is_a_cascade_whose_last_row_is_the_worst_case():
    net, data = linear_task()
    assert len(data.y.unique()) >= 5
    model = ModelWrapper(Counting(net), ModelInfo("linear", (1, 8, 8), 10))
    sweeps = suite_sweeps("autoattack-fast", "Linf", (0.02, 0.06))
    report = evaluate(model, data, sweeps, batch_size=128)
    rows = {(r.config.method, r.config.eps): r for r in report.rows}
    assert [r.suite for r in report.rows] == ["autoattack-fast"] * 4
    for eps in (0.02, 0.06):
        ce, t = rows[("apgd-ce", eps)], rows[("apgd-t", eps)]
        assert not (t.robust_mask & ~ce.robust_mask).any()  # cumulative: nothing comes back
        worst = next(w for w in report.worst_case if w.eps == eps)
        assert torch.equal(worst.robust_mask, t.robust_mask)
    assert rows[("apgd-ce", 0.06)].robust_correct < report.clean_correct  # the radius breaks something
    assert rows[("apgd-t", 0.06)].robust_correct <= rows[("apgd-ce", 0.06)].robust_correct

    # APGD-T attacked only what APGD-CE left: its first forward pass saw exactly the survivors
    model.net.seen.clear()
    marks: dict[str, int] = {}
    evaluate(model, data, suite_sweeps("autoattack-fast", "Linf", (0.06,)), batch_size=128,
             on_progress=lambda done, total, stage: marks.setdefault(stage, len(model.net.seen)))
    after_ce = marks[next(stage for stage in marks if "apgd-ce" in stage)]  # reported after APGD-CE's one batch
    survivors = rows[("apgd-ce", 0.06)].robust_correct
    assert max(model.net.seen[after_ce:]) == survivors < report.clean_correct


def test_autoattack_fast_is_at_least_as_strong_as_pgd_50_with_5_restarts():
    net, data = linear_task(128)
    model = ModelWrapper(net, ModelInfo("linear", (1, 8, 8), 10))
    eps = (0.03,)
    aa = evaluate(model, data, suite_sweeps("autoattack-fast", "Linf", eps), batch_size=128)
    pgd = evaluate(model, data, [AttackSweep(AttackConfig(norm="Linf", method="pgd", steps=50, restarts=4), eps)],
                   batch_size=128)
    assert aa.worst_case[0].robust_correct <= pgd.worst_case[0].robust_correct
    assert pgd.worst_case[0].robust_correct < aa.clean_correct  # the comparison is informative


def test_masking_notes_read_a_suite_as_a_cascade():
    """In a suite, rows are cumulative: a black-box attack that breaks what the white-box ones left
    is the masking signal; comparing cumulative rows with stand-alone ones would be noise."""
    def row(method, robust, suite=""):
        return RobustRow(AttackConfig(norm="Linf", eps=0.03, method=method), robust, 100, 80, [], 0.0,
                         torch.zeros(100, dtype=torch.bool), suite=suite)

    notes = gradient_masking_notes([row("apgd-ce", 50, "s"), row("apgd-t", 45, "s"), row("square", 40, "s")])
    assert len(notes) == 1 and "broke 5 examples" in notes[0]
    assert gradient_masking_notes([row("apgd-ce", 50, "s"), row("apgd-t", 45, "s"), row("square", 45, "s")]) == []
    assert gradient_masking_notes([row("apgd-t", 40, "s"), row("square", 45)]) == []  # suite vs stand-alone


@pytest.fixture(scope="module")
def mlp_id(client):
    return client.train("mlp", "tsipras", limit=1000, epochs=2, seed=1,
                        arch_args={"hidden": "32"}).result(progress=False).model_id


def test_evaluate_with_a_suite_through_the_sdk_and_the_cli(client, server, capsys, mlp_id):
    ev = client.evaluate(mlp_id, "tsipras", limit=200, suite="autoattack-fast",
                         attacks=[{"norm": "Linf", "eps": [0.1, 0.3]}]).result(progress=False)
    assert [(r.suite, r.attack.method, r.attack.eps) for r in ev.robust] == [
        ("autoattack-fast", "apgd-ce", 0.1), ("autoattack-fast", "apgd-ce", 0.3),
        ("autoattack-fast", "apgd-t", 0.1), ("autoattack-fast", "apgd-t", 0.3)]
    assert all(r.attack.steps == 100 for r in ev.robust)
    for ce, t in ((0, 2), (1, 3)):  # after APGD-T at a radius: at most what APGD-CE left there
        assert ev.robust[t].robust_correct <= ev.robust[ce].robust_correct <= ev.clean_correct
    assert [w.robust_correct for w in ev.worst_case] == [ev.robust[2].robust_correct, ev.robust[3].robust_correct]
    assert ev.robust[3].robust_correct < ev.clean_correct

    assert cli_main(["--target", server.target, "evaluate", "--model", mlp_id, "--dataset", "tsipras",
                     "--limit", "100", "--suite", "pgd", "--attack", "norm=L2,eps=1.0"]) == 0
    out = capsys.readouterr().out
    assert "pgd: after pgd L2 (50 steps)" in out


@pytest.mark.parametrize("suite, attacks, field", [
    ("autoattack-slow", [{"norm": "Linf", "eps": [0.1]}], "suite"),
    ("autoattack-fast", [{"norm": "Linf", "eps": [0.1], "method": "pgd"}], "attacks[0].attack"),
    ("autoattack-fast", [{"norm": "Linf", "eps": [0.1], "steps": 5}], "attacks[0].attack"),
    ("autoattack-fast", [], "attacks"),
    ("", [{"norm": "Linf", "eps": [0.1], "method": "apgd-ce", "targeted": True}], "attacks[0].attack.targeted"),
    ("", [{"norm": "Linf", "eps": [0.1], "method": "apgd-x"}], "attacks[0].attack.method"),
    ("", [{"norm": "Linf", "eps": [0.1], "method": "fab-t", "targeted": True}], "attacks[0].attack.targeted"),
])
def test_what_a_suite_refuses(client, mlp_id, suite, attacks, field):
    with pytest.raises(grpc.RpcError) as err:
        client.evaluate(mlp_id, "tsipras", limit=10, suite=suite, attacks=attacks)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_the_autoattack_suite_runs_all_four_attacks_as_a_cascade(client, mlp_id, monkeypatch):
    """AutoAttack's standard version: APGD-CE, APGD-T, FAB-T (100 steps each), Square (5000
    queries), each on what the earlier ones left. Through the service with the steps cut down
    (Square's 5000 queries on the points no attack breaks take minutes on this machine)."""
    from advex.engine import evaluate as evaluate_mod

    standard = evaluate_mod.SUITES["autoattack"]
    assert [(c.method, c.steps) for c in standard] == [("apgd-ce", 100), ("apgd-t", 100), ("fab-t", 100),
                                                        ("square", 5000)]
    monkeypatch.setitem(evaluate_mod.SUITES, "autoattack",
                        tuple(replace(c, steps=300 if c.method == "square" else 10) for c in standard))
    ev = client.evaluate(mlp_id, "tsipras", limit=60, suite="autoattack",
                         attacks=[{"norm": "L2", "eps": [1.5]}]).result(progress=False)
    assert [r.attack.method for r in ev.robust] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    left = [r.robust_correct for r in ev.robust]
    assert left == sorted(left, reverse=True) and left[0] < ev.clean_correct
    assert ev.worst_case[0].robust_correct == left[-1]


def test_fab_t_through_the_attack_rpc_stays_within_eps(client, mlp_id):
    import numpy as np

    x = np.random.default_rng(0).normal(size=(16, 101)).astype(np.float32)
    y = client.attack(mlp_id, x, [0] * 16, norm="L2", eps=0.01, steps=1, domain="real").clean_pred
    out = client.attack(mlp_id, x, y, method="fab-t", norm="L2", eps=2.0, steps=20, domain="real")
    assert (out.perturbation_norm <= 2.0 + 1e-4).all()
    assert out.success.any() and ((out.adv_pred != y) == out.success).all()
