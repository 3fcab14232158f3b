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
