"""Pass accounting of the projected-gradient loop (issue: a GPU engine at full speed): PGD-K
costs K forward+backward passes and one forward for the last iterate; the adversarial prediction
comes from the best-iterate bookkeeping, the clean one from the first pass when it is at x.
Counted on a model that records every forward and backward, and checked against the model's
own predictions. No step reads a value back from the device (no bool(), .item())."""
from __future__ import annotations

import pytest
import torch

from advex.engine import optimize
from advex.engine.attacks import AttackConfig, attack, predict
from advex.engine.optimize import COMPACT_EVERY

from conftest import count_device_reads, ten_class_data


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, counter):
        ctx.counter = counter
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.backwards += 1
        return grad, None


class Counting(torch.nn.Module):
    """Wraps a model: .forwards lists (batch, with gradient) per forward; .backwards counts backward passes."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.forwards: list[tuple[int, bool]] = []
        self.backwards = 0

    def forward(self, x):
        grad = torch.is_grad_enabled() and x.requires_grad
        self.forwards.append((x.shape[0], grad))
        out = self.net(x)
        return _CountBackward.apply(out, self) if grad else out


def test_pgd_k_costs_k_forward_backward_and_one_forward(ten_class_model):
    x, y = ten_class_data(64, seed=7)
    K = 7
    cfg = AttackConfig(norm="Linf", eps=0.1, steps=K, seed=3)  # random start (the default)
    m = Counting(ten_class_model)
    clean = predict(ten_class_model, x)
    out = attack(m, x, y, cfg, clean_pred=clean)
    assert m.backwards == K and [g for _, g in m.forwards] == [True] * K + [False]
    # the adversarial prediction is the model's own at the returned iterate
    assert torch.equal(out.adv_pred, predict(ten_class_model, out.x_adv))
    assert torch.equal(out.success, out.adv_pred != y) and 0 < int(out.success.sum()) < len(y)

    m = Counting(ten_class_model)  # no clean predictions given, random start: one forward for them
    again = attack(m, x, y, cfg)
    assert m.backwards == K and len(m.forwards) == K + 2
    assert torch.equal(again.clean_pred, clean) and torch.equal(again.x_adv, out.x_adv)


def test_without_random_start_the_clean_prediction_is_the_first_pass(ten_class_model):
    x, y = ten_class_data(64, seed=8)
    m = Counting(ten_class_model)
    out = attack(m, x, y, AttackConfig(norm="L2", eps=0.5, steps=5, random_start=False))
    assert m.backwards == 5 and len(m.forwards) == 6
    assert torch.equal(out.clean_pred, predict(ten_class_model, x))
    assert torch.equal(out.adv_pred, predict(ten_class_model, out.x_adv))
    m = Counting(ten_class_model)  # FGSM: one step from x, two passes in all
    fgsm = attack(m, x, y, AttackConfig(norm="Linf", eps=0.05, method="fgsm"))
    assert m.backwards == 1 and len(m.forwards) == 2 and torch.equal(fgsm.clean_pred, out.clean_pred)


def test_adversarial_training_spends_no_pass_on_clean_predictions(ten_class_model):
    x, y = ten_class_data(32, seed=9)
    m = Counting(ten_class_model)
    out = attack(m, x, y, AttackConfig(norm="L2", eps=0.5, steps=3, seed=1), clean=False)
    assert len(m.forwards) == 4 and bool((out.clean_pred == -1).all())


def test_early_stop_drops_successes_every_few_steps_and_changes_no_verdict(ten_class_model, monkeypatch):
    """As on a GPU: the batch shrinks every COMPACT_EVERY steps (on the CPU, at every step)."""
    monkeypatch.setattr(optimize, "compaction_interval", lambda device: COMPACT_EVERY)
    x, y = ten_class_data(256, seed=10)
    K = 4 * COMPACT_EVERY
    cfg = AttackConfig(norm="Linf", eps=0.15, steps=K, seed=2)
    full = attack(ten_class_model, x, y, cfg)
    m = Counting(ten_class_model)
    early = attack(m, x, y, cfg, early_stop=True)
    assert torch.equal(early.success, full.success)
    assert torch.equal(early.adv_pred, predict(ten_class_model, early.x_adv))
    sizes = [b for b, g in m.forwards if g]
    assert len(sizes) == K and sizes[0] == len(y) and sizes[-1] < len(y) // 2
    # the batch shrinks only at compaction steps
    assert all(sizes[t] == sizes[t - 1] for t in range(1, K) if t % COMPACT_EVERY)


def test_a_pgd_step_reads_nothing_back_from_the_device(ten_class_model, monkeypatch):
    """bool() and .item() on a tensor wait for the device; the loop calls neither per step (with
    early stopping: once per COMPACT_EVERY steps on a GPU, to shrink the batch)."""
    monkeypatch.setattr(optimize, "compaction_interval", lambda device: COMPACT_EVERY)
    x, y = ten_class_data(64, seed=11)
    for early_stop in (False, True):
        with monkeypatch.context() as patch:
            reads = count_device_reads(patch, ("__bool__", "item"))
            out = attack(ten_class_model, x, y, AttackConfig(norm="L2", eps=0.3, steps=12, seed=4),
                         clean_pred=torch.zeros_like(y), early_stop=early_stop)
        assert out.x_adv.shape == x.shape
        assert len(reads) <= (0 if not early_stop else 2 * (12 // COMPACT_EVERY + 1) + 1), (early_stop, reads)


def test_a_frozen_model_computes_the_same_function_without_batch_norm_or_parameter_gradients():
    import copy

    from advex.engine import zoo
    from advex.engine.models import ModelInfo, ModelWrapper, freeze

    for arch, shape, layers in (("small_cnn", (1, 12, 12), 5), ("resnet18", (3, 16, 16), 20)):
        torch.manual_seed(0)
        model = ModelWrapper(zoo.build(arch, shape, 10, {"width": 4} if arch == "small_cnn" else {}),
                             ModelInfo(arch, shape, 10))
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics to fold
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        model.eval()
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == layers
        frozen = freeze(copy.deepcopy(model))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
        assert not any(p.requires_grad for p in frozen.parameters())
        x = torch.rand(4, *shape)
        assert torch.allclose(frozen(x), model(x), atol=1e-4, rtol=1e-4)
        assert torch.allclose(frozen.features(x), model.features(x), atol=1e-4, rtol=1e-4)
        x.requires_grad_(True)  # input gradients still flow
        g_frozen, = torch.autograd.grad(frozen(x)[:, 0].sum(), x)
        g_model, = torch.autograd.grad(model(x)[:, 0].sum(), x)
        assert torch.allclose(g_frozen, g_model, atol=1e-4, rtol=1e-3)


def test_square_on_a_gpu_schedule_drops_successes_every_few_iterations_and_counts_only_live_queries(
        ten_class_model, monkeypatch):
    """Square with the GPU's compaction (every COMPACT_EVERY iterations): an example that succeeded
    between two compactions is still in the batch, but its point, margin and query count stay."""
    from advex.engine import square

    monkeypatch.setattr(square, "compaction_interval", lambda device: COMPACT_EVERY)
    x, y = ten_class_data(48, seed=12)
    m = Counting(ten_class_model)
    budget = 6 * COMPACT_EVERY + 1
    res = square.square_attack(m, x, y, norm="Linf", eps=0.15, queries=budget, seed=5)
    sizes = [b for b, _ in m.forwards]
    assert sizes[0] == len(y) and len(sizes) <= budget
    assert all(sizes[t] == sizes[t - 1] for t in range(2, len(sizes)) if (t - 1) % COMPACT_EVERY)
    # each success's count is the queries until it succeeded: never more than the batch was run
    assert int(res.queries.max()) <= len(sizes)
    assert bool((res.queries[res.success] < len(sizes)).any())
    assert torch.equal(res.success, predict(ten_class_model, res.x) != y)
    assert float((res.x - x).abs().max()) <= 0.15 + 1e-6
    again = square.square_attack(ten_class_model, x, y, norm="Linf", eps=0.15, queries=budget, seed=5)
    assert torch.equal(again.x, res.x) and torch.equal(again.queries, res.queries)


def test_sixteen_bit_passes_agree_with_fp32_within_the_interval(ten_class_model):
    """bf16 and fp16 autocast (as on a GPU; here CPU autocast): logits come back fp32, gradients
    reach the input (fp16 through its gradient scaling), and robust accuracy under PGD agrees
    with fp32 within its 95% interval."""
    import copy

    from advex.engine.models import resolve_precision
    from advex.engine.stats import clopper_pearson

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))
    x, y = ten_class_data(600, seed=13)
    cfg = AttackConfig(norm="L2", eps=0.6, steps=10, seed=6)
    reference = attack(ten_class_model, x, y, cfg)
    robust = int((~reference.success & (reference.clean_pred == y)).sum())
    lo, hi = clopper_pearson(robust, len(y))
    assert 0.1 < robust / len(y) < 0.9
    probe = x[:16].clone().requires_grad_(True)
    g32, = torch.autograd.grad(ten_class_model(probe)[:, 0].sum(), probe)
    for precision in ("bf16", "fp16"):
        model = copy.deepcopy(ten_class_model).set_precision(precision, "cpu")
        assert model.precision == precision and model(x[:4]).dtype == torch.float32
        g16, = torch.autograd.grad(model(probe)[:, 0].sum(), probe)
        assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99
        out = attack(model, x, y, cfg)
        k = int((~out.success & (out.clean_pred == y)).sum())
        assert lo <= k / len(y) <= hi, (precision, k, robust)
        assert float((out.x_adv - x).flatten(1).norm(dim=1).max()) <= 0.6 + 1e-5  # the iterate is fp32, in the ball
        assert out.x_adv.dtype == torch.float32


def test_fp16_gradient_scaling_keeps_small_gradients_that_fp16_alone_loses():
    from advex.engine.models import FP16_GRAD_SCALE, ModelInfo, ModelWrapper

    net = torch.nn.Linear(4, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1e-6, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        net.bias.zero_()
    model = ModelWrapper(net, ModelInfo("linear", (4,), 2)).set_precision("fp16", "cpu")
    x = torch.ones(3, 4, requires_grad=True)
    g, = torch.autograd.grad(model(x)[:, 0].sum() * 1e-3, x)  # 1e-9 per coordinate: under fp16's smallest
    assert FP16_GRAD_SCALE > 1 and torch.allclose(g[:, 0], torch.full((3,), 1e-9), rtol=0.05)


def test_batch_augmentation_is_the_per_image_crop_and_flip_in_one_gather():
    import torch.nn.functional as F

    from advex.engine.train import augment_batch

    def one_at_a_time(x, generator):  # the definition: pad, crop at (dy, dx), flip when drawn
        n, _, h, w = x.shape
        pad = 4 if h >= 32 else 2
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        flip = (torch.rand(n, generator=generator) < 0.5).tolist()
        crops = [padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]
        return torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip)])

    for shape in ((40, 3, 32, 32), (17, 1, 28, 28)):
        x = torch.rand(shape)
        assert torch.equal(augment_batch(x, torch.Generator().manual_seed(5)),
                           one_at_a_time(x, torch.Generator().manual_seed(5)))


def test_training_reads_its_running_sums_back_once_per_epoch(monkeypatch):
    from advex.engine import zoo
    from advex.engine.data import ArrayDataset
    from advex.engine.models import ModelInfo, ModelWrapper
    from advex.engine.train import TrainConfig, train

    x, y = ten_class_data(640, seed=14)
    data = ArrayDataset((x * 255).round().to(torch.uint8), y, 10, "image", [str(k) for k in range(10)])
    torch.manual_seed(0)
    model = ModelWrapper(zoo.build("mlp", (1, 8, 8), 10), ModelInfo("mlp", (1, 8, 8), 10))
    reads = count_device_reads(monkeypatch, ("__bool__", "__float__", "__int__", "item", "tolist"))
    history = train(model, data, TrainConfig(epochs=2, batch_size=32, lr=0.1, schedule="constant"))
    monkeypatch.undo()
    assert len(history) == 2 and history[1].train_accuracy > 0.5  # 40 batches, learned
    assert len(reads) <= 2 * 3, reads  # per epoch: the loss sum and the two counts


def test_a_black_box_keeps_its_own_precision():
    from advex.engine.models import ModelInfo, ModelWrapper

    class Box(torch.nn.Module):
        has_gradients = False

        def forward(self, x):
            return x.flatten(1)[:, :2]

    model = ModelWrapper(Box(), ModelInfo("onnx", (1, 2, 2), 2)).set_precision("bf16", "cpu")
    assert model.precision == "fp32" and model(torch.rand(3, 1, 2, 2)).dtype == torch.float32


def test_the_batch_for_a_gpu_is_the_largest_that_fits_and_the_cpu_keeps_its_default():
    from advex.engine.batching import CUDA_CAP, attack_batch, largest_batch

    tried = []

    def trial(batch):  # a device with room for 700 examples
        tried.append(batch)
        if batch > 700:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    assert largest_batch(trial, 2048) == 512 and tried == [2048, 1024, 512]
    with pytest.raises(RuntimeError, match="not even a batch of 1"):
        largest_batch(lambda b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("full")), 8)
    net = torch.nn.Linear(4, 2)
    assert attack_batch(net, (4,), torch.device("cpu"), 256) == 256
    box = torch.nn.Identity()
    box.has_gradients = False  # a black box is never probed, even on a GPU
    assert attack_batch(box, (4,), torch.device("cuda"), 256) == 256
    assert CUDA_CAP >= 1024
