"""Real data from the configured data root (ADVEX_DATA_ROOT; in CI ../shared/data) and
Debian's Fashion-MNIST: loaders are exact, and a small CNN trained briefly reaches a sensible
clean accuracy while robust accuracy falls monotonically with eps."""
from __future__ import annotations

import pytest
import torch

from advex.engine import zoo
from advex.engine.attacks import AttackConfig
from advex.engine.data import load_builtin
from advex.engine.evaluate import AttackSweep, evaluate
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import TrainConfig, train

from conftest import require_builtin


def test_cifar10_loader_matches_the_official_release():
    roots = require_builtin("cifar10")
    test = load_builtin("cifar10", "test", roots)
    assert test.x.shape == (10000, 3, 32, 32) and test.x.dtype == torch.uint8
    assert torch.bincount(test.y).tolist() == [1000] * 10  # the official test set is balanced
    assert test.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # first labels of test_batch


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loaders(name):
    roots = require_builtin(name)
    train_set = load_builtin(name, "train", roots)
    test_set = load_builtin(name, "test", roots)
    assert train_set.x.shape == (60000, 1, 28, 28) and test_set.x.shape == (10000, 1, 28, 28)
    counts = torch.bincount(test_set.y).tolist()
    if name == "fashion-mnist":
        assert counts == [1000] * 10
    else:
        assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_small_cnn_on_mnist_is_accurate_and_robust_accuracy_falls_with_eps():
    roots = require_builtin("mnist")
    data = load_builtin("mnist", "train", roots).subset(6000)
    test = load_builtin("mnist", "test", roots).subset(500)
    torch.manual_seed(0)
    model = ModelWrapper(zoo.build("small_cnn", (1, 28, 28), 10, {"width": 16}),
                         ModelInfo("small_cnn", (1, 28, 28), 10))
    train(model, data, TrainConfig(epochs=2, batch_size=64, lr=0.05, schedule="cosine", seed=0))
    eps = (0.5, 1.0, 2.0, 3.0)
    rep = evaluate(model, test, [AttackSweep(AttackConfig(norm="L2", steps=10), eps=eps)], batch_size=250)
    assert rep.clean_accuracy > 0.93
    robust = [row.robust_accuracy for row in rep.rows]
    assert all(a >= b for a, b in zip(robust, robust[1:])), robust
    assert robust[0] < rep.clean_accuracy and robust[-1] < 0.2, robust
