"""The asyncio client (advex.client.AsyncClient on grpc.aio): the methods of Client, as coroutines,
giving the same answers, and never blocking the event loop, so that operations run concurrently.
Also the progress rule of Operation.result (no bar unless a terminal, a notebook, or asked)."""
from __future__ import annotations

import asyncio
import inspect

import grpc
import numpy as np
import pytest

from advex.client import AsyncClient, AsyncOperation, Client, Evaluation, OperationError, Training
from advex.client.sdk import _Api

TRAIN = dict(epochs=1, batch_size=100, lr=0.1, schedule="constant", weight_decay=0.0, limit=1000)
PGD = [{"norm": "Linf", "eps": [0.3, 0.6], "steps": 5, "seed": 1}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from advex.service.inprocess import InProcessServer

    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("advex")), data_roots=[], workers=2,
                         max_queue=32) as srv:
        yield srv


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.train("linear", "tsipras", seed=5, **TRAIN).result(progress=False).model_id


def run(coro, timeout: float = 300):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_every_client_method_is_on_the_async_client_with_the_same_signature():
    public = [n for n, f in inspect.getmembers(Client, inspect.isfunction) if not n.startswith("_")]
    assert len(public) >= 25 and {"attack", "evaluate", "audit", "list_audits", "upload_model"} <= set(public)
    for name in public:
        mine, theirs = getattr(AsyncClient, name), getattr(Client, name)
        assert inspect.signature(mine) == inspect.signature(theirs), name
        if name not in ("close", "wait_ready"):  # the RPC methods: one definition, shared
            assert mine is theirs and name in vars(_Api), name
    for primitive in ("_unary", "_upload", "_download", "_pages", "close", "wait_ready"):
        assert inspect.iscoroutinefunction(getattr(AsyncClient, primitive)), primitive


def test_operations_run_concurrently_and_agree_with_the_blocking_client(server, client, model_id):
    """A training that would run for minutes is cancelled by a second task while a first task awaits
    its result: this ends only if awaiting never blocks the loop. Meanwhile two evaluations and
    three attacks run at once and give exactly the blocking client's answers."""
    xs = np.random.default_rng(0).normal(size=(12, 101)).astype(np.float32)  # tsipras: 101 features
    y = np.arange(12) % 2

    async def main():
        async with AsyncClient(server.target) as ac:
            await ac.wait_ready(10)
            long = await ac.train("mlp", "tsipras", epochs=30, batch_size=10, schedule="constant", limit=10000)
            assert isinstance(long, AsyncOperation)

            async def cancel_when_running():
                async for op in long.watch():
                    if op.progress.done >= 2:
                        return await long.cancel()

            evals = [await ac.evaluate(model_id, "tsipras", limit=300, attacks=PGD) for _ in range(2)]
            outcome = await asyncio.gather(
                long.result(progress=False), cancel_when_running(),
                *(op.result(progress=False) for op in evals),
                *(ac.attack(model_id, xs[k::3], y[k::3], norm="L2", eps=1.0, steps=5, seed=2, domain="real")
                  for k in range(3)),
                ac.list_models(page_size=1),
                return_exceptions=True)
            return outcome

    long_result, cancelled, ev1, ev2, *rest = run(main())
    attacks, models = rest[:3], rest[3]
    assert isinstance(long_result, OperationError) and long_result.code == "CANCELLED"
    # the cancel answers at once (RUNNING until the worker stops at its next step); the awaited
    # result is what ends CANCELLED
    assert cancelled.id == long_result.operation.id and cancelled.state in ("RUNNING", "CANCELLED")
    blocking = client.evaluate(model_id, "tsipras", limit=300, attacks=PGD).result(progress=False)
    for ev in (ev1, ev2):
        assert isinstance(ev, Evaluation) and ev.model_id == model_id
        assert [r.robust_correct for r in ev.robust] == [r.robust_correct for r in blocking.robust]
        assert ev.clean_correct == blocking.clean_correct
    for k, a in enumerate(attacks):
        same = client.attack(model_id, xs[k::3], y[k::3], norm="L2", eps=1.0, steps=5, seed=2, domain="real")
        # the three concurrent calls ran merged into one engine batch: the same as alone up to the
        # float rounding of a larger matrix product
        np.testing.assert_allclose(a.x_adv, same.x_adv, rtol=0, atol=1e-6)
        assert a.adv_pred.tolist() == same.adv_pred.tolist()
    assert [m.id for m in models] == [m.id for m in client.list_models()]


def test_async_results_streams_and_errors(server, client, model_id):
    x = np.random.default_rng(3).normal(size=(40, 101)).astype(np.float32)
    y = (np.arange(40) % 2).astype(np.int64)

    async def main():
        async with AsyncClient(server.target) as ac:
            op = await ac.train("linear", "tsipras", seed=9, **TRAIN)
            seen = [o.progress.done async for o in op.watch()]
            trained = await op.result()
            ds = await ac.upload_dataset((x, y), name="tiny", domain="real")
            back = await ac.download_dataset(ds.id)
            ops = await ac.list_operations(kind="train", limit=2)
            try:
                await ac.get_model("m-nope")
            except grpc.RpcError as exc:
                missing = exc.code()
            await ac.delete_dataset(ds.id)
            return seen, trained, op.id, back, ops, missing

    seen, trained, train_id, (bx, by), ops, missing = run(main())
    assert seen == sorted(seen) and seen[-1] > 0
    assert isinstance(trained, Training) and len(trained.history) == 1
    assert client.get_model(trained.model_id).sha256 == trained.model_sha256
    assert bx.tobytes() == x.tobytes() and by.tolist() == y.tolist()
    assert len(ops) == 2 and all(isinstance(o, AsyncOperation) for o in ops) and ops[0].id == train_id
    assert missing == grpc.StatusCode.NOT_FOUND


def test_a_result_shows_no_progress_bar_off_a_terminal_unless_asked(client, capfd):
    quiet = client.train("linear", "tsipras", seed=11, **TRAIN)
    quiet.result()  # pytest's stderr is not a terminal, and no notebook is running
    assert capfd.readouterr().err == ""
    loud = client.train("linear", "tsipras", seed=12, **TRAIN)
    loud.result(progress=True)
    err = capfd.readouterr().err
    assert "train epoch 1/1" in err and "10/10" in err and "batches" in err
