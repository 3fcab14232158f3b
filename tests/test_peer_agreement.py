"""advex's PGD and the torchattacks library's PGD answer the same question: on the same model,
batch and settings their robust accuracies must agree (a cross-check of the engine against an
independent implementation)."""
from __future__ import annotations

import pytest
import torch

from advex.engine import zoo
from advex.engine.attacks import AttackConfig, attack
from advex.engine.data import tsipras
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import TrainConfig, train

from conftest import require_module


@pytest.mark.parametrize("norm,eps", [("Linf", 0.3), ("L2", 3.0)])
def test_robust_accuracy_agrees_with_torchattacks(norm, eps):
    torchattacks = require_module("torchattacks", "pip install --no-deps torchattacks scipy (scripts/test.sh does)")
    data = tsipras(3000, seed=1)
    torch.manual_seed(0)
    model = ModelWrapper(zoo.build("mlp", (101,), 2), ModelInfo("mlp", (101,), 2))
    train(model, data, TrainConfig(epochs=2, batch_size=100, lr=0.05, schedule="constant", seed=0))
    test = tsipras(1000, seed=2)
    x, y = test.x, test.y
    # Tsipras features are unbounded: map them into a [0,1] box that never binds, shaped as
    # [N,1,1,D] images (torchattacks assumes 4-D batches), for both attacks alike.
    lo, hi = float(x.min()) - 10, float(x.max()) + 10

    class Boxed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, v):
            return self.model(v.flatten(1) * (hi - lo) + lo)

    boxed = Boxed().eval()
    images = ((x - lo) / (hi - lo)).view(-1, 1, 1, x.shape[1])
    eps01, steps = eps / (hi - lo), 20
    step = 2.5 * eps01 / steps
    peer_cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
    x_peer = peer_cls(boxed, eps=eps01, alpha=step, steps=steps, random_start=True)(images, y)
    ours = attack(boxed, images, y, AttackConfig(norm=norm, eps=eps01, steps=steps, step_size=step))
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        peer_robust = float((clean & (boxed(x_peer).argmax(1) == y)).float().mean())
    ours_robust = float((clean & ~ours.success).float().mean())
    assert 0.05 < ours_robust < float(clean.float().mean()) - 0.05, "eps must make the comparison informative"
    assert abs(ours_robust - peer_robust) < 0.03, (ours_robust, peer_robust)
