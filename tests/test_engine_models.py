"""Zoo architectures, the wrapper, loaders and augmentation: shapes, the penultimate layer,
normalization inside the wrapper, and crops that are exact shifted copies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advex.engine import zoo
from advex.engine.loaders import ModelLoadError, check_model, load_model, save_safetensors
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import augment_batch, lr_at, TrainConfig


@pytest.mark.parametrize("arch,shape,feat", [
    ("small_cnn", (1, 28, 28), 128), ("small_cnn", (3, 32, 32), 128),
    ("resnet18", (3, 32, 32), 512), ("resnet50", (3, 32, 32), 2048),
    ("mlp", (101,), 64), ("linear", (7,), 7),
])
def test_zoo_shapes_and_features(arch, shape, feat):
    net = zoo.build(arch, shape, 10).eval()
    model = ModelWrapper(net, ModelInfo(arch, shape, 10))
    x = torch.rand((2, *shape))
    with torch.no_grad():
        g = model.features(x)
        assert g.shape == (2, feat)
        assert torch.allclose(net.head(g), model.logits(x), atol=1e-5)  # logits = head(features)


def test_resnet_has_the_cifar_stem():
    net = zoo.build("resnet18", (3, 32, 32), 10)
    conv1 = net.body.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(net.body.maxpool, torch.nn.Identity)


def test_normalization_happens_inside_the_wrapper():
    torch.manual_seed(0)
    net = zoo.build("small_cnn", (3, 32, 32), 10).eval()
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    model = ModelWrapper(net, ModelInfo("small_cnn", (3, 32, 32), 10, mean, std))
    x = torch.rand(2, 3, 32, 32)
    expected = net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(model.logits(x), expected, atol=1e-6)


def test_safetensors_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    info = ModelInfo("small_cnn", (1, 28, 28), 10, arch_args={"width": 8})
    net = zoo.build("small_cnn", (1, 28, 28), 10, info.arch_args).eval()
    save_safetensors(net, tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors", "safetensors", info)
    check_model(loaded)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), net(x))
    with pytest.raises(ModelLoadError, match="do not match"):
        load_model(tmp_path / "w.safetensors", "safetensors", ModelInfo("small_cnn", (1, 28, 28), 10))


def test_augmentation_crops_are_shifted_copies_and_seeded():
    x = torch.rand(16, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        candidates = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(a[i], c) or torch.equal(a[i], c.flip(-1)) for c in candidates)


def test_learning_rate_schedules():
    step = TrainConfig(epochs=150, lr=0.1, schedule="step", lr_step_epochs=50, lr_gamma=0.1)
    assert [round(lr_at(step, e), 6) for e in (0, 49, 50, 100, 149)] == [0.1, 0.1, 0.01, 0.001, 0.001]
    cos = TrainConfig(epochs=10, lr=0.1, schedule="cosine")
    assert lr_at(cos, 0) == pytest.approx(0.1) and lr_at(cos, 5) == pytest.approx(0.05)
