"""Every accuracy and rate carries its 95% interval (exact Clopper-Pearson): the engine's function
against scipy's Beta quantiles, and the intervals in Evaluate and TransferRate results against the
counts they are built from, through a real server, the SDK and the CLI."""
from __future__ import annotations

import re

import pytest

from advex.client.cli import main as cli_main
from advex.engine.stats import clopper_pearson


@pytest.mark.parametrize("n", [1, 2, 7, 10, 100, 1000, 10000])
def test_clopper_pearson_matches_the_beta_quantiles(n):
    """lower = B(0.025; k, n-k+1), upper = B(0.975; k+1, n-k): a swapped shape parameter, alpha
    instead of alpha/2 or a one-sided bound would each be off by far more than 1e-9."""
    beta = pytest.importorskip("scipy.stats").beta
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1))):
        lower, upper = clopper_pearson(k, n)
        assert lower == (0.0 if k == 0 else pytest.approx(beta.ppf(0.025, k, n - k + 1), abs=1e-9))
        assert upper == (1.0 if k == n else pytest.approx(beta.ppf(0.975, k + 1, n - k), abs=1e-9))
        assert lower <= k / n <= upper


def test_clopper_pearson_known_values_and_refusals():
    assert clopper_pearson(0, 10)[1] == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-12)  # closed form at k = 0
    assert clopper_pearson(10, 10)[0] == pytest.approx(0.025 ** (1 / 10), abs=1e-12)
    lo, hi = clopper_pearson(250, 1000)  # the "about +-2.7 pp near 25%" at 1,000 images
    assert (hi - lo) / 2 == pytest.approx(0.0273, abs=0.001)
    assert clopper_pearson(0, 0) is None  # a rate over nothing has no interval
    for bad in [(-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            clopper_pearson(*bad)
    with pytest.raises(ValueError):
        clopper_pearson(1, 2, confidence=1.0)


def ci(message, field):
    assert message.HasField(field), field
    got = getattr(message, field)
    return got.lower, got.upper


def test_evaluate_and_transfer_results_carry_the_intervals_of_their_counts(client, capsys, server):
    model_id = client.train("linear", "tsipras", limit=500, epochs=1, seed=2).result(progress=False).model_id
    ev = client.evaluate(model_id, "tsipras", limit=300,
                         attacks=[{"norm": "Linf", "eps": [0.05, 0.3], "steps": 5}]).result(progress=False)
    assert ci(ev, "clean_accuracy_ci") == pytest.approx(clopper_pearson(ev.clean_correct, ev.num_examples))
    for row in ev.robust:
        assert ci(row, "robust_accuracy_ci") == pytest.approx(clopper_pearson(row.robust_correct, row.total))
    for wc in ev.worst_case:
        assert ci(wc, "robust_accuracy_ci") == pytest.approx(clopper_pearson(wc.robust_correct, ev.num_examples))
    assert ev.robust[0].robust_correct != ev.robust[1].robust_correct  # two radii, two intervals

    tr = client.transfer_rate([model_id], [model_id], "tsipras", norm="Linf", eps=0.3, steps=5,
                              limit=200).result(progress=False)
    pair = tr.pairs[0]
    assert ci(pair, "white_box_success_rate_ci") == pytest.approx(
        clopper_pearson(pair.successful_on_source, pair.correct_on_source))
    assert ci(pair, "transfer_rate_ci") == pytest.approx(clopper_pearson(pair.transferred, pair.successful_on_source))
    assert pair.successful_target_correct > 0 and ci(pair, "conditional_transfer_rate_ci") == pytest.approx(
        clopper_pearson(pair.transferred_target_correct, pair.successful_target_correct))
    assert pair.conditional_transfer_rate == pytest.approx(
        pair.transferred_target_correct / pair.successful_target_correct)
    assert ci(pair, "unconditional_rate_ci") == pytest.approx(
        clopper_pearson(pair.fooled_target, pair.correct_on_target))

    # the CLI prints them beside each number
    assert cli_main(["--target", server.target, "evaluate", "--model", model_id, "--dataset", "tsipras",
                     "--limit", "300", "--attack", "norm=Linf,eps=0.3,steps=5"]) == 0
    out = capsys.readouterr().out
    lo, hi = clopper_pearson(ev.clean_correct, ev.num_examples)
    assert "95% CI" in out and f"{100 * lo:.1f}-{100 * hi:.1f}%" in out
    assert re.search(r"pgd Linf \(5 steps\)\s+0\.3\s+\d+\.\d+%\s+\d+\.\d-\d+\.\d%", out), out


def test_a_rate_over_nothing_has_no_interval():
    """A transfer pair whose source fooled nothing has no transfer-rate interval: the field is
    left unset (the CLI prints n/a), not filled with [0, 1] or [0, 0]."""
    from advex.client.render import fmt_ci
    from advex.service import convert
    from advex.v1 import results_pb2

    pair = results_pb2.TransferPair()
    convert.interval(pair.transfer_rate_ci, 0, 0)
    assert not pair.HasField("transfer_rate_ci") and fmt_ci(pair, "transfer_rate_ci") == "n/a"
    convert.interval(pair.transfer_rate_ci, 0, 5)
    assert pair.HasField("transfer_rate_ci") and fmt_ci(pair, "transfer_rate_ci") == "0.0-52.2%"
