"""advex.v1.Robustness: thin handlers that validate, hand engine work to the worker pools,
and translate results. Every handler goes through ``_guard``: auth, metrics, and the
mapping of errors to precise gRPC statuses (a handler never kills the server)."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import grpc
import numpy as np
import torch
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from advex.engine import zoo
from advex.engine.attacks import GRADIENT_FREE, AttackConfig, attack
from advex.engine.batching import attack_batch
from advex.engine.builders import BuildConfig, build, summarize
from advex.engine.evaluate import EvalReport, evaluate, gradient_masking_notes, minimal_distances, robustness_curve
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.onnx_model import export_onnx
from advex.engine.train import TrainState, load_state, save_state, train
from advex.engine.transfer import DEFINITION as TRANSFER_DEFINITION, transfer_rates
from advex.service import audits, convert, endpoints, logs
from advex.service.artifacts import CHUNK, BuildCheckpoint, NpzShardWriter, file_sha256, npz_bytes
from advex.service.batcher import AttackBatcher
from advex.service.config import ServerConfig
from advex.service.errors import ServiceError, exhausted, invalid, precondition
from advex.service.metrics import Metrics
from advex.service.operations import Cancelled, OperationManager, OpContext, Work
from advex.service.registry import Registry, UploadSink, check_text, derived_id, validate_model_spec
from advex.v1 import operation_pb2 as op_pb
from advex.v1 import resources_pb2 as res
from advex.v1 import results_pb2 as results
from advex.v1 import robustness_pb2 as rpc
from advex.v1 import robustness_pb2_grpc as rpc_grpc
from advex.v1.wire import to_tensor

log = logging.getLogger("advex.service")
rpc_log = logging.getLogger("advex.rpc")


SERVICE = rpc.DESCRIPTOR.services_by_name["Robustness"]
REQUEST_TYPES = {m.name: message_factory.GetMessageClass(m.input_type) for m in SERVICE.methods}
MAX_STATUS_BYTES = 1024  # status messages travel in HTTP/2 trailers: keep them well under the 8 KiB limit
MAX_TRANSFER_MODELS = 16  # sources, and targets, of one TransferRate
MAX_WAIT_S = 60.0  # longest WaitOperation; the SDK waits in rounds of 30 s
DISTANCE_STEPS = 100  # FAB-T's steps for minimal distances (AutoAttack's standard)
LONG_POLLS = ("WaitOperation",)  # unary calls that wait by design: left out of the latency histogram


def _clip(message: str, limit: int = MAX_STATUS_BYTES) -> str:
    """At most `limit` UTF-8 bytes (cut on a character boundary), so that a status message echoing
    a long or odd request value still fits in the trailers."""
    raw = message.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return raw.decode("utf-8")
    return raw[:limit - 3].decode("utf-8", "ignore") + "..."


def _decode(cls, raw, what: str = ""):
    """The service is registered without deserializers (see add_to_server), so that bytes that
    are not a valid message are this handler's to refuse: INVALID_ARGUMENT, not gRPC's own
    UNKNOWN / INTERNAL. A message object (a direct call) passes through."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return raw
    try:
        return cls.FromString(bytes(raw))
    except (DecodeError, RecursionError, ValueError) as exc:
        raise invalid("request", f"{what}not a valid {cls.DESCRIPTOR.full_name} message") from exc


async def _decoded_stream(cls, iterator):
    k = 0
    async for raw in iterator:
        yield _decode(cls, raw, f"message {k} of the stream is ")
        k += 1


def _guard(streaming: bool = False):
    """Auth + request decoding + metrics + error mapping for unary (and client-streaming) or
    server-streaming handlers. The request type and streaming kinds come from the service
    descriptor; `streaming` (server streaming) must agree with it."""

    def wrap(fn):
        method = fn.__name__
        desc = SERVICE.methods_by_name[method]
        if desc.server_streaming != streaming:
            raise TypeError(f"{method}: _guard(streaming={streaming}) but the RPC is "
                            f"{'' if desc.server_streaming else 'not '}server-streaming")
        request_type = REQUEST_TYPES[method]

        def decode(request):
            if desc.client_streaming:
                return _decoded_stream(request_type, request)
            return _decode(request_type, request)

        # a call that lasts as long as what it waits for (a stream, a long poll) is not a latency
        long_lived = desc.server_streaming or method in LONG_POLLS

        def begin(context) -> tuple[float, dict]:
            rid = logs.request_id(context.invocation_metadata())
            try:
                context.set_trailing_metadata(((logs.REQUEST_ID_HEADER, rid),))
            except Exception:  # noqa: BLE001 - a direct call's stand-in context may not take metadata
                pass
            return time.perf_counter(), {"request_id": rid, "method": method, "code": "OK"}

        def end(self, t0: float, line: dict) -> None:
            elapsed = time.perf_counter() - t0
            if not long_lived:
                self.metrics.latency.labels(method).observe(elapsed)
            line["duration_ms"] = round(elapsed * 1000, 3)
            rpc_log.info("%s %s %.1f ms", method, line["code"], elapsed * 1000, extra=line)

        async def fail(self, context, exc: BaseException, line: dict):
            if isinstance(exc, ServiceError):
                code, msg = exc.code, exc.message
            else:
                log.exception("%s failed", method, extra={"request_id": line["request_id"]})
                code, msg = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            line["code"] = code.name
            self.metrics.requests.labels(method, code.name).inc()
            await context.abort(code, _clip(msg))

        if streaming:
            @functools.wraps(fn)
            async def stream_handler(self, request, context):
                t0, line = begin(context)
                try:
                    self._authorize(context)
                    async for item in fn(self, decode(request), context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:
                    line["code"] = "CANCELLED"
                    raise
                except Exception as exc:
                    await fail(self, context, exc, line)
                else:
                    self.metrics.requests.labels(method, "OK").inc()
                finally:
                    end(self, t0, line)
            stream_handler.guarded = True
            return stream_handler

        @functools.wraps(fn)
        async def handler(self, request, context):
            t0, line = begin(context)
            try:
                self._authorize(context)
                response = await fn(self, decode(request), context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                line["code"] = "CANCELLED"
                raise
            except Exception as exc:
                await fail(self, context, exc, line)
            else:
                self.metrics.requests.labels(method, "OK").inc()
                return response
            finally:
                end(self, t0, line)
        handler.guarded = True
        return handler

    return wrap


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: "RobustnessServicer", server) -> None:
    """Register every RPC of advex.v1.Robustness, built from the service descriptor, with no
    request deserializer: each handler receives the raw bytes and decodes them inside its
    _guard, so that an undecodable message is INVALID_ARGUMENT (and counted in the metrics)
    wherever gRPC lets the server decide. Replaces the generated add_RobustnessServicer_to_server."""
    handlers = {}
    for m in SERVICE.methods:
        behaviour = getattr(servicer, m.name)
        if not getattr(behaviour, "guarded", False):
            raise TypeError(f"RobustnessServicer.{m.name} is not wrapped in _guard")
        response_type = message_factory.GetMessageClass(m.output_type)
        handlers[m.name] = _HANDLER_KINDS[m.client_streaming, m.server_streaming](
            behaviour, request_deserializer=None, response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.63
        server.add_registered_method_handlers(SERVICE.full_name, handlers)


def token_problem(metadata, token) -> str:
    """Why a call's metadata does not carry the bearer token, or "" when it does (or no token
    is set). Exactly one authorization header, compared in constant time."""
    if not token:
        return ""
    sent = [value for key, value in (metadata or ()) if key.lower() == "authorization"]
    if len(sent) > 1:
        return "send one authorization header (this call has several)"
    if not sent:
        return "missing bearer token (authorization metadata)"
    value = sent[0].encode() if isinstance(sent[0], str) else bytes(sent[0])
    if not hmac.compare_digest(value, f"Bearer {token}".encode()):
        return "wrong bearer token (authorization metadata)"
    return ""


class RobustnessServicer(rpc_grpc.RobustnessServicer):
    def __init__(self, cfg: ServerConfig, registry: Registry, ops: OperationManager, metrics: Metrics,
                 device: torch.device) -> None:
        self.cfg = cfg
        self.registry = registry
        self.ops = ops
        self.metrics = metrics
        self.device = device
        self._uploads = 0  # calls in progress, on the event loop's thread only
        self.batcher = AttackBatcher(ops, window_s=cfg.attack_merge_window_ms / 1000, max_rows=cfg.attack_merge_rows,
                                     max_waiting_rows=max(cfg.attack_merge_rows, cfg.max_batch) * 4,
                                     on_batch=lambda calls, rows: metrics.attack_batch_calls.observe(calls))
        self._watches = 0

    def resumers(self) -> dict:
        """The kinds of operation that resume after a restart: kind -> (request type, planner)."""
        return {"train": (rpc.TrainRequest, self._plan_train),
                "robustify": (rpc.RobustifyRequest, self._plan_robustify),
                "build_nonrobust": (rpc.BuildNonRobustDatasetRequest, self._plan_build_nonrobust)}

    def _authorize(self, context) -> None:
        problem = token_problem(context.invocation_metadata(), self.cfg.token)
        if problem:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, problem)

    # ------------------------------------------------------------------ Attack
    @_guard()
    async def Attack(self, request: rpc.AttackRequest, context) -> rpc.AttackResponse:
        model = self.registry.get_model(request.model_id)
        x, y = await asyncio.to_thread(convert.inline_batch, request, model, self.cfg)  # up to 64 MiB: off the loop
        boxed = request.domain == res.IMAGE
        dim = int(np.prod(x.shape[1:]))
        cfg = convert.attack_config(request.attack, "attack", self.cfg, dim, boxed,
                                    check_radius=not request.HasField("eps"))
        eps = convert.per_example_eps(request, cfg, len(x), dim, boxed)
        _require_gradients(model, cfg.method, "attack.method")
        convert.check_cost(self.cfg, "max_attack_cost", len(x), [cfg])

        def run(x: np.ndarray, y: np.ndarray, eps, segments, on_step):  # on_step raises once nobody waits
            _, wrapper = self.registry.load_model(model.id)
            xt = torch.tensor(x, device=self.device)  # copies the read-only wire buffer
            yt = torch.tensor(y, device=self.device)
            et = torch.tensor(eps, device=self.device) if eps is not None else None
            done = attack(wrapper.logits, xt, yt, cfg, box=(0.0, 1.0) if boxed else None, on_step=on_step,
                          eps=et, segments=segments)
            # to the host here, in the worker: the event loop then only slices and serializes
            host = {f.name: getattr(done, f.name).detach().cpu() for f in dataclasses.fields(done)
                    if isinstance(getattr(done, f.name), torch.Tensor)}
            return dataclasses.replace(done, **host), endpoints.usage_of(wrapper)

        if self.batcher.merges(cfg.method):  # concurrent calls of the same kind share an engine batch
            key = (model.id, model.sha256, cfg, boxed, x.shape[1:], eps is not None)
            out, usage = await self.batcher.submit(key, x, y, eps, run)
        else:
            out, usage = await self.ops.run_interactive(lambda on_step: run(x, y, eps, None, on_step),
                                                        cancellable=True)
        self.metrics.images.labels("attack").inc(len(x))
        return rpc.AttackResponse(
            x_adv=to_tensor(out.x_adv.numpy()), clean_pred=to_tensor(out.clean_pred.numpy()),
            adv_pred=to_tensor(out.adv_pred.numpy()), success=to_tensor(out.success.numpy()),
            perturbation_norm=to_tensor(out.distance.numpy()), attack=convert.attack_spec(out.config),
            model_sha256=model.sha256,
            queries=to_tensor(out.queries.numpy()) if out.queries is not None else None, endpoint_usage=usage)

    # ------------------------------------------------------------------ Evaluate
    @_guard()
    async def Evaluate(self, request: rpc.EvaluateRequest, context) -> op_pb.Operation:
        plan = self._plan_evaluate(request)
        return self.ops.submit("evaluate", request, lambda ctx: ("evaluate", plan.run(ctx)), plan.resources)

    def _plan_evaluate(self, request: rpc.EvaluateRequest, field: str = "") -> "_EvaluationPlan":
        """A checked evaluation: what Evaluate runs, and an Audit for each target. `field`
        prefixes the model's field in errors (an audit's targets[k])."""
        try:
            model, dataset, split = self._model_and_dataset(request, "test")
        except ServiceError as exc:
            if field and exc.message.startswith("model_id"):
                exc.message = field + exc.message[len("model_id"):]
            raise
        if not 0 <= request.batch_size <= 4096:
            raise invalid("batch_size", "must be in [0, 4096] (0 = 256 on the CPU, the largest that fits on a GPU), "
                                        f"got {request.batch_size}")
        boxed = dataset.domain == res.IMAGE
        sweeps = convert.sweeps(request, self.cfg, int(np.prod(dataset.example_shape)), boxed)
        skipped = []
        surrogate = None
        if request.surrogate_model_id:
            surrogate = self.registry.get_model(request.surrogate_model_id, "surrogate_model_id")
            convert.shapes_match(surrogate, dataset, "surrogate_model_id")
            _require_gradients(surrogate, "pgd", "surrogate_model_id")
        if not model.has_gradients and surrogate is None:  # a black box: only gradient-free attacks
            skipped = [(sw, f"model {model.id!r} is {_black_box(model)} without gradients: the white-box "
                            f"{sw.config.method} attack cannot run; use method 'square' (black box), or set "
                            "surrogate_model_id to craft it on a torch model (transfer)") for sw in sweeps if sw.config.method not in GRADIENT_FREE]
            sweeps = [sw for sw in sweeps if sw.config.method in GRADIENT_FREE]
        distance_norms = convert.distance_norms(request)
        if distance_norms and not model.has_gradients:
            raise precondition(f"minimal_distance: model {model.id!r} is {_black_box(model)} without gradients; "
                               "FAB-T, which measures minimal distances, needs them")
        fab_configs = [AttackConfig(norm=norm, method="fab-t", steps=DISTANCE_STEPS) for norm in distance_norms]
        convert.check_cost(self.cfg, "max_operation_cost", convert.examples_in(dataset, split, request.limit),
                           [c for sw in sweeps for c in sw.configs()] + fab_configs)

        def run(ctx: OpContext) -> results.EvaluateResult:
            t0 = time.perf_counter()
            _, wrapper = self.registry.load_model(model.id)
            crafter = self.registry.load_model(surrogate.id)[1] if surrogate is not None else None
            data = self.registry.load_dataset(dataset.id, split).subset(int(request.limit))
            # 0: 256 on the CPU, the largest that fits on a GPU
            batch_size = request.batch_size or attack_batch(wrapper, tuple(data.example_shape), self.device, 256)
            report = evaluate(wrapper, data, sweeps, batch_size=batch_size, device=self.device,
                              on_progress=lambda d, t, s: ctx.progress(d, t, "images", s), surrogate=crafter,
                              on_step=lambda step, total: ctx.check_cancelled())
            self.metrics.images.labels("evaluate").inc(report.num_examples + sum(r.clean_correct for r in report.rows))
            self._record_accuracy(model.id, dataset.id, report)
            result = self._evaluate_result(model, dataset.id, split, report, time.perf_counter() - t0)
            usage = endpoints.usage_of(wrapper)
            if usage is not None:
                result.endpoint_usage.CopyFrom(usage)
            if surrogate is not None:
                for row in result.robust:
                    if row.attack.method not in GRADIENT_FREE:
                        row.crafted_on_model_id = surrogate.id
            for sweep, reason in skipped:
                for cfg in sweep.configs():
                    result.skipped.add(attack=convert.attack_spec(cfg), reason=reason)
            for norm in distance_norms:
                t1 = time.perf_counter()
                distance = minimal_distances(wrapper, data, norm, steps=DISTANCE_STEPS, batch_size=batch_size,
                                             device=self.device,
                                             on_progress=lambda d, t, s: ctx.progress(d, t, "images", s))
                curve = result.distance_curves.add(norm=convert.NORM_ENUM[norm], method="fab-t",
                                                   per_example=to_tensor(distance.numpy()),
                                                   median_distance=float(distance.median()) if len(distance) else 0.0)
                for eps, robust in robustness_curve(distance):
                    point = curve.points.add(eps=eps, robust_correct=robust,
                                             robust_accuracy=robust / len(distance))
                    convert.interval(point.robust_accuracy_ci, robust, len(distance))
                curve.wall_seconds = time.perf_counter() - t1
            return result

        used = {("model", model.id), ("dataset", dataset.id)} | ({("model", surrogate.id)} if surrogate else set())
        return _EvaluationPlan(model, dataset, split, sweeps + [sw for sw, _ in skipped], sweeps, run,
                               frozenset(used))

    def _evaluate_result(self, model: res.Model, dataset_id: str, split: str, rep: EvalReport,
                         wall: float) -> results.EvaluateResult:
        out = results.EvaluateResult(
            model_id=model.id, model_sha256=model.sha256, dataset_id=dataset_id, split=split,
            num_examples=rep.num_examples, clean_accuracy=rep.clean_accuracy, clean_correct=rep.clean_correct,
            per_class_accuracy=rep.per_class_accuracy, per_class_count=rep.per_class_count, wall_seconds=wall,
            device=str(self.device))
        convert.interval(out.clean_accuracy_ci, rep.clean_correct, rep.num_examples)
        for row in rep.rows:
            added = out.robust.add(attack=convert.attack_spec(row.config), robust_accuracy=row.robust_accuracy,
                                   robust_correct=row.robust_correct, total=row.total, success_rate=row.success_rate,
                                   per_class_robust_accuracy=row.per_class, wall_seconds=row.wall_seconds,
                                   mean_queries=row.mean_queries, suite=row.suite)
            convert.interval(added.robust_accuracy_ci, row.robust_correct, row.total)
        masking = gradient_masking_notes(rep.rows)
        out.gradient_masking_suspected = bool(masking)
        out.notes.extend(masking)
        out.notes.extend(rep.notes)
        for wc in rep.worst_case:
            added = out.worst_case.add(
                norm=convert.NORM_ENUM[wc.norm], eps=wc.eps,
                robust_accuracy=wc.robust_correct / rep.num_examples if rep.num_examples else 0.0,
                robust_correct=wc.robust_correct, per_example=to_tensor(wc.robust_mask.numpy().astype(np.uint8)))
            convert.interval(added.robust_accuracy_ci, wc.robust_correct, rep.num_examples)
        return out

    def _record_accuracy(self, model_id: str, dataset_id: str, rep: EvalReport) -> None:
        """The accuracy gauges, and their values in the store (restore_gauges sets them again at
        the next start)."""
        robust = [(wc.norm, float(wc.eps), wc.robust_correct / rep.num_examples if rep.num_examples else 0.0)
                  for wc in rep.worst_case]
        when = time.time()
        self.metrics.record_accuracy(model_id, dataset_id, rep.clean_accuracy, robust, when)
        self.registry.store.put_accuracy(model_id, dataset_id, json.dumps(
            {"clean": rep.clean_accuracy, "robust": robust, "time": when}))

    def restore_gauges(self) -> None:
        """The accuracy and audit gauges as they were before a restart, from the store."""
        for model_id, dataset_id, _, value in self.registry.store.accuracies():
            try:
                v = json.loads(value)
                self.metrics.record_accuracy(model_id, dataset_id, float(v["clean"]),
                                             [(str(n), float(e), float(a)) for n, e, a in v["robust"]], float(v["time"]))
            except (ValueError, KeyError, TypeError):
                log.warning("accuracy record of model %s on %s is unreadable; its gauges stay unset", model_id,
                            dataset_id)
        models: dict = {}
        for blob in self.registry.store.latest_audits():
            record = results.AuditRecord.FromString(blob)
            if record.model_id not in models:
                found = self.registry.store.get_resource("models", record.model_id, res.Model)
                models[record.model_id] = found[0] if found else None
            model = models[record.model_id]
            # a deleted target's records stay (history), its gauges do not; nor do those of an earlier
            # registration of an endpoint deleted and registered again under the same id
            if model is not None and record.create_time.ToNanoseconds() >= model.create_time.ToNanoseconds():
                self._audit_gauges(record)

    def _audit_gauges(self, record: results.AuditRecord) -> None:
        ev = record.evaluation
        suite = next((r.suite for r in ev.robust if r.suite), "")
        robust = [(convert.NORM_NAMES[wc.norm], wc.eps, wc.robust_accuracy) for wc in ev.worst_case]
        self.metrics.record_audit(record.model_id, record.audit_name, ev.dataset_id, suite, ev.clean_accuracy,
                                  robust, record.passed, record.create_time.ToMicroseconds() / 1e6)

    # ------------------------------------------------------------------ Train
    @_guard()
    async def Train(self, request: rpc.TrainRequest, context) -> op_pb.Operation:
        return self.ops.submit("train", request, *await self._plan_train(request), resumable=True)

    async def _plan_train(self, request: rpc.TrainRequest) -> tuple[Work, frozenset]:
        """A checked Train request's work (checkpointed every epoch, and at shutdown after the
        current batch) and the resources it holds: for the RPC, and again to resume it after a restart."""
        arch = request.architecture
        if arch not in zoo.ARCHITECTURES:
            raise invalid("architecture", f"unknown architecture {arch!r}; expected one of {sorted(zoo.ARCHITECTURES)}")
        dataset = self.registry.get_dataset(request.dataset_id)
        split = self.registry.resolve_split(dataset, request.split, "train")
        if request.limit < 0:
            raise invalid("limit", f"must be >= 0 (0 = all), got {request.limit}")
        boxed = dataset.domain == res.IMAGE
        tc = convert.train_config(request, self.cfg, int(np.prod(dataset.example_shape)), boxed)
        if tc.augment and len(dataset.example_shape) != 3:
            raise invalid("augment", "random crop + flip needs image data [C,H,W]")
        spec = res.ModelSpec(name=request.name, format=res.SAFETENSORS, architecture=arch,
                             num_classes=dataset.num_classes, input_shape=dataset.example_shape,
                             mean=request.mean, std=request.std, arch_args=request.arch_args)
        validate_model_spec(spec, "TrainRequest")  # bounds arch_args before anything is built
        convert.check_cost(self.cfg, "max_operation_cost", convert.examples_in(dataset, split, request.limit), [tc])

        def fail_fast() -> None:  # on the meta device: the same checks, no memory, no initialisation
            with torch.device("meta"):  # (thread-local: other threads' tensors are untouched)
                zoo.build(arch, tuple(dataset.example_shape), dataset.num_classes, dict(request.arch_args))

        try:  # fail fast on an architecture that cannot take these inputs, off the event loop
            await asyncio.to_thread(fail_fast)  # (the first resnet also imports torchvision: ~1 s)
        except ValueError as exc:
            raise invalid("architecture", str(exc)) from exc
        except RuntimeError as exc:  # torch refusing the sizes (e.g. memory for these inputs)
            raise invalid("arch_args", f"{arch} cannot be built for inputs {list(dataset.example_shape)} "
                                       f"and {dataset.num_classes} classes: {str(exc).splitlines()[0][:200]}") from exc

        def work(ctx: OpContext):
            t0 = time.perf_counter()
            data = self.registry.load_dataset(dataset.id, split).subset(int(request.limit))
            torch.manual_seed(tc.seed)
            net = zoo.build(arch, tuple(dataset.example_shape), dataset.num_classes, dict(request.arch_args))
            wrapper = ModelWrapper(net, ModelInfo(arch, tuple(dataset.example_shape), dataset.num_classes,
                                                  tuple(request.mean), tuple(request.std), dict(request.arch_args)))
            per_epoch = math.ceil(len(data) / tc.batch_size)

            def on_batch(done: int, total: int) -> None:
                ctx.progress(done, total, "batches", f"epoch {min((done - 1) // per_epoch + 1, tc.epochs)}/{tc.epochs}")

            checkpoint = ctx.job_dir / "train.safetensors"
            resume = None
            if checkpoint.exists():
                try:
                    resume = load_state(checkpoint)
                    log.info("operation %s: resuming training at epoch %d, example %d of it", ctx.operation_id,
                             resume.epoch + 1, resume.position)
                    ctx.resumed_from(resume.batches)
                except ValueError:
                    log.warning("operation %s: unusable checkpoint, training from the start", ctx.operation_id)

            def on_interrupt(state: TrainState) -> None:
                if ctx.suspending:  # a shutdown, not a cancellation: keep what this epoch did
                    save_state(state, checkpoint)

            history = train(wrapper, data, tc, self.device, on_batch=on_batch, resume=resume,
                            on_checkpoint=lambda state: save_state(state, checkpoint), on_interrupt=on_interrupt,
                            precision=self.cfg.precision)
            self.metrics.images.labels("train").inc(len(data) * tc.epochs)
            lineage = {"dataset_id": dataset.id, "split": split, "limit": int(request.limit),
                       "train_config": _jsonable(tc.to_dict()), "operation_id": ctx.operation_id}
            record = self.registry.save_trained(wrapper.net, spec, f"train:{ctx.operation_id}", lineage,
                                                model_id=derived_id("m", ctx.operation_id))
            result = results.TrainResult(model_id=record.id, model_sha256=record.sha256,
                                         wall_seconds=time.perf_counter() - t0, device=str(self.device))
            for h in history:
                result.history.add(epoch=h.epoch, train_loss=h.train_loss, train_accuracy=h.train_accuracy,
                                   train_robust_accuracy=h.train_robust_accuracy, lr=h.lr, wall_seconds=h.wall_seconds)
            return "train", result

        return work, frozenset({("dataset", dataset.id)})

    # ------------------------------------------------------------------ the paper's datasets
    @_guard()
    async def Robustify(self, request: rpc.RobustifyRequest, context) -> op_pb.Operation:
        return self.ops.submit("robustify", request, *await self._plan_robustify(request), resumable=True)

    async def _plan_robustify(self, request: rpc.RobustifyRequest) -> tuple[Work, frozenset]:
        model, dataset, split = self._build_inputs(request)
        if not model.has_features:
            raise precondition(f"model {model.id!r} exposes no penultimate layer (features), which "
                               "representation inversion needs")
        inversion = convert.inversion_config(request.inversion, "inversion", self.cfg, dataset.domain == res.IMAGE)
        batch, shard = convert.build_sizes(request.batch_size, request.shard_size)
        cfg = BuildConfig("d_r", inversion=inversion, seed=int(request.seed), batch_size=batch, shard_size=shard)
        convert.check_cost(self.cfg, "max_operation_cost", convert.examples_in(dataset, split, request.limit), [cfg])
        return self._build_work("robustify", request, cfg, model, dataset, split)

    @_guard()
    async def BuildNonRobustDataset(self, request: rpc.BuildNonRobustDatasetRequest, context) -> op_pb.Operation:
        return self.ops.submit("build_nonrobust", request, *await self._plan_build_nonrobust(request), resumable=True)

    async def _plan_build_nonrobust(self, request: rpc.BuildNonRobustDatasetRequest) -> tuple[Work, frozenset]:
        modes = {rpc.BuildNonRobustDatasetRequest.D_NR: "d_nr", rpc.BuildNonRobustDatasetRequest.D_RAND: "d_rand",
                 rpc.BuildNonRobustDatasetRequest.D_DET: "d_det"}
        if request.mode not in modes:
            raise invalid("mode", "required: D_NR, D_RAND or D_DET")
        mode = modes[request.mode]
        model, dataset, split = self._build_inputs(request)
        boxed = dataset.domain == res.IMAGE
        batch, shard = convert.build_sizes(request.batch_size, request.shard_size)
        if mode == "d_nr":
            if not model.has_features:
                raise precondition(f"model {model.id!r} exposes no penultimate layer (features), which D_NR needs")
            cfg = BuildConfig(mode, inversion=convert.inversion_config(request.inversion, "inversion", self.cfg, boxed),
                              seed=int(request.seed), batch_size=batch, shard_size=shard)
        else:
            attack_cfg = convert.relabel_attack(request.attack, "attack", self.cfg,
                                                int(np.prod(dataset.example_shape)), boxed)
            cfg = BuildConfig(mode, attack=attack_cfg, seed=int(request.seed), batch_size=batch, shard_size=shard)
        convert.check_cost(self.cfg, "max_operation_cost", convert.examples_in(dataset, split, request.limit), [cfg])
        return self._build_work("build_nonrobust", request, cfg, model, dataset, split)

    def _model_and_dataset(self, request, default_split: str) -> tuple[res.Model, res.Dataset, str]:
        """request.model_id / dataset_id / split / limit, resolved and checked against each other."""
        model = self.registry.get_model(request.model_id)
        dataset = self.registry.get_dataset(request.dataset_id)
        split = self.registry.resolve_split(dataset, request.split, default_split)
        convert.shapes_match(model, dataset)
        if request.limit < 0:
            raise invalid("limit", f"must be >= 0 (0 = all), got {request.limit}")
        return model, dataset, split

    def _build_inputs(self, request) -> tuple[res.Model, res.Dataset, str]:
        check_text(request.name, "name")
        model, dataset, split = self._model_and_dataset(request, "train")
        _require_gradients(model, "pgd", "model_id")
        n = min(request.limit or dataset.splits[split], dataset.splits[split])
        if n < 2:
            raise invalid("limit", "a dataset build needs at least 2 examples")
        return model, dataset, split

    def _build_work(self, kind: str, request, cfg: BuildConfig, model: res.Model, dataset: res.Dataset,
                    split: str) -> tuple[Work, frozenset]:
        """Build batch by batch into the operation's job folder, checkpointing every shard (and
        at shutdown), then record the new generated dataset. Run again under the same operation
        id (a restart), it goes on from its last checkpoint and makes the same file, bit for bit;
        on failure or cancellation nothing is left."""
        stage = {"d_r": "D_R", "d_nr": "D_NR", "d_rand": "D_rand", "d_det": "D_det"}[cfg.mode]

        def work(ctx: OpContext):
            t0 = time.perf_counter()
            data = self.registry.load_dataset(dataset.id, split).subset(int(request.limit))
            dataset_id = derived_id("ds", ctx.operation_id)
            job = ctx.job_dir
            packed = job / "data.npz"
            checkpoint = BuildCheckpoint(job)
            done, saved = checkpoint.load(len(data))
            stats = {k: [torch.from_numpy(v)] for k, v in saved.items()}
            record = self.registry.recorded_dataset(dataset_id)  # the previous run got that far
            if record is None:
                dest = self.registry.datasets_dir / dataset_id / "data.npz"
                if not dest.exists():
                    if not packed.exists():
                        self._build_into(ctx, wrapper_of=model.id, data=data, cfg=cfg, stage=stage, done=done,
                                         stats=stats, checkpoint=checkpoint, packed=packed)
                    self.registry.new_dataset_folder(dataset_id)
                    os.replace(packed, dest)
                lineage = {"source_dataset_id": dataset.id, "split": split, "limit": int(request.limit),
                           "model_id": model.id, "model_sha256": model.sha256, "mode": cfg.mode,
                           "params": _jsonable(cfg.to_dict()), "seed": cfg.seed, "operation_id": ctx.operation_id}
                name = request.name or f"{stage} of {dataset.id} via {model.id}"
                record = res.Dataset(id=dataset_id, name=name, kind="generated", splits={split: len(data)},
                                     example_shape=list(dataset.example_shape), num_classes=dataset.num_classes,
                                     domain=dataset.domain, dtype="float32", sha256=file_sha256(dest),
                                     size_bytes=dest.stat().st_size, class_names=list(dataset.class_names),
                                     lineage_json=json.dumps(lineage, sort_keys=True))
                self.registry.record_dataset(record, dest)
            diag = summarize(cfg.mode, {k: torch.cat(v) for k, v in stats.items()})
            self.metrics.images.labels(kind).inc(len(data))
            result = results.DatasetBuildResult(dataset_id=dataset_id, mode=stage, num_examples=len(data),
                                                wall_seconds=time.perf_counter() - t0, device=str(self.device),
                                                **diag)
            return "dataset_build", result

        return work, frozenset({("model", model.id), ("dataset", dataset.id)})

    def _build_into(self, ctx: OpContext, *, wrapper_of: str, data, cfg: BuildConfig, stage: str, done: int,
                    stats: dict[str, list], checkpoint: BuildCheckpoint, packed: Path) -> None:
        """Examples done..n of a build into memory-mapped files in the job folder, a checkpoint
        every shard_size examples (and when a shutdown stops it), then packed into `packed`."""
        _, wrapper = self.registry.load_model(wrapper_of)
        writer = NpzShardWriter(ctx.job_dir / "building", len(data), data.example_shape, resume=done > 0)
        saved = done
        if done:
            log.info("operation %s: resuming the %s build at example %d of %d", ctx.operation_id, stage, done, len(data))
            ctx.resumed_from(done)

        def save(upto: int) -> None:
            writer.flush()
            checkpoint.save(upto, {k: torch.cat(v).numpy() for k, v in stats.items()})

        try:
            for piece in build(wrapper, data, cfg, self.device, start=done,
                               on_batch=lambda d, total: ctx.progress(d, total, "images", stage),
                               on_step=lambda step, steps: ctx.check_cancelled()):
                writer.write(piece.start, piece.x.numpy(), piece.y.numpy())
                for k, v in piece.stats.items():
                    stats.setdefault(k, []).append(v)
                done = piece.start + len(piece.x)
                if done - saved >= cfg.shard_examples:
                    save(done)
                    saved = done
        except Cancelled:
            if ctx.suspending and done > saved:
                save(done)
            raise
        save(done)  # the stats of every example, for the result should the packing be interrupted
        writer.finish(packed)

    # ------------------------------------------------------------------ TransferRate
    @_guard()
    async def TransferRate(self, request: rpc.TransferRateRequest, context) -> op_pb.Operation:
        if not request.source_model_ids:
            raise invalid("source_model_ids", "at least one source model is required")
        for field in ("source_model_ids", "target_model_ids"):
            if len(getattr(request, field)) > MAX_TRANSFER_MODELS:
                raise invalid(field, f"at most {MAX_TRANSFER_MODELS} models, got {len(getattr(request, field))}")
        if not request.target_model_ids:
            raise invalid("target_model_ids", "at least one target model is required")
        dataset = self.registry.get_dataset(request.dataset_id)
        split = self.registry.resolve_split(dataset, request.split, "test")
        models: dict[str, res.Model] = {}
        for field in ("source_model_ids", "target_model_ids"):
            for k, model_id in enumerate(getattr(request, field)):
                model = self.registry.get_model(model_id, f"{field}[{k}]")
                if list(model.spec.input_shape) != list(dataset.example_shape):
                    raise invalid(f"{field}[{k}]", f"model {model.id!r} takes inputs of shape "
                                  f"{list(model.spec.input_shape)}, dataset {dataset.id!r} has "
                                  f"{list(dataset.example_shape)}")
                if model.spec.num_classes < dataset.num_classes:
                    raise invalid(f"{field}[{k}]", f"model {model.id!r} has {model.spec.num_classes} classes, "
                                  f"dataset {dataset.id!r} {dataset.num_classes}")
                models[model.id] = model
        if request.limit < 0:
            raise invalid("limit", f"must be >= 0 (0 = all), got {request.limit}")
        if not 0 <= request.batch_size <= 4096:
            raise invalid("batch_size", "must be in [0, 4096] (0 = 256 on the CPU, the largest that fits on a GPU), "
                                        f"got {request.batch_size}")
        cfg = convert.attack_config(request.attack, "attack", self.cfg, int(np.prod(dataset.example_shape)),
                                    dataset.domain == res.IMAGE)
        for k, model_id in enumerate(request.source_model_ids):
            _require_gradients(models[model_id], cfg.method, f"source_model_ids[{k}]")
        sources, targets = list(request.source_model_ids), list(request.target_model_ids)
        convert.check_cost(self.cfg, "max_operation_cost", convert.examples_in(dataset, split, request.limit), [cfg],
                           sources=len(sources))

        def work(ctx: OpContext):
            t0 = time.perf_counter()
            wrappers = {model_id: self.registry.load_model(model_id)[1] for model_id in models}
            data = self.registry.load_dataset(dataset.id, split).subset(int(request.limit))
            batch_size = request.batch_size or min(attack_batch(wrappers[m], tuple(data.example_shape), self.device, 256)
                                                   for m in sources)
            counts = transfer_rates([wrappers[m] for m in sources], [wrappers[m] for m in targets], data, cfg,
                                    batch_size=batch_size, device=self.device,
                                    on_progress=lambda d, t, stage: ctx.progress(d, t, "images", stage))
            self.metrics.images.labels("transfer").inc(len(data) * len(sources))
            out = results.TransferRateResult(definition=TRANSFER_DEFINITION, attack=convert.attack_spec(cfg.resolved()),
                                             dataset_id=dataset.id, split=split, device=str(self.device))
            for i, source_id in enumerate(sources):
                for j, target_id in enumerate(targets):
                    c = counts[i][j]
                    pair = out.pairs.add(
                        source_model_id=source_id, target_model_id=target_id, examples=c.examples,
                        correct_on_source=c.correct_on_source, correct_on_target=c.correct_on_target,
                        successful_on_source=c.successful_on_source, transferred=c.transferred,
                        fooled_target=c.fooled_target, white_box_success_rate=c.white_box_success_rate,
                        transfer_rate=c.transfer_rate, unconditional_rate=c.unconditional_rate,
                        successful_target_correct=c.successful_target_correct,
                        transferred_target_correct=c.transferred_target_correct,
                        conditional_transfer_rate=c.conditional_transfer_rate)
                    for name, (k, n) in c.fractions().items():
                        convert.interval(getattr(pair, name + "_ci"), k, n)
            for model_id in models:
                usage = endpoints.usage_of(wrappers[model_id])
                if usage is not None:
                    out.endpoint_usage.append(usage)
            out.wall_seconds = time.perf_counter() - t0
            return "transfer", out

        resources = frozenset({("dataset", dataset.id)} | {("model", m) for m in models})
        return self.ops.submit("transfer", request, work, resources)

    # ------------------------------------------------------------------ operations
    @_guard()
    async def GetOperation(self, request, context):
        return self.ops.get(request.operation_id)

    @_guard()
    async def ListOperations(self, request, context):
        from advex.service import paging

        ops, token = self.ops.list(request.kind, paging.page_size(request.page_size), request.page_token)
        return op_pb.ListOperationsResponse(operations=ops, next_page_token=token)

    @_guard()
    async def CancelOperation(self, request, context):
        return self.ops.cancel(request.operation_id)

    @_guard()
    async def WaitOperation(self, request, context):
        if not (math.isfinite(request.timeout_seconds) and request.timeout_seconds >= 0):
            raise invalid("timeout_seconds", "must be finite and >= 0")
        # a long poll holds one of max_concurrent_rpcs: at most MAX_WAIT_S, then the current state
        return await self.ops.wait(request.operation_id, min(request.timeout_seconds, MAX_WAIT_S))

    @_guard(streaming=True)
    async def WatchOperation(self, request, context) -> AsyncIterator[op_pb.Operation]:
        limit = self.cfg.max_watch_streams
        if self._watches >= limit:
            raise exhausted(f"{self._watches} WatchOperation streams are open, the limit (max_watch_streams) is "
                            f"{limit}; retry later, or poll with WaitOperation")
        self._watches += 1
        try:
            async for op in self.ops.watch(request.operation_id):
                yield op
        finally:  # also when the client goes away (the stream is cancelled)
            self._watches -= 1

    # ------------------------------------------------------------------ models
    async def _receive_upload(self, request_iterator, head_field: str, register):
        """Client-streaming upload: the first message carries `head_field` (spec / header), the
        rest are chunks into a temporary file; `register(head, path, sha256, size)` validates and
        stores it in the interactive pool. The temporary file is gone afterwards, whatever happens.
        At most max_concurrent_uploads at once; one that sends nothing for upload_idle_timeout_s ends."""
        limit, idle = self.cfg.max_concurrent_uploads, self.cfg.upload_idle_timeout_s
        if self._uploads >= limit:
            raise exhausted(f"{self._uploads} uploads are in progress, the limit (max_concurrent_uploads) is "
                            f"{limit}; retry later")
        self._uploads += 1
        head, sink = None, None
        try:
            sink = UploadSink(self.registry.tmp_dir, self.cfg.max_upload_mb << 20)
            parts = request_iterator.__aiter__()
            while True:
                try:
                    part = await asyncio.wait_for(parts.__anext__(), idle)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"upload_idle_timeout_s: no message for {idle:g} s, so the upload was ended "
                                       "and nothing of it kept; send the chunks without pausing") from None
                if part.HasField(head_field):
                    if head is not None:
                        raise invalid(head_field, "sent twice; send it once, first")
                    head = getattr(part, head_field)
                elif head is None:
                    raise invalid(head_field, f"the first message must carry the {head_field}")
                else:
                    sink.write(part.chunk)
            if head is None:
                raise invalid(head_field, "required in the first message")
            sha = sink.finish()
            return await self.ops.run_interactive(lambda: register(head, sink.path, sha, sink.size))
        finally:
            if sink is not None:
                sink.discard()
            self._uploads -= 1

    @_guard()
    async def UploadModel(self, request_iterator, context) -> res.Model:
        model = await self._receive_upload(
            request_iterator, "spec",
            lambda spec, path, sha, size: self.registry.register_model(spec, path, sha, size, source="upload"))
        if model.execution_provider:
            self.metrics.record_provider(model.id, model.execution_provider)
        return model

    @_guard()
    async def ExportModel(self, request: res.ExportModelRequest, context) -> op_pb.Operation:
        check_text(request.name, "name")
        model, dataset, split = self._model_and_dataset(request, "test")
        if not model.has_gradients:
            raise precondition(f"model {model.id!r} is {_black_box(model)} already: there is no torch model to export")

        def work(ctx: OpContext):
            t0 = time.perf_counter()
            _, wrapper = self.registry.load_model(model.id)
            ctx.progress(0, 2, "steps", "export to ONNX")
            graph = export_onnx(wrapper, tuple(model.spec.input_shape))  # it exports a CPU copy
            spec = res.ModelSpec(name=request.name or f"{model.spec.name} (ONNX)", format=res.ONNX,
                                 architecture=model.spec.architecture, num_classes=model.spec.num_classes,
                                 input_shape=model.spec.input_shape, labels=model.spec.labels)
            exported = self.registry.register_bytes(spec, graph, source=f"export:{ctx.operation_id}",
                                                    lineage={"source_model_id": model.id,
                                                             "source_model_sha256": model.sha256})
            ctx.progress(1, 2, "steps", "agreement")
            _, onnx_wrapper = self.registry.load_model(exported.id)
            data = self.registry.load_dataset(dataset.id, split).subset(int(request.limit))
            same, worst = 0, 0.0
            with torch.no_grad():
                for x, _ in data.batches(256, self.device):
                    a, b = wrapper.logits(x), onnx_wrapper.logits(x)
                    same += int((a.argmax(1) == b.argmax(1)).sum())
                    worst = max(worst, float((a - b).abs().max()))
            ctx.progress(2, 2, "steps", "agreement")
            self.metrics.record_provider(exported.id, exported.execution_provider)
            return "export", results.ExportResult(
                model_id=exported.id, source_model_id=model.id, model_sha256=exported.sha256, examples=len(data),
                agreement_rate=same / len(data) if len(data) else 0.0, disagreements=len(data) - same,
                max_abs_logit_difference=worst, execution_provider=exported.execution_provider,
                wall_seconds=time.perf_counter() - t0)

        return self.ops.submit("export", request, work, frozenset({("model", model.id), ("dataset", dataset.id)}))

    @_guard()
    async def GetModel(self, request, context):
        return self.registry.get_model(request.model_id)

    @_guard()
    async def ListModels(self, request, context):
        from advex.service import paging

        models, token = self.registry.list_models(paging.page_size(request.page_size), request.page_token)
        return res.ListModelsResponse(models=models, next_page_token=token)

    @_guard()
    async def DeleteModel(self, request, context):
        self.registry.get_model(request.model_id)
        self.ops.ensure_unused(("model", request.model_id))
        self.registry.delete_model(request.model_id)
        self.registry.store.forget_model(request.model_id)
        self.metrics.forget_model(request.model_id)
        return res.DeleteModelResponse()

    @_guard()
    async def RegisterEndpoint(self, request: res.RegisterEndpointRequest, context) -> res.Model:
        # the endpoint is queried (metadata and one inference): off the event loop, in the small pool
        def register() -> res.Model:  # an update changes the settings: not while an operation uses the model
            return self.registry.register_endpoint(request.spec,
                                                   before_update=lambda m: self.ops.ensure_unused(("model", m)))

        return await self.ops.run_interactive(register)

    # ------------------------------------------------------------------ audits
    @_guard()
    async def Audit(self, request: rpc.AuditRequest, context) -> op_pb.Operation:
        audits.check_request(request)
        plans = []
        for k, t in enumerate(request.targets):
            plans.append(self._plan_evaluate(rpc.EvaluateRequest(
                model_id=t.model_id, dataset_id=request.dataset_id, split=request.split, limit=request.limit,
                attacks=request.attacks, batch_size=request.batch_size, suite=request.suite), f"targets[{k}].model_id"))
        for k, plan in enumerate(plans):
            audits.check_thresholds(request, plan, f"targets[{k}]")
        first = plans[0]  # one dataset for all: the budget covers every target's attacks together
        convert.check_cost(self.cfg, "max_operation_cost",
                           convert.examples_in(first.dataset, first.split, request.limit),
                           [c for plan in plans for sw in plan.runnable for c in sw.configs()])
        resources = frozenset().union(*(p.resources for p in plans))

        def work(ctx: OpContext):
            out = results.AuditResult(audit_name=request.name, passed=True)
            for k, (target, plan) in enumerate(zip(request.targets, plans)):
                step = audits.TargetProgress(ctx, k, len(plans), target.name or target.model_id)
                model = plan.model
                identity = (endpoints.current_identity(model, self.cfg) if model.spec.format == res.ENDPOINT
                            else ("", model.sha256))
                evaluation = plan.run(step)
                record = audits.judge(request, target, model, evaluation, ctx.operation_id,
                                      audits.baseline(self.registry.store, model.id, request), identity)
                self.registry.store.put_audit(record.id, record.create_time.ToMicroseconds() / 1e6, record.model_id,
                                              record.target_name, record.audit_name, record.passed,
                                              record.SerializeToString())
                self._audit_gauges(record)
                out.records.append(record)
                out.passed = out.passed and record.passed
            return "audit", out

        return self.ops.submit("audit", request, work, resources)

    @_guard()
    async def ListAudits(self, request: rpc.ListAuditsRequest, context) -> rpc.ListAuditsResponse:
        from advex.service import paging

        check_text(request.target, "target")
        check_text(request.audit_name, "audit_name")
        records, token = paging.list_page(
            self.registry.store, "audits", results.AuditRecord, paging.page_size(request.page_size), request.page_token,
            scope=f"{request.target}\0{request.audit_name}", newest_first=True,
            match={"target": request.target, "audit_name": request.audit_name})
        return rpc.ListAuditsResponse(records=records, next_page_token=token)

    # ------------------------------------------------------------------ datasets
    @_guard()
    async def UploadDataset(self, request_iterator, context) -> res.Dataset:
        return await self._receive_upload(request_iterator, "header", self.registry.register_dataset)

    @_guard()
    async def GetDataset(self, request, context):
        return self.registry.get_dataset(request.dataset_id)

    @_guard()
    async def ListDatasets(self, request, context):
        from advex.service import paging

        datasets, token = self.registry.list_datasets(paging.page_size(request.page_size), request.page_token)
        return res.ListDatasetsResponse(datasets=datasets, next_page_token=token)

    @_guard(streaming=True)
    async def DownloadDataset(self, request, context) -> AsyncIterator[rpc.DownloadDatasetResponse]:
        record = self.registry.get_dataset(request.dataset_id)
        split = self.registry.resolve_split(record, request.split, "train")
        if request.limit < 0:
            raise invalid("limit", f"must be >= 0 (0 = all), got {request.limit}")
        n = min(request.limit or record.splits[split], record.splits[split])
        whole_stored = record.kind != "builtin" and not request.lossy_uint8 and n == record.splits[split]
        if whole_stored:  # the stored file itself
            path = self.registry.dataset_file(record.id, split)
            size, sha, dtype, payload = path.stat().st_size, record.sha256, record.dtype, None
        else:
            def make() -> bytes:
                data = self.registry.load_dataset(record.id, split).subset(n)
                return npz_bytes(data.x.numpy(), data.y.numpy(), request.lossy_uint8)

            payload = await self.ops.run_interactive(make)
            size, sha = len(payload), hashlib.sha256(payload).hexdigest()
            dtype = "uint8" if request.lossy_uint8 or record.dtype == "uint8" else record.dtype
        yield rpc.DownloadDatasetResponse(info=rpc.DownloadDatasetResponse.Info(
            dataset_id=record.id, split=split, size_bytes=size, sha256=sha, dtype=dtype, num_examples=n))
        if payload is not None:
            for i in range(0, len(payload), CHUNK):
                yield rpc.DownloadDatasetResponse(chunk=payload[i:i + CHUNK])
            return
        with path.open("rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                yield rpc.DownloadDatasetResponse(chunk=block)

    @_guard()
    async def DeleteDataset(self, request, context):
        self.registry.get_dataset(request.dataset_id)
        self.ops.ensure_unused(("dataset", request.dataset_id))
        self.registry.delete_dataset(request.dataset_id)
        return res.DeleteDatasetResponse()


def _black_box(model: res.Model) -> str:
    return "an inference endpoint" if model.spec.format == res.ENDPOINT else "an ONNX graph"


def _require_gradients(model: res.Model, method: str, field: str) -> None:
    if not model.has_gradients and method not in GRADIENT_FREE:
        raise precondition(f"{field}: model {model.id!r} is {_black_box(model)} without gradients; the {method!r} "
                           "attack needs them: use method 'square' (black box)")


@dataclass(frozen=True)
class _EvaluationPlan:
    """A checked evaluation (see RobustnessServicer._plan_evaluate): run(ctx) does it."""
    model: res.Model
    dataset: res.Dataset
    split: str
    requested: list  # every requested sweep (AttackSweep), skipped ones included
    runnable: list   # those that run on this model
    run: Callable[[OpContext], results.EvaluateResult]
    resources: frozenset


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o)))
