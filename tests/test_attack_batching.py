"""Per-example radii in Attack and the merging of concurrent Attack calls into one engine batch:
the batcher's rules on a fake engine (what merges, what waits, what a departed client or a
failure does), then the real server: closed-form answers for per-example eps on a linear model,
exact statuses for bad radii, and merged calls that answer each client as a call alone would."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from advex.client import Client
from advex.engine.attacks import AttackConfig, AttackOutput
from advex.engine.loaders import save_safetensors
from advex.service.batcher import AttackBatcher
from advex.service.errors import ServiceError
from advex.service.inprocess import InProcessServer
from advex.v1 import robustness_pb2 as rpc
from advex.v1.wire import to_tensor

from conftest import LINEAR_MARGIN, linear_model, linear_points


# ---------------------------------------------------------------- the batcher on a fake engine
class FakeOps:
    """run_interactive as the server's: fn(check) in a thread (one at a time)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.accepting = True

    async def run_interactive(self, fn, *, cancellable=False, admitted=False):
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(lambda *a: None))


class FakeEngine:
    """Records each batch it runs; x_adv = x + 1, adv_pred = the row's index in the batch."""

    def __init__(self, gate: threading.Event | None = None, fail: Exception | None = None) -> None:
        self.batches: list[tuple[int, object]] = []
        self.gate, self.fail, self.steps = gate, fail, 0

    def __call__(self, x, y, eps, segments, on_step):
        self.batches.append((len(x), segments))
        if self.gate is not None:
            while not self.gate.wait(0.01):
                on_step()  # raises Cancelled once every caller has gone
                self.steps += 1
                if self.steps > 2000:  # a regression fails the test instead of hanging it
                    raise RuntimeError("the fake engine was never released")
        if self.fail is not None:
            raise self.fail
        xt = torch.tensor(x)
        n = len(x)
        return AttackOutput(xt + 1, torch.ones(n, dtype=torch.bool), torch.tensor(y), torch.arange(n),
                            torch.full((n,), float(eps[0]) if eps is not None else 0.0), AttackConfig()), "usage"


def _rows(n: int, value: float) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, 1, 2, 2), value, dtype=np.float32), np.arange(n, dtype=np.int64)


def _batcher(**kw) -> AttackBatcher:
    return AttackBatcher(FakeOps(), **{"window_s": 0.05, "max_rows": 64, "max_waiting_rows": 256, **kw})


def test_calls_within_the_window_share_one_batch_and_get_their_own_rows():
    async def main():
        engine, batcher = FakeEngine(), _batcher()
        calls = [batcher.submit("k", *_rows(n, v), None, engine) for n, v in ((2, 0.0), (3, 10.0), (1, 20.0))]
        return engine, await asyncio.gather(*calls)

    engine, results = asyncio.run(main())
    assert engine.batches == [(6, [2, 3, 1])]
    for (out, usage), (n, v, first) in zip(results, ((2, 0.0, 0), (3, 10.0, 2), (1, 20.0, 5))):
        assert usage == "usage"
        assert torch.equal(out.x_adv, torch.full((n, 1, 2, 2), v + 1))
        assert out.adv_pred.tolist() == list(range(first, first + n))  # its own rows of the batch, in order


def test_a_lone_call_runs_without_segments_and_keys_never_mix():
    async def main():
        engine, batcher = FakeEngine(), _batcher()
        await asyncio.gather(batcher.submit("a", *_rows(2, 0.0), None, engine),
                             batcher.submit("b", *_rows(3, 0.0), None, engine))
        return engine

    assert sorted(asyncio.run(main()).batches) == [(2, None), (3, None)]


def test_calls_arriving_while_a_batch_runs_gather_into_the_next_and_max_rows_splits():
    async def main():
        gate = threading.Event()
        engine, batcher = FakeEngine(gate), _batcher(window_s=0.0, max_rows=5)
        first = asyncio.ensure_future(batcher.submit("k", *_rows(1, 0.0), None, engine))
        while not engine.batches:
            await asyncio.sleep(0.005)
        later = [asyncio.ensure_future(batcher.submit("k", *_rows(2, 0.0), None, engine)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert len(engine.batches) == 1  # the others wait for the running batch, whatever the window
        gate.set()
        await asyncio.gather(first, *later)
        return engine

    assert asyncio.run(main()).batches == [(1, None), (4, [2, 2]), (4, [2, 2])]


def test_a_departed_client_drops_out_and_the_batch_stops_when_all_have_gone():
    async def main():
        gate = threading.Event()
        engine, batcher = FakeEngine(gate), _batcher(window_s=0.0)
        a = asyncio.ensure_future(batcher.submit("k", *_rows(2, 0.0), None, engine))
        b = asyncio.ensure_future(batcher.submit("k", *_rows(2, 5.0), None, engine))
        while not engine.batches:
            await asyncio.sleep(0.005)
        a.cancel()
        gate.set()
        out, _ = await b
        assert torch.equal(out.x_adv, torch.full((2, 1, 2, 2), 6.0))
        gate.clear()
        c = asyncio.ensure_future(batcher.submit("k", *_rows(1, 0.0), None, engine))
        while len(engine.batches) < 2:
            await asyncio.sleep(0.005)
        c.cancel()
        for _ in range(200):  # the engine's next step sees that nobody waits, and stops
            await asyncio.sleep(0.01)
            if not batcher._running:
                break
        return engine, batcher

    engine, batcher = asyncio.run(main())
    assert engine.batches == [(4, [2, 2]), (1, None)]
    assert not batcher._running and not batcher._waiting


def test_a_failed_batch_fails_every_call_with_its_status():
    err = ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "model gone")

    async def main():
        batcher = _batcher()
        return await asyncio.gather(*[batcher.submit("k", *_rows(1, 0.0), None, FakeEngine(fail=err))
                                      for _ in range(3)], return_exceptions=True)

    assert [r is err for r in asyncio.run(main())] == [True] * 3


def test_too_many_waiting_rows_is_resource_exhausted_and_the_others_still_run():
    async def main():
        gate = threading.Event()
        engine, batcher = FakeEngine(gate), _batcher(window_s=0.0, max_rows=4, max_waiting_rows=6)
        first = asyncio.ensure_future(batcher.submit("k", *_rows(1, 0.0), None, engine))
        while not engine.batches:
            await asyncio.sleep(0.005)
        queued = [asyncio.ensure_future(batcher.submit("k", *_rows(3, 0.0), None, engine)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ServiceError) as info:
            await batcher.submit("k", *_rows(1, 0.0), None, engine)
        gate.set()
        await asyncio.gather(first, *queued)
        return info.value.code

    assert asyncio.run(main()) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_merging_is_for_pgd_and_fgsm_and_can_be_switched_off():
    assert _batcher().merges("pgd") and _batcher().merges("fgsm")
    assert not _batcher().merges("apgd-ce") and not _batcher().merges("square")
    assert not _batcher(max_rows=0).merges("pgd")


# ---------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server whose Attack calls wait 300 ms for company, and a linear model with known margins."""
    model, w, b = linear_model()
    path = tmp_path_factory.mktemp("m") / "linear.safetensors"
    save_safetensors(model.net, path)
    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("advex")), data_roots=[],
                         attack_merge_window_ms=300.0) as srv, Client(srv.target) as client:
        uploaded = client.upload_model(path, format="safetensors", architecture="linear", num_classes=2,
                                       input_shape=[1, 8, 8])
        yield srv, client, uploaded.id, w, b


@pytest.mark.parametrize("norm,dual,method", [("Linf", 1.0, "fgsm"), ("L2", 2.0, "pgd")])
def test_attack_with_a_radius_per_example_flips_exactly_the_rows_above_their_margin(served, norm, dual, method):
    _, client, model_id, w, b = served
    x, y = linear_points(w, b, n=20)
    minimal = LINEAR_MARGIN / float(w.norm(p=dual))
    above = np.arange(20) % 3 != 0
    eps = np.where(above, 1.05 * minimal, 0.95 * minimal)
    out = client.attack(model_id, x.numpy(), y.numpy(), norm=norm, eps=eps, method=method,
                        steps=0 if method == "fgsm" else 40)
    assert out.success.tolist() == above.tolist()
    assert (out.perturbation_norm <= eps * (1 + 1e-5)).all()
    assert out.attack.eps == 0  # the radii are the request's eps


@pytest.mark.parametrize("change,field", [
    (lambda r: r.eps.CopyFrom(to_tensor(np.full(4, 1, np.int64))), "eps"),               # not float32
    (lambda r: r.eps.CopyFrom(to_tensor(np.full(3, 0.1, np.float32))), "eps"),           # one short
    (lambda r: r.eps.CopyFrom(to_tensor(np.array([0.1, np.nan, 0.1, 0.1], np.float32))), "eps[1]"),
    (lambda r: r.eps.CopyFrom(to_tensor(np.array([0.1, 0.1, 0.0, 0.1], np.float32))), "eps[2]"),
    (lambda r: r.eps.CopyFrom(to_tensor(np.array([0.1, 0.1, 0.1, 1.5], np.float32))), "eps[3]"),  # > the box
    (lambda r: (r.eps.CopyFrom(to_tensor(np.full(4, 0.1, np.float32))), setattr(r.attack, "eps", 0.1)),
     "attack.eps"),
])
def test_bad_per_example_radii_are_invalid_argument_naming_the_field(served, change, field):
    srv, client, model_id, w, b = served
    x, y = linear_points(w, b, n=4)
    req = rpc.AttackRequest(model_id=model_id, x=to_tensor(x.numpy()), y=to_tensor(y.numpy()))
    req.attack.norm = 1  # LINF
    change(req)
    with grpc.insecure_channel(srv.target) as channel:
        stub = channel.unary_unary("/advex.v1.Robustness/Attack", request_serializer=rpc.AttackRequest.SerializeToString,
                                   response_deserializer=rpc.AttackResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            stub(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":"), info.value.details()


def test_concurrent_calls_merge_and_each_gets_what_it_gets_alone(served):
    srv, client, model_id, w, b = served
    x, y = linear_points(w, b, n=24)
    parts = [(x[i:i + 3].numpy(), y[i:i + 3].numpy()) for i in range(0, 24, 3)]
    settings = dict(norm="L2", eps=0.3, method="pgd", steps=3, step_size=0.05, restarts=1, seed=7)
    calls_before, runs_before = _metric(srv, "_sum"), _metric(srv, "_count")
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        merged = list(pool.map(lambda p: client.attack(model_id, p[0], p[1], **settings), parts))
    assert _metric(srv, "_sum") - calls_before == len(parts)
    assert _metric(srv, "_count") - runs_before < len(parts), "concurrent calls of one kind must share batches"
    for (xi, yi), got in zip(parts, merged):
        alone = client.attack(model_id, xi, yi, **settings)
        np.testing.assert_allclose(got.x_adv, alone.x_adv, rtol=0, atol=1e-6)
        assert got.success.tolist() == alone.success.tolist()
        assert got.adv_pred.tolist() == alone.adv_pred.tolist()


def _metric(srv, suffix: str) -> float:
    """advex_attack_batch_calls' _sum (calls) or _count (engine batches) as the server exports it."""
    return next(s.value for m in srv.running.metrics.attack_batch_calls.collect() for s in m.samples
                if s.name.endswith(suffix))


def test_too_many_distinct_radii_for_a_method_run_once_per_radius_is_invalid(served):
    _, client, model_id, w, b = served
    x, y = linear_points(w, b, n=70)
    eps = np.linspace(0.01, 0.2, 70)
    with pytest.raises(grpc.RpcError) as info:
        client.attack(model_id, x.numpy(), y.numpy(), eps=eps, method="apgd-ce", steps=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("eps:")
    assert len(client.attack(model_id, x.numpy(), y.numpy(), eps=eps, method="pgd", steps=1).success) == 70
