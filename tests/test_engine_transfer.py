"""Transferability counts: an exact copy of the source gives transfer rate 1 and an
unconditional rate equal to the white-box success rate; every count nests in its denominator."""
from __future__ import annotations

import copy

import pytest
import torch

from advex.engine import zoo
from advex.engine.attacks import AttackConfig
from advex.engine.data import ArrayDataset
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.transfer import transfer_rates


def model(seed: int) -> ModelWrapper:
    torch.manual_seed(seed)
    return ModelWrapper(zoo.build("linear", (1, 6, 6), 5), ModelInfo("linear", (1, 6, 6), 5)).eval()


@pytest.fixture(scope="module")
def data() -> ArrayDataset:
    x = torch.rand((120, 1, 6, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # labels mostly from model(0), so the source is often correct
        y = model(0)(x).argmax(1)
    y[::4] = (y[::4] + 1) % 5  # a quarter mislabelled: correct_on_* < examples
    return ArrayDataset(x, y, 5)


@pytest.mark.parametrize("targeted", [False, True])
def test_exact_copy_and_denominators(data, targeted):
    source = model(0)
    twin, other = copy.deepcopy(source), copy.deepcopy(source)
    with torch.no_grad():  # a relative of the source: mostly right on clean data, not identical
        w = other.net.head.weight
        w.add_(0.3 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(9)))
    cfg = AttackConfig(norm="L2", eps=0.5, steps=10, targeted=targeted)
    counts = transfer_rates([source], [twin, other], data, cfg, batch_size=32)
    to_twin, to_other = counts[0]
    assert to_twin.successful_on_source > 0
    assert to_twin.transfer_rate == 1.0
    assert to_twin.unconditional_rate == pytest.approx(to_twin.white_box_success_rate)
    assert to_other.correct_on_target > 60 and to_other.transfer_rate < 1.0
    for c in counts[0]:
        assert c.examples == 120 and c.transferred <= c.successful_on_source
        if targeted:
            assert c.successful_on_source <= c.examples and c.fooled_target <= c.examples
        else:
            assert c.successful_on_source <= c.correct_on_source <= c.examples
            assert c.fooled_target <= c.correct_on_target <= c.examples
    # the source-side counts do not depend on the target
    assert to_twin.successful_on_source == to_other.successful_on_source
    assert to_twin.correct_on_source == to_other.correct_on_source == 90  # 30 of 120 mislabelled


class Constant(torch.nn.Module):
    """Always class k, whatever the input (a target that is wrong on every x of another class)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        out = torch.zeros(len(x), 5)
        out[:, self.k] = 1.0
        return out + 0 * x.flatten(1).sum(1, keepdim=True)


def test_a_targets_own_clean_errors_are_not_transfer_in_the_conditional_rate(data):
    """The constant model is wrong on every example whose label is not k, adversarial or not: the
    plain transfer rate counts those source successes as transferred; the paper's conditional
    rate looks only at examples the target gets right (label k), where nothing fools it."""
    source = model(0)
    k = int(data.y.mode().values)
    target = ModelWrapper(Constant(k), ModelInfo("linear", (1, 6, 6), 5)).eval()
    c = transfer_rates([source], [target], data, AttackConfig(norm="L2", eps=0.5, steps=10), batch_size=32)[0][0]
    assert c.successful_on_source > 0 and c.transfer_rate > 0.5
    assert 0 < c.successful_target_correct <= int((data.y == k).sum())
    assert c.transferred_target_correct == 0 and c.conditional_transfer_rate == 0.0
    twin = transfer_rates([source], [copy.deepcopy(source)], data, AttackConfig(norm="L2", eps=0.5, steps=10),
                          batch_size=32)[0][0]
    assert twin.conditional_transfer_rate == 1.0  # a copy: every success transfers, conditioned or not
