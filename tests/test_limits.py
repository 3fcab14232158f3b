"""Limits ("Safe to expose"): streams and connections, a work budget per request, interactive
work that stops when its client goes away, and nothing slow on the event loop. The test of each
limit fails on the code without its fix; two more pin what must keep working (an upload that keeps
sending is never idle; the engine calls on_step after every step). What they close:

- 1,100 stalled uploads exhausted the file descriptors; 2,000 Watch streams were accepted
  (max_concurrent_uploads, upload_idle_timeout_s, max_watch_streams, max_concurrent_rpcs,
  max_connections, the keepalive and connection-age settings);
- one Attack of 1024 examples x 10,000 steps x 101 runs was accepted (max_attack_cost,
  max_operation_cost);
- an Attack whose deadline passed ran on in the one interactive thread for minutes;
- Train built its model on the event loop (an MLP of 300,000 units froze health checks 5.5 s).
"""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from advex.client import Client
from advex.engine.attacks import AttackConfig, attack
from advex.engine.builders import BuildConfig, InversionConfig
from advex.engine.loaders import safetensors_bytes
from advex.engine.train import TrainConfig
from advex.engine.zoo import MLP, Linear
from advex.service import config as config_mod
from advex.service import convert
from advex.service.errors import ServiceError
from advex.service.inprocess import InProcessServer
from advex.service.registry import MAX_ZOO_PARAMS
from advex.service.server import grpc_options
from advex.v1 import operation_pb2 as op_pb
from advex.v1 import resources_pb2 as res
from advex.v1 import results_pb2 as results
from advex.v1 import robustness_pb2 as rpc
from advex.v1.wire import to_tensor

FEATURES = 101  # the synthetic `tsipras` dataset's
WIDE = 4096     # features of the uploaded dataset the widest MLP is trained on
SETTINGS = dict(max_concurrent_uploads=2, max_watch_streams=2, upload_idle_timeout_s=1.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("advex")), data_roots=[], **SETTINGS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target) as c:
        yield c


def upload_zoo(client: Client, net, architecture: str, features: int, **arch_args) -> res.Model:
    return client.upload_model(safetensors_bytes(net), format="safetensors", architecture=architecture,
                               num_classes=2, input_shape=[features], arch_args=arch_args)


@pytest.fixture(scope="module")
def mlp(client):
    """An MLP on tsipras' 101 features, wide enough that a step of a 1024-example batch takes tens of ms."""
    torch.manual_seed(0)
    return upload_zoo(client, MLP(FEATURES, 2, hidden=2048), "mlp", FEATURES, hidden=2048)


def attack_request(model_id: str, n: int, features: int, steps: int, restarts: int = 0, method: str = "pgd"):
    x = np.random.default_rng(0).standard_normal((n, features)).astype(np.float32)
    return rpc.AttackRequest(model_id=model_id, x=to_tensor(x), y=to_tensor(np.zeros(n, np.int64)),
                             domain=res.REAL, attack=results.AttackSpec(method=method, norm=results.LINF, eps=0.1,
                                                                        steps=steps, restarts=restarts))


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def trickle(first, make, release: threading.Event, every: float = 0.2):
    """A request stream that sends `first`, then one small message every `every` s (well inside the
    idle timeout) until `release` is set: an upload in progress that holds its slot."""
    yield first
    while not release.wait(every):
        yield make(chunk=b"\0")


def stalled(first, release: threading.Event):
    """A request stream that sends `first` and then nothing until `release` (at most 30 s)."""
    yield first
    release.wait(30)


MODEL_HEAD = res.UploadModelRequest(spec=res.ModelSpec(format=res.SAFETENSORS, architecture="linear", num_classes=2,
                                                       input_shape=[FEATURES]))
DATASET_HEAD = res.UploadDatasetRequest(header=res.UploadDatasetHeader(split="train", domain=res.REAL))


def linear_bytes() -> bytes:
    torch.manual_seed(1)
    return safetensors_bytes(Linear(FEATURES, 2))


# ---------------------------------------------------------------- settings reach gRPC

def test_settings_reach_the_grpc_server_options():
    cfg = config_mod.from_kwargs(max_streams_per_connection=7, max_connections=9, keepalive_time_s=30,
                                 keepalive_timeout_s=5, keepalive_min_client_interval_s=15,
                                 max_connection_idle_s=600, max_connection_age_s=3600, max_connection_age_grace_s=1800)
    options = dict(grpc_options(cfg))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.max_allowed_incoming_connections"] == 9
    assert options["grpc.keepalive_time_ms"] == 30_000 and options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 15_000
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.max_connection_idle_ms"] == 600_000
    assert options["grpc.max_connection_age_ms"] == 3_600_000
    assert options["grpc.max_connection_age_grace_ms"] == 1_800_000
    assert options["grpc.so_reuseport"] == 0 and options["grpc.max_receive_message_length"] == 64 << 20
    off = dict(grpc_options(config_mod.from_kwargs(max_connection_idle_s=0, max_connection_age_s=0)))
    assert not {"grpc.max_connection_idle_ms", "grpc.max_connection_age_ms",
                "grpc.max_connection_age_grace_ms"} & set(off)


def test_limit_settings_come_from_the_environment_and_are_checked():
    cfg = config_mod.load(env={"ADVEX_MAX_ATTACK_COST": "1000", "ADVEX_UPLOAD_IDLE_TIMEOUT_S": "2.5",
                               "ADVEX_MAX_WATCH_STREAMS": "3"})
    assert (cfg.max_attack_cost, cfg.upload_idle_timeout_s, cfg.max_watch_streams) == (1000, 2.5, 3)
    with pytest.raises(config_mod.ConfigError,
                       match="max_concurrent_rpcs: '0' from environment ADVEX_MAX_CONCURRENT_RPCS is out of range"):
        config_mod.load(env={"ADVEX_MAX_CONCURRENT_RPCS": "0"})


# ---------------------------------------------------------------- streams and connections

def test_uploads_beyond_max_concurrent_uploads_are_resource_exhausted(server, client):
    release = threading.Event()
    holding = [client.stub.UploadModel.future(trickle(MODEL_HEAD, res.UploadModelRequest, release), timeout=60)
               for _ in range(SETTINGS["max_concurrent_uploads"])]
    try:
        time.sleep(0.5)  # both calls have reached their handler
        code, details = refused(lambda: client.upload_model(linear_bytes(), format="safetensors",
                                                            architecture="linear", num_classes=2,
                                                            input_shape=[FEATURES]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "max_concurrent_uploads" in details and "2 uploads are in progress" in details
        code, details = refused(lambda: client.upload_dataset(
            (np.zeros((4, FEATURES), np.float32), [0, 1, 0, 1]), domain="real"))  # the two kinds share the limit
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_uploads" in details
    finally:
        release.set()
    for call in holding:  # their bytes are no model: refused once they end, and their slots are free
        assert call.exception(timeout=30).code() == grpc.StatusCode.INVALID_ARGUMENT
    model = client.upload_model(linear_bytes(), format="safetensors", architecture="linear", num_classes=2,
                                input_shape=[FEATURES])
    assert model.id
    assert not list(server.running.registry.tmp_dir.glob("upload-*"))


def test_an_idle_upload_is_ended_after_upload_idle_timeout_s_and_its_file_removed(server, client):
    for method, head in (("UploadModel", MODEL_HEAD), ("UploadDataset", DATASET_HEAD)):
        release = threading.Event()
        t0 = time.monotonic()
        try:
            code, details = refused(lambda: getattr(client.stub, method)(stalled(head, release), timeout=20))
        finally:
            release.set()
        waited = time.monotonic() - t0
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        assert details.startswith("upload_idle_timeout_s: no message for 1 s"), details
        assert waited < 10, f"{method}: ended after {waited:.1f} s, not after the 1 s idle timeout"
        assert not list(server.running.registry.tmp_dir.glob("upload-*")), "the temporary file is left"


def test_an_upload_that_keeps_sending_outlives_the_idle_timeout(client):
    release = threading.Event()
    call = client.stub.UploadModel.future(trickle(MODEL_HEAD, res.UploadModelRequest, release, every=0.3), timeout=60)
    time.sleep(1.8)  # longer than the 1 s idle timeout, never idle for 1 s
    release.set()
    code = call.exception(timeout=30).code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # refused for its content, not ended as idle


@pytest.fixture
def long_operation(client):
    """A Train on tsipras that runs for many seconds (the op pool's one worker), cancelled afterwards."""
    op = client.train("linear", "tsipras", epochs=10000, batch_size=2000, limit=2000, lr=0.01, schedule="constant")
    yield op
    op.cancel()
    client.wait_operation(op.id, timeout=30)


def test_watch_streams_beyond_max_watch_streams_are_resource_exhausted(client, long_operation):
    request = op_pb.WatchOperationRequest(operation_id=long_operation.id)
    streams = [client.stub.WatchOperation(request, timeout=60) for _ in range(SETTINGS["max_watch_streams"])]
    try:
        for s in streams:
            assert next(s).id == long_operation.id  # open, and answered
        code, details = refused(lambda: next(client.stub.WatchOperation(request, timeout=30)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "max_watch_streams" in details and "WaitOperation" in details
        streams.pop().cancel()  # a client that goes away frees its slot
        deadline = time.monotonic() + 10
        while True:
            again = client.stub.WatchOperation(request, timeout=30)
            try:
                assert next(again).id == long_operation.id
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
        again.cancel()
    finally:
        for s in streams:
            s.cancel()


def test_calls_beyond_max_concurrent_rpcs_are_resource_exhausted(tmp_path):
    with InProcessServer(data_dir=str(tmp_path), data_roots=[], max_concurrent_rpcs=2) as srv, \
            Client(srv.target) as c:
        release = threading.Event()
        holding = [c.stub.UploadModel.future(trickle(MODEL_HEAD, res.UploadModelRequest, release), timeout=60)
                   for _ in range(2)]
        try:
            time.sleep(0.5)
            code, details = refused(lambda: c.list_models())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        finally:
            release.set()
        for call in holding:
            call.exception(timeout=30)
        assert c.list_models() == []


def test_connections_beyond_max_connections_are_closed(tmp_path):
    with InProcessServer(data_dir=str(tmp_path), data_roots=[], max_connections=2) as srv:
        # own subchannel pools: channels to one address would otherwise share one connection
        channels = [grpc.insecure_channel(srv.target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(3)]
        try:
            health = [health_pb2_grpc.HealthStub(ch) for ch in channels]
            for stub in health[:2]:
                assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                    health_pb2.HealthCheckResponse.SERVING
            code, _ = refused(lambda: health[2].Check(health_pb2.HealthCheckRequest(), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
        finally:
            for ch in channels:
                ch.close()


# ---------------------------------------------------------------- work budgets

def test_cost_is_examples_times_steps_times_runs_summed_over_the_work():
    cfg = config_mod.from_kwargs(max_attack_cost=1000, max_operation_cost=10**6)
    pgd, square = AttackConfig(steps=10, restarts=4), AttackConfig(method="square", steps=50)
    assert convert.check_cost(cfg, "max_attack_cost", 20, [pgd]) == 1000  # the limit itself is allowed
    with pytest.raises(ServiceError) as info:
        convert.check_cost(cfg, "max_attack_cost", 21, [pgd])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.message.startswith("cost 1,050 example-steps (21 examples × pgd 10 steps × 5 runs) exceeds "
                                         "max_attack_cost 1,000 (--max-attack-cost, ADVEX_MAX_ATTACK_COST)")
    assert convert.check_cost(cfg, "max_attack_cost", 20, [square]) == 1000  # Square: examples x queries
    assert convert.check_cost(cfg, "max_attack_cost", 7, [AttackConfig(method="fgsm")]) == 7
    assert convert.check_cost(cfg, "max_attack_cost", 7, [AttackConfig()]) == 70  # PGD's default: 10 steps
    # Evaluate: every (attack, eps)
    assert convert.check_cost(cfg, "max_operation_cost", 100, [pgd, pgd, square]) == 100 * (50 + 50 + 50)
    # Train: examples x epochs x (inner attack steps x runs + 1)
    assert convert.check_cost(cfg, "max_operation_cost", 100, [TrainConfig(epochs=3)]) == 300
    robust = TrainConfig(epochs=3, adversarial=AttackConfig(steps=7))
    assert convert.check_cost(cfg, "max_operation_cost", 100, [robust]) == 100 * 3 * 8
    # Robustify / BuildNonRobustDataset: inversion steps, or the relabelling attack's
    assert convert.check_cost(cfg, "max_operation_cost", 100,
                              [BuildConfig("d_r", inversion=InversionConfig(steps=1000))]) == 100_000
    relabel = BuildConfig("d_rand", attack=AttackConfig(steps=100, restarts=1, targeted=True))
    assert convert.check_cost(cfg, "max_operation_cost", 100, [relabel]) == 20_000
    # TransferRate: every source attacks every example
    assert convert.check_cost(cfg, "max_operation_cost", 100, [pgd], sources=3) == 15_000
    with pytest.raises(ServiceError) as info:
        convert.check_cost(cfg, "max_operation_cost", 20_000,
                           [TrainConfig(epochs=3, adversarial=AttackConfig(steps=7, restarts=1)), pgd])
    assert info.value.message.startswith(
        "cost 1,900,000 example-steps (20,000 examples × (3 epochs × (pgd 7 steps × 2 runs + 1) + pgd 10 steps × "
        "5 runs)) exceeds max_operation_cost 1,000,000 (--max-operation-cost, ADVEX_MAX_OPERATION_COST)")


def test_attack_over_max_attack_cost_is_resource_exhausted_naming_it(client, mlp):
    request = attack_request(mlp.id, 64, FEATURES, steps=10000, restarts=1)
    code, details = refused(lambda: client.stub.Attack(request, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("cost 1,280,000 example-steps (64 examples × pgd 10,000 steps × 2 runs) exceeds "
                              "max_attack_cost 1,048,576"), details
    square = attack_request(mlp.id, 1024, FEATURES, steps=1100, method="square")
    code, details = refused(lambda: client.stub.Attack(square, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "square 1,100 queries" in details


def test_evaluate_over_max_operation_cost_is_resource_exhausted_naming_it(client, mlp):
    code, details = refused(lambda: client.evaluate(
        mlp.id, "tsipras", attacks=[{"norm": "Linf", "eps": [0.1, 0.2, 0.3, 0.4, 0.5], "steps": 10000,
                                     "restarts": 100}]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("cost 10,100,000,000 example-steps (2,000 examples × 5 × pgd 10,000 steps × 101 runs) "
                              "exceeds max_operation_cost 10,000,000,000"), details


def test_train_over_max_operation_cost_is_resource_exhausted_naming_it(client):
    code, details = refused(lambda: client.train("linear", "tsipras", epochs=10000, batch_size=100, limit=1000,
                                                 adversarial={"norm": "Linf", "eps": 0.1, "steps": 1000}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("cost 10,010,000,000 example-steps (1,000 examples × 10,000 epochs × "
                              "(pgd 1,000 steps + 1)) exceeds max_operation_cost"), details


# ---------------------------------------------------------------- interactive work stops with its client

def small_attack_seconds(client: Client, model_id: str) -> float:
    t0 = time.perf_counter()
    client.stub.Attack(attack_request(model_id, 2, FEATURES, steps=1), timeout=30)
    return time.perf_counter() - t0


def test_an_attack_past_its_deadline_stops_and_frees_the_pool(client, mlp):
    small_attack_seconds(client, mlp.id)  # the model is loaded and cached
    big = attack_request(mlp.id, 1024, FEATURES, steps=1024)  # the budget's largest: about a minute of work
    t0 = time.perf_counter()
    code, _ = refused(lambda: client.stub.Attack(big, timeout=1.5))
    cancelled = time.perf_counter()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and cancelled - t0 < 10
    small_attack_seconds(client, mlp.id)
    freed = time.perf_counter() - cancelled  # from the deadline to the small Attack's answer
    print(f"deadline: a small Attack completed {freed * 1000:.0f} ms after the big one's deadline passed")
    assert freed < 1.0, f"the interactive pool was busy {freed:.1f} s after the deadline"


def test_an_attack_cancelled_by_its_client_stops_and_frees_the_pool(client, mlp):
    small_attack_seconds(client, mlp.id)
    call = client.stub.Attack.future(attack_request(mlp.id, 1024, FEATURES, steps=1024), timeout=120)
    time.sleep(1.5)  # well into its steps
    assert not call.done()
    call.cancel()
    cancelled = time.perf_counter()
    assert call.cancelled() and call.code() == grpc.StatusCode.CANCELLED
    small_attack_seconds(client, mlp.id)
    freed = time.perf_counter() - cancelled
    print(f"client cancel: a small Attack completed {freed * 1000:.0f} ms after the big one was cancelled")
    assert freed < 1.0, f"the interactive pool was busy {freed:.1f} s after the cancel"


@pytest.mark.parametrize("method,steps,restarts,calls", [("pgd", 5, 2, 15), ("fgsm", 0, 0, 1), ("square", 8, 0, 7)])
def test_the_engine_calls_on_step_every_step_and_stops_when_it_raises(method, steps, restarts, calls):
    torch.manual_seed(0)
    net, x, y = Linear(FEATURES, 2), torch.randn(4, FEATURES), torch.zeros(4, dtype=torch.long)
    cfg = AttackConfig(norm="Linf", eps=1e-6, method=method, steps=steps, restarts=restarts)  # too small to succeed
    seen = []
    attack(net, x, y, cfg, box=None, on_step=lambda step, total: seen.append(step))
    assert seen == list(range(1, calls + 1))

    class Stop(Exception):
        pass

    def stop_at_first(step, total):
        raise Stop()

    with pytest.raises(Stop):
        attack(net, x, y, cfg, box=None, on_step=stop_at_first)


# ---------------------------------------------------------------- nothing slow on the event loop

def widest_mlp_hidden(features: int, classes: int = 2) -> int:
    """The widest MLP that validate_model_spec accepts on `features` inputs (registry._zoo_size)."""
    return min(65536, MAX_ZOO_PARAMS // (features + classes + 1))


def health_under_load(server, client: Client, mlp: res.Model) -> list[tuple[float, str]]:
    """(seconds, what was being sent meanwhile) of health checks sent every 10 ms from their own
    connection while the heaviest request of each kind is accepted."""
    latencies: list[tuple[float, str]] = []
    doing = ["nothing"]
    stop = threading.Event()

    def probe() -> None:
        with grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
            while not stop.is_set():
                what, t0 = doing[0], time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                latencies.append((time.perf_counter() - t0, what))
                stop.wait(0.01)

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1024, WIDE)).astype(np.float32), rng.integers(0, 2, 1024)
    torch.manual_seed(0)
    big_model = safetensors_bytes(MLP(WIDE, 2, hidden=2048))  # 8.4 M parameters: 32 MiB
    assert len(big_model) > 30 << 20
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    ops = []
    try:
        time.sleep(0.3)
        doing[0] = "dataset upload (16 MiB)"
        data = client.upload_dataset((x, y), domain="real", name="wide")
        doing[0] = "model upload (32 MiB)"
        client.upload_model(big_model, format="safetensors", architecture="mlp", num_classes=2, input_shape=[WIDE],
                            arch_args={"hidden": 2048})
        doing[0] = "model upload (small)"
        linear = upload_zoo(client, Linear(WIDE, 2), "linear", WIDE)
        doing[0] = "Attack of the largest batch the budget allows"
        code, _ = refused(lambda: client.stub.Attack(attack_request(mlp.id, 1024, FEATURES, steps=1024), timeout=1))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # (it stops at its next step)
        doing[0] = "Evaluate of 16 attacks x 8 radii"  # the op pool's one worker runs it...
        ops.append(client.evaluate(linear.id, data.id, split="train", attacks=[
            {"norm": "Linf", "eps": [0.01 * (k + 1) for k in range(8)], "steps": 20, "seed": s} for s in range(16)]))
        doing[0] = "Train of the widest MLP the limits allow"  # ...so this one (1 GiB of parameters) waits
        ops.append(client.train("mlp", data.id, arch_args={"hidden": widest_mlp_hidden(WIDE)}, epochs=1))
        doing[0] = "cancelling"
    finally:
        for op in reversed(ops):  # the queued Train first: it is never built
            op.cancel()
        time.sleep(0.3)
        stop.set()
        thread.join(timeout=30)
    for op in ops:
        assert client.wait_operation(op.id, timeout=30).state == "CANCELLED"
    assert len(latencies) >= 20
    return latencies


def test_health_answers_within_100_ms_while_the_heaviest_requests_are_accepted(server, client, mlp):
    """Built on the event loop, the Train's 1 GiB MLP held every health check for seconds (1.8 to 7 s
    here); now none takes 100 ms. One more try when the first sees a spike: this VM shares two
    cores with other work, and a check has taken 111 ms while the server sat idle; the loop
    blocking fails both tries."""
    for attempt in (1, 2):
        latencies = health_under_load(server, client, mlp)
        worst, during = max(latencies)
        print(f"health (try {attempt}): {len(latencies)} checks, max {worst * 1000:.1f} ms (during: {during}), "
              f"median {sorted(latencies)[len(latencies) // 2][0] * 1000:.1f} ms")
        if worst < 0.1:
            break
    assert worst < 0.1, f"a health check took {worst * 1000:.0f} ms during: {during}"


def test_a_long_wait_operation_is_answered_after_the_servers_longest_wait(tmp_path, monkeypatch):
    """A WaitOperation holds a call slot (max_concurrent_rpcs): a client asking for a day gets the
    current state after MAX_WAIT_S (here shortened) instead."""
    from advex.service import servicer

    monkeypatch.setattr(servicer, "MAX_WAIT_S", 0.5)
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv, Client(srv.target) as c:
        op = c.train("mlp", "tsipras", epochs=200, batch_size=10, schedule="constant")
        t0 = time.monotonic()
        now = c.stub.WaitOperation(op_pb.WaitOperationRequest(operation_id=op.id, timeout_seconds=86400),
                                   timeout=30)
        assert not now.done and time.monotonic() - t0 < 10
        c.cancel_operation(op.id)
