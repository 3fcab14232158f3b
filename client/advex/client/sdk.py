"""The Python SDK: one method per RPC, numpy arrays in and out, long work as Operation
handles with ``result(timeout=None, progress=None)``. Client blocks; AsyncClient (grpc.aio) has
the same methods as coroutines. Results show themselves in a notebook (advex.client.results)."""
from __future__ import annotations

import asyncio
import hashlib
import io
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator, Mapping, Optional, Sequence, Union

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from advex.v1 import operation_pb2 as op_pb
from advex.v1 import resources_pb2 as res
from advex.v1 import results_pb2 as results
from advex.v1 import robustness_pb2 as rpc
from advex.v1 import robustness_pb2_grpc as rpc_grpc
from advex.v1.wire import from_tensor, to_tensor
from advex.client.results import AttackResult, AuditHistory, operation_html, wrap

CHUNK = 1 << 20
NORMS = {"l2": results.L2, "linf": results.LINF}
FORMATS = {"safetensors": res.SAFETENSORS, "torchscript": res.TORCHSCRIPT, "torch_export": res.TORCH_EXPORT,
           "pt2": res.TORCH_EXPORT, "onnx": res.ONNX}
MAX_MESSAGE = 64 << 20


class OperationError(RuntimeError):
    """A long operation ended FAILED or CANCELLED. .code is the gRPC status name."""

    def __init__(self, op: op_pb.Operation) -> None:
        self.operation = op
        self.code = grpc.StatusCode.UNKNOWN.name
        for status in grpc.StatusCode:
            if status.value[0] == op.error.code:
                self.code = status.name
        super().__init__(f"operation {op.id} ({op.kind}) {op_pb.Operation.State.Name(op.state)}: "
                         f"{self.code}: {op.error.message}")


def attack_spec(norm: str = "Linf", eps: float = 0.0, method: str = "pgd", steps: int = 0, step_size: float = 0.0,
                random_start: Optional[bool] = None, restarts: int = 0, targeted: bool = False,
                seed: int = 0, eot: int = 0) -> results.AttackSpec:
    """An AttackSpec message from plain values. norm: "L2" or "Linf". eot: passes averaged per
    step (APGD methods, randomized models; 0 = 1)."""
    try:
        norm_enum = NORMS[norm.lower()]
    except KeyError:
        raise ValueError(f"norm must be 'L2' or 'Linf', got {norm!r}") from None
    spec = results.AttackSpec(method=method, norm=norm_enum, eps=eps, steps=steps, step_size=step_size,
                              restarts=restarts, targeted=targeted, seed=seed, eot=eot)
    if random_start is not None:
        spec.random_start = random_start
    return spec


class _OperationBase:
    """What both handles share: the operation message, its state, and how it ends."""

    def __init__(self, client, proto: op_pb.Operation) -> None:
        self._client = client
        self.proto = proto

    @property
    def id(self) -> str:
        return self.proto.id

    @property
    def state(self) -> str:
        return op_pb.Operation.State.Name(self.proto.state)

    @property
    def done(self) -> bool:
        return self.proto.done

    def _outcome(self):
        if self.proto.state != op_pb.Operation.SUCCEEDED:
            raise OperationError(self.proto)
        return wrap(getattr(self.proto, self.proto.WhichOneof("outcome")), self._client, self.id)

    def _wait_request(self, left: Optional[float]) -> op_pb.WaitOperationRequest:
        """A long poll of at most 30 s (or what is left of the caller's timeout)."""
        return op_pb.WaitOperationRequest(operation_id=self.id, timeout_seconds=30.0 if left is None
                                          else min(left, 30.0))

    def __repr__(self) -> str:
        p = self.proto.progress
        return f"<{type(self).__name__} {self.id} {self.proto.kind} {self.state} {p.done}/{p.total} {p.unit}>"

    def _repr_html_(self) -> str:
        return operation_html(self.proto)


class Operation(_OperationBase):
    """A handle on a long-running server operation."""

    def refresh(self) -> "Operation":
        self.proto = self._client.stub.GetOperation(op_pb.GetOperationRequest(operation_id=self.id),
                                                    metadata=self._client.metadata)
        return self

    def cancel(self) -> "Operation":
        self.proto = self._client.stub.CancelOperation(op_pb.CancelOperationRequest(operation_id=self.id),
                                                       metadata=self._client.metadata)
        return self

    def watch(self) -> Iterator[op_pb.Operation]:
        """Every progress or state change until the operation is done."""
        for op in self._client.stub.WatchOperation(op_pb.WatchOperationRequest(operation_id=self.id),
                                                   metadata=self._client.metadata):
            self.proto = op
            yield op

    def result(self, timeout: Optional[float] = None, progress: Optional[bool] = None):
        """Block until done; return the result (Evaluation, Training, ...: the result message with
        tables, `to_pandas()` and `.plot()`; `.proto` is the message itself). Raises
        OperationError if it failed or was cancelled, TimeoutError after `timeout` s.
        progress: None shows a bar in a terminal or a notebook (tqdm.auto) and nothing elsewhere;
        True always; False never."""
        deadline = _Deadline(self, timeout)
        bar = _progress_bar(self) if wants_progress(progress) and not self.done else None
        try:
            while not self.done:
                left = deadline.left()
                if bar is not None:
                    self._watch_with_bar(bar, left)
                else:
                    self.proto = self._client.stub.WaitOperation(self._wait_request(left),
                                                                 metadata=self._client.metadata)
        finally:
            if bar is not None:
                bar.close()
        return self._outcome()

    def _watch_with_bar(self, bar, timeout: Optional[float]) -> None:
        stream = self._client.stub.WatchOperation(op_pb.WatchOperationRequest(operation_id=self.id),
                                                  metadata=self._client.metadata, timeout=timeout)
        try:
            for op in stream:
                self.proto = op
                _show(bar, op)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            self.refresh()


class AsyncOperation(_OperationBase):
    """A handle on a long-running server operation, for asyncio (AsyncClient): the methods of
    Operation as coroutines (`watch` an async iterator)."""

    async def refresh(self) -> "AsyncOperation":
        self.proto = await self._client.stub.GetOperation(op_pb.GetOperationRequest(operation_id=self.id),
                                                          metadata=self._client.metadata)
        return self

    async def cancel(self) -> "AsyncOperation":
        self.proto = await self._client.stub.CancelOperation(op_pb.CancelOperationRequest(operation_id=self.id),
                                                             metadata=self._client.metadata)
        return self

    async def watch(self) -> AsyncIterator[op_pb.Operation]:
        """Every progress or state change until the operation is done."""
        async for op in self._client.stub.WatchOperation(op_pb.WatchOperationRequest(operation_id=self.id),
                                                         metadata=self._client.metadata):
            self.proto = op
            yield op

    async def result(self, timeout: Optional[float] = None, progress: Optional[bool] = None):
        """Wait until done without blocking the event loop; as Operation.result."""
        deadline = _Deadline(self, timeout)
        bar = _progress_bar(self) if wants_progress(progress) and not self.done else None
        try:
            while not self.done:
                left = deadline.left()
                if bar is not None:
                    await self._watch_with_bar(bar, left)
                else:
                    self.proto = await self._client.stub.WaitOperation(self._wait_request(left),
                                                                       metadata=self._client.metadata)
        finally:
            if bar is not None:
                bar.close()
        return self._outcome()

    async def _watch_with_bar(self, bar, timeout: Optional[float]) -> None:
        try:
            async for op in self._client.stub.WatchOperation(op_pb.WatchOperationRequest(operation_id=self.id),
                                                             metadata=self._client.metadata, timeout=timeout):
                self.proto = op
                _show(bar, op)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            await self.refresh()


class _Deadline:
    """What is left of a result() call's timeout; TimeoutError once it has passed."""

    def __init__(self, op: _OperationBase, timeout: Optional[float]) -> None:
        self.op, self.timeout = op, timeout
        self.at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> Optional[float]:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"operation {self.op.id} not done after {self.timeout} s (state {self.op.state})")
        return left


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython is asked only when something already imported it)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def wants_progress(progress: Optional[bool]) -> bool:
    """progress=None: a bar in a notebook or when stderr is a terminal, nothing elsewhere (logs,
    pipes, CI); True or False decide."""
    if progress is not None:
        return bool(progress)
    if in_notebook():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_bar(op: _OperationBase):
    from tqdm.auto import tqdm

    return tqdm(total=op.proto.progress.total or None, desc=op.proto.kind, leave=True, dynamic_ncols=True)


def _show(bar, op: op_pb.Operation) -> None:
    p = op.progress
    if p.total:
        bar.total = p.total
        bar.unit = " " + (p.unit or "it")
    bar.n = p.done
    bar.set_description_str(f"{op.kind} {p.stage}".strip(), refresh=False)
    bar.refresh()


PEM = Union[bytes, str, Path]  # PEM bytes, or the path of a PEM file


def _pem(value: PEM, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(value)!r}: {exc.strerror or exc}") from None


def _channel_settings(tls: Union[bool, PEM], client_cert: Optional[PEM], client_key: Optional[PEM]):
    """(channel credentials or None for plaintext, channel options) for both clients."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together (give both or neither)")
    if tls is False and client_cert is None:
        return None, options
    roots = None if tls is True or tls is False or tls is None else _pem(tls, "TLS root certificates")
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=None if client_key is None else _pem(client_key, "TLS client key"),
        certificate_chain=None if client_cert is None else _pem(client_cert, "TLS client certificate"))
    return creds, options


class _Api:
    """Every RPC as a method: the request is built here, once, for both clients. How a call is made
    (blocking, or a coroutine) is the subclass's: _unary, _upload, _download, _pages and _op."""

    timeout: float
    metadata: tuple

    def __init__(self, target: str, token: Optional[str], timeout: float) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.target = target

    def _call(self, method: str, request, then=None):
        return self._unary(method, request, self.timeout, then)

    def _start(self, method: str, request):
        """Start a long operation: its handle."""
        return self._unary(method, request, self.timeout, self._op)

    # ------------------------------------------------------------------ Attack
    def attack(self, model_id: str, x: np.ndarray, y: Sequence[int], *, norm: str = "Linf",
               eps: float | Sequence[float] = 8 / 255, method: str = "pgd", steps: int = 0, step_size: float = 0.0,
               random_start: Optional[bool] = None, restarts: int = 0, targeted: bool = False, seed: int = 0,
               domain: str = "image", eot: int = 0) -> AttackResult:
        """Adversarial examples for a batch. x: float32 [N,C,H,W] in [0,1] or uint8; y: labels (or targets).
        eps: one radius, or one per example (a sequence of N; step_size 0 then means each one's default).
        eot: for a randomized model, the passes an APGD method averages per step (0 = 1)."""
        per_example = np.ndim(eps) > 0
        req = rpc.AttackRequest(model_id=model_id, x=to_tensor(np.asarray(x)),
                                y=to_tensor(np.asarray(y, dtype=np.int64)),
                                attack=attack_spec(norm, 0.0 if per_example else float(eps), method, steps, step_size,
                                                   random_start, restarts, targeted, seed, eot),
                                domain=res.REAL if domain.lower() == "real" else res.IMAGE)
        if per_example:
            req.eps.CopyFrom(to_tensor(np.asarray(eps, dtype=np.float32)))
        inputs, labels = np.asarray(x), np.asarray(y)

        def result(r: rpc.AttackResponse) -> AttackResult:
            return AttackResult(from_tensor(r.x_adv, "x_adv"), from_tensor(r.clean_pred), from_tensor(r.adv_pred),
                                from_tensor(r.success), from_tensor(r.perturbation_norm), r.attack, r.model_sha256,
                                from_tensor(r.queries) if r.HasField("queries") else None, x=inputs, y=labels)

        return self._unary("Attack", req, max(self.timeout, 600.0), result)

    # ------------------------------------------------------------------ Evaluate / Train
    def evaluate(self, model_id: str, dataset_id: str, *, attacks: Iterable[Mapping] = (), split: str = "",
                 limit: int = 0, batch_size: int = 0, surrogate_model_id: str = "", suite: str = "",
                 minimal_distance: Sequence[str] = ()) -> Operation:
        """attacks: dicts like {"norm": "L2", "eps": [0.25, 0.5], "steps": 20, "method": "pgd"}.
        suite: "autoattack" (APGD-CE, APGD-T, FAB-T, Square), "autoattack-fast" (APGD-CE then
        APGD-T), "pgd" (PGD-50) or "rand" (APGD-CE, APGD-DLR with EOT over 20 passes, for
        randomized models), run as a cascade at each
        radius; attacks then give only norm, eps (and seed), e.g. {"norm": "Linf", "eps": [8/255]},
        and each result row names the suite (its robust accuracy is what is left after it).
        surrogate_model_id: for a model without gradients (ONNX), craft white-box attacks on this
        torch model and judge them on the evaluated one (transfer attacks).
        minimal_distance: norms ("Linf", "L2") at which FAB-T measures each example's smallest
        adversarial perturbation: result.distance_curves holds them and robust accuracy at every eps."""
        req = rpc.EvaluateRequest(model_id=model_id, dataset_id=dataset_id, split=split, limit=limit,
                                  batch_size=batch_size, surrogate_model_id=surrogate_model_id, suite=suite)
        for norm in minimal_distance:
            if norm.lower() not in NORMS:
                raise ValueError(f"minimal_distance: norm must be 'L2' or 'Linf', got {norm!r}")
            req.minimal_distance.append(NORMS[norm.lower()])
        for a in attacks:
            a = dict(a)
            if suite:
                a.setdefault("method", "")
            eps = a.pop("eps", [])
            eps_list = [float(e) for e in (eps if isinstance(eps, (list, tuple)) else [eps])]
            req.attacks.add(attack=attack_spec(**a), eps=eps_list)
        return self._start("Evaluate", req)

    def train(self, architecture: str, dataset_id: str, *, split: str = "", limit: int = 0, preset: str = "",
              epochs: int = 0, batch_size: int = 0, lr: Optional[float] = None, momentum: Optional[float] = None,
              weight_decay: Optional[float] = None, schedule: str = "", lr_step_epochs: int = 0,
              lr_gamma: Optional[float] = None, augment: Optional[bool] = None,
              adversarial: Optional[Mapping] = None, seed: int = 0, name: str = "",
              mean: Sequence[float] = (), std: Sequence[float] = (),
              arch_args: Optional[Mapping[str, str]] = None) -> Operation:
        """adversarial: e.g. {"norm": "L2", "eps": 0.5, "steps": 7, "step_size": 0.1} for adversarial training."""
        req = rpc.TrainRequest(architecture=architecture, dataset_id=dataset_id, split=split, limit=limit,
                               preset=preset, epochs=epochs, batch_size=batch_size, schedule=schedule,
                               lr_step_epochs=lr_step_epochs, seed=seed, name=name, mean=mean, std=std,
                               arch_args={k: str(v) for k, v in (arch_args or {}).items()})
        for field, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                             ("lr_gamma", lr_gamma), ("augment", augment)):
            if value is not None:
                setattr(req, field, value)
        if adversarial is not None:
            req.adversarial.CopyFrom(attack_spec(**adversarial))
        return self._start("Train", req)

    # ------------------------------------------------------------------ the paper's datasets
    def robustify(self, model_id: str, dataset_id: str, *, split: str = "", limit: int = 0, steps: int = 0,
                  step_size: float = 0.0, start: str = "", eps: float = 0.0, seed: int = 0, name: str = "",
                  batch_size: int = 0, shard_size: int = 0) -> Operation:
        """D_R: invert every example's representation through a robust model. Zero / empty
        settings take the paper's (1000 steps of 0.1 from another training image, no radius)."""
        req = rpc.RobustifyRequest(model_id=model_id, dataset_id=dataset_id, split=split, limit=limit, seed=seed,
                                   name=name, batch_size=batch_size, shard_size=shard_size,
                                   inversion=rpc.InversionSpec(steps=steps, step_size=step_size, start=start, eps=eps))
        return self._start("Robustify", req)

    def build_nonrobust_dataset(self, mode: str, model_id: str, dataset_id: str, *, split: str = "", limit: int = 0,
                                attack: Optional[Mapping] = None, steps: int = 0, step_size: float = 0.0,
                                start: str = "", seed: int = 0, name: str = "", batch_size: int = 0,
                                shard_size: int = 0) -> Operation:
        """mode: "d_nr" (inversion through a standard model; steps/step_size/start as in robustify),
        "d_rand" or "d_det" (targeted PGD; attack overrides the paper's L2 eps 0.5, 100 steps of 0.1)."""
        modes = {"d_nr": rpc.BuildNonRobustDatasetRequest.D_NR, "d_rand": rpc.BuildNonRobustDatasetRequest.D_RAND,
                 "d_det": rpc.BuildNonRobustDatasetRequest.D_DET}
        if mode.lower() not in modes:
            raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
        req = rpc.BuildNonRobustDatasetRequest(
            mode=modes[mode.lower()], model_id=model_id, dataset_id=dataset_id, split=split, limit=limit, seed=seed,
            name=name, batch_size=batch_size, shard_size=shard_size,
            inversion=rpc.InversionSpec(steps=steps, step_size=step_size, start=start))
        if attack:
            a = {"norm": "L2", **attack}
            req.attack.CopyFrom(attack_spec(**a))
        return self._start("BuildNonRobustDataset", req)

    def download_dataset(self, dataset_id: str, split: str = "", *, limit: int = 0,
                         path: Union[str, Path, None] = None,
                         lossy_uint8: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A dataset split as numpy arrays (x, y), optionally its first `limit` examples only; the
        .npz is also written to `path` if given (for a whole stored dataset: its stored bytes).
        The sha256 the server announces is checked."""
        request = rpc.DownloadDatasetRequest(dataset_id=dataset_id, split=split, lossy_uint8=lossy_uint8, limit=limit)

        def arrays(stream: list) -> tuple[np.ndarray, np.ndarray]:
            info, parts = None, []
            for msg in stream:
                if msg.HasField("info"):
                    info = msg.info
                else:
                    parts.append(msg.chunk)
            data = b"".join(parts)
            if info is None or len(data) != info.size_bytes or hashlib.sha256(data).hexdigest() != info.sha256:
                raise IOError(f"download of {dataset_id!r} is incomplete or corrupt")
            if path is not None:
                Path(path).write_bytes(data)
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return z["x"], z["y"]

        return self._download("DownloadDataset", request, max(self.timeout, 3600.0), arrays)

    # ------------------------------------------------------------------ TransferRate
    def transfer_rate(self, source_model_ids: Sequence[str], target_model_ids: Sequence[str], dataset_id: str, *,
                      norm: str = "L2", eps: float = 0.5, method: str = "pgd", steps: int = 0, step_size: float = 0.0,
                      targeted: bool = False, seed: int = 0, split: str = "", limit: int = 0,
                      batch_size: int = 0) -> Operation:
        """How often each source's adversarial examples fool each target (definitions in the result)."""
        req = rpc.TransferRateRequest(source_model_ids=list(source_model_ids), target_model_ids=list(target_model_ids),
                                      dataset_id=dataset_id, split=split, limit=limit, batch_size=batch_size,
                                      attack=attack_spec(norm, eps, method, steps, step_size, None, 0, targeted, seed))
        return self._start("TransferRate", req)

    # ------------------------------------------------------------------ operations
    def get_operation(self, operation_id: str) -> Operation:
        return self._call("GetOperation", op_pb.GetOperationRequest(operation_id=operation_id), self._op)

    def list_operations(self, kind: str = "", page_size: int = 0, limit: Optional[int] = None) -> list[Operation]:
        """Operations, newest first (kind: only those of this kind, "" = all): every page, fetched
        page_size at a time (0 = the server's default), or the newest `limit` of them."""
        if limit is not None and not page_size:
            page_size = max(1, min(limit, 1000))
        return self._pages("ListOperations", op_pb.ListOperationsRequest(kind=kind, page_size=page_size), limit,
                           lambda ops: [self._op(op) for op in ops])

    def list_operations_page(self, kind: str = "", page_size: int = 0,
                             page_token: str = "") -> tuple[list[Operation], str]:
        """One page of operations and the next page's token ("" after the last page)."""
        return self._call("ListOperations", op_pb.ListOperationsRequest(kind=kind, page_size=page_size,
                                                                        page_token=page_token),
                          lambda resp: ([self._op(op) for op in resp.operations], resp.next_page_token))

    def cancel_operation(self, operation_id: str) -> Operation:
        return self._call("CancelOperation", op_pb.CancelOperationRequest(operation_id=operation_id), self._op)

    def wait_operation(self, operation_id: str, timeout: float = 30.0) -> Operation:
        req = op_pb.WaitOperationRequest(operation_id=operation_id, timeout_seconds=timeout)
        return self._unary("WaitOperation", req, timeout + self.timeout, self._op)

    def watch_operation(self, operation_id: str) -> Iterator[op_pb.Operation]:
        return self._op(op_pb.Operation(id=operation_id)).watch()

    # ------------------------------------------------------------------ models
    def upload_model(self, file: Union[str, Path, bytes], *, format: str, num_classes: int = 0,
                     input_shape: Sequence[int] = (), architecture: str = "", name: str = "",
                     mean: Sequence[float] = (), std: Sequence[float] = (),
                     labels: Optional[Mapping[str, str]] = None,
                     arch_args: Optional[Mapping[str, str]] = None, layout: str = "",
                     value_range: str = "") -> res.Model:
        """format: "safetensors" (with a zoo architecture), "torchscript", "torch_export" or "onnx".
        input_shape (C,H,W without the batch) and num_classes may be left out where the file records
        them (ONNX, torch.export, zoo weights); the server reads them and says when it cannot. ONNX graphs declare their input layout ("NCHW" default, "NHWC") and value range ("0-1"
        default, "0-255"); they are checked against the graph's input at upload."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
        spec = res.ModelSpec(name=name, format=FORMATS[format], architecture=architecture, num_classes=num_classes,
                             input_shape=list(input_shape), mean=mean, std=std, labels=dict(labels or {}),
                             arch_args={k: str(v) for k, v in (arch_args or {}).items()}, layout=layout,
                             value_range=value_range)
        data = file if isinstance(file, bytes) else Path(file).read_bytes()
        parts = [res.UploadModelRequest(spec=spec)] + [res.UploadModelRequest(chunk=c) for c in _chunks(data)]
        return self._upload("UploadModel", parts, max(self.timeout, 600.0))

    def export_model(self, model_id: str, dataset_id: str, *, split: str = "", limit: int = 0,
                     name: str = "") -> Operation:
        """Export a torch model to ONNX (registered as a new model) and measure, on a dataset, how
        often the two predict the same class: the result is an ExportResult."""
        req = res.ExportModelRequest(model_id=model_id, dataset_id=dataset_id, split=split, limit=limit, name=name)
        return self._start("ExportModel", req)

    def get_model(self, model_id: str) -> res.Model:
        return self._call("GetModel", res.GetModelRequest(model_id=model_id))

    def list_models(self, page_size: int = 0) -> list[res.Model]:
        """Every model, oldest first, fetched page by page (page_size per call; 0 = the server's default)."""
        return self._pages("ListModels", res.ListModelsRequest(page_size=page_size))

    def list_models_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[res.Model], str]:
        """One page of models and the next page's token ("" after the last page)."""
        return self._call("ListModels", res.ListModelsRequest(page_size=page_size, page_token=page_token),
                          lambda resp: (list(resp.models), resp.next_page_token))

    def delete_model(self, model_id: str) -> None:
        return self._call("DeleteModel", res.DeleteModelRequest(model_id=model_id), _nothing)

    def register_endpoint(self, url: str, model_name: str, *, input_shape: Sequence[int], num_classes: int,
                          model_version: str = "", input_name: str = "", output_name: str = "", name: str = "",
                          layout: str = "", value_range: str = "", mean: Sequence[float] = (),
                          std: Sequence[float] = (), max_batch_size: int = 0, timeout_seconds: float = 0.0,
                          retries: Optional[int] = None, backoff_seconds: float = 0.0, max_qps: float = 0.0,
                          credential: str = "", labels: Optional[Mapping[str, str]] = None) -> res.Model:
        """A model served by an Open Inference Protocol server (Triton, KServe, MLServer, ...), as a
        black box: url "http(s)://host:port" (REST) or "grpc(s)://host:port" (gRPC); the server
        must allow the host (its endpoint_hosts setting). input_shape (C,H,W) and num_classes are
        checked against the endpoint's metadata; input/output names default to the only ones it
        has. credential: the name of one of the server's endpoint_credentials (never the secret).
        Registering the same url, model and version again returns the same model id."""
        endpoint = res.EndpointSpec(url=url, model_name=model_name, model_version=model_version, input_name=input_name,
                                    output_name=output_name, max_batch_size=max_batch_size,
                                    timeout_seconds=timeout_seconds, backoff_seconds=backoff_seconds, max_qps=max_qps,
                                    credential=credential)
        if retries is not None:
            endpoint.retries = retries
        spec = res.ModelSpec(name=name, format=res.ENDPOINT, num_classes=num_classes, input_shape=list(input_shape),
                             mean=mean, std=std, labels=dict(labels or {}), layout=layout, value_range=value_range,
                             endpoint=endpoint)
        return self._unary("RegisterEndpoint", res.RegisterEndpointRequest(spec=spec), max(self.timeout, 120.0))

    # ------------------------------------------------------------------ audits
    def audit(self, name: str, targets: Sequence[Union[str, Mapping[str, str]]], dataset_id: str, *,
              attacks: Iterable[Mapping] = (), suite: str = "", split: str = "", limit: int = 0,
              thresholds: Iterable[Mapping] = (), min_clean_accuracy: Optional[float] = None,
              max_drop: Optional[float] = None, batch_size: int = 0, spec_text: str = "") -> Operation:
        """Evaluate each target (a model id, or {"model_id": ..., "name": ...}) and judge it: thresholds
        are dicts {"norm": "Linf", "eps": 0.03, "min_robust_accuracy": 0.4, "on_ci_lower": True};
        max_drop: largest fall of robust accuracy (a fraction) against the target's last passing
        audit of this name. The result is an AuditResult; the server keeps a record per target."""
        req = rpc.AuditRequest(name=name, dataset_id=dataset_id, split=split, limit=limit, suite=suite,
                               batch_size=batch_size, spec_text=spec_text)
        for t in targets:
            t = {"model_id": t} if isinstance(t, str) else dict(t)
            req.targets.add(model_id=t.get("model_id", ""), name=t.get("name", ""))
        for a in attacks:
            a = dict(a)
            if suite:
                a.setdefault("method", "")
            eps = a.pop("eps", [])
            req.attacks.add(attack=attack_spec(**a), eps=[float(e) for e in (eps if isinstance(eps, (list, tuple))
                                                                          else [eps])])
        for th in thresholds:
            norm = str(th["norm"]).lower()
            if norm not in NORMS:
                raise ValueError(f"thresholds: norm must be 'L2' or 'Linf', got {th['norm']!r}")
            req.thresholds.add(norm=NORMS[norm], eps=float(th["eps"]), min_robust_accuracy=float(th["min_robust_accuracy"]),
                               on_ci_lower=bool(th.get("on_ci_lower", False)))
        if min_clean_accuracy is not None:
            req.min_clean_accuracy = min_clean_accuracy
        if max_drop is not None:
            req.max_drop = max_drop
        return self._start("Audit", req)

    def list_audits(self, target: str = "", audit_name: str = "", page_size: int = 0,
                    limit: Optional[int] = None) -> AuditHistory:
        """Audit records, newest first: of a target (model id or name) and audit name ("" = any); a
        list (AuditHistory) with a table, to_pandas() and plot()."""
        return self._pages("ListAudits", rpc.ListAuditsRequest(target=target, audit_name=audit_name,
                                                               page_size=page_size), limit, AuditHistory)

    # ------------------------------------------------------------------ datasets
    def upload_dataset(self, data: Union[str, Path, bytes, tuple], *, name: str = "", split: str = "train",
                       num_classes: int = 0, domain: str = "image",
                       class_names: Sequence[str] = ()) -> res.Dataset:
        """data: an .npz path/bytes with arrays x and y, or a tuple (x, y) of numpy arrays."""
        if isinstance(data, tuple):
            buf = io.BytesIO()
            np.savez(buf, x=np.asarray(data[0]), y=np.asarray(data[1], dtype=np.int64))
            payload = buf.getvalue()
        else:
            payload = data if isinstance(data, bytes) else Path(data).read_bytes()
        header = res.UploadDatasetHeader(name=name, split=split, num_classes=num_classes,
                                         domain=res.REAL if domain.lower() == "real" else res.IMAGE,
                                         class_names=list(class_names))
        parts = [res.UploadDatasetRequest(header=header)] + [res.UploadDatasetRequest(chunk=c) for c in _chunks(payload)]
        return self._upload("UploadDataset", parts, max(self.timeout, 600.0))

    def get_dataset(self, dataset_id: str) -> res.Dataset:
        return self._call("GetDataset", res.GetDatasetRequest(dataset_id=dataset_id))

    def list_datasets(self, page_size: int = 0) -> list[res.Dataset]:
        """Every dataset (the built-ins first), fetched page by page (page_size per call; 0 = the
        server's default)."""
        return self._pages("ListDatasets", res.ListDatasetsRequest(page_size=page_size))

    def list_datasets_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[res.Dataset], str]:
        """One page of datasets and the next page's token ("" after the last page)."""
        return self._call("ListDatasets", res.ListDatasetsRequest(page_size=page_size, page_token=page_token),
                          lambda resp: (list(resp.datasets), resp.next_page_token))

    def delete_dataset(self, dataset_id: str) -> None:
        return self._call("DeleteDataset", res.DeleteDatasetRequest(dataset_id=dataset_id), _nothing)


class Client(_Api):
    """advex client. target: "host:port". token: bearer token if the server requires one.
    tls: False (plaintext), True for TLS with the system roots, or the root certificates to trust
    (PEM bytes, or the path of a PEM file). client_cert, client_key: the client certificate chain
    and its private key for servers that require mutual TLS (PEM bytes or paths; both or
    neither; they imply TLS). Every call blocks; AsyncClient has the same methods for asyncio."""

    def __init__(self, target: str = "localhost:50051", token: Optional[str] = None,
                 tls: Union[bool, PEM] = False, timeout: float = 60.0, *,
                 client_cert: Optional[PEM] = None, client_key: Optional[PEM] = None) -> None:
        creds, options = _channel_settings(tls, client_cert, client_key)
        self.channel = (grpc.insecure_channel(target, options=options) if creds is None
                        else grpc.secure_channel(target, creds, options=options))
        self.stub = rpc_grpc.RobustnessStub(self.channel)
        super().__init__(target, token, timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def _op(self, proto: op_pb.Operation) -> Operation:
        return Operation(self, proto)

    def _blocking(self) -> "Client":
        return self

    def _unary(self, method: str, request, timeout: float, then=None):
        r = getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        return r if then is None else then(r)

    def _upload(self, method: str, parts: list, timeout: float):
        return getattr(self.stub, method)(iter(parts), metadata=self.metadata, timeout=timeout)

    def _download(self, method: str, request, timeout: float, then):
        return then(list(getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)))

    def _pages(self, method: str, request, limit: Optional[int] = None, then=list):
        pager = _Pager(method, request, limit)
        while pager.take(self._unary(method, request, self.timeout)):
            pass
        return then(pager.items)


class AsyncClient(_Api):
    """The client for asyncio (grpc.aio): the methods of Client, each a coroutine, so that a
    notebook or a pipeline step can run several operations at once::

        async with AsyncClient("localhost:50051") as c:
            ops = [await c.evaluate(m, "cifar10", attacks=[...]) for m in model_ids]
            results = await asyncio.gather(*(op.result() for op in ops))

    Long operations are AsyncOperation handles (`await op.result()`); `watch_operation` is an
    async iterator. Same arguments as Client; create it inside the running event loop."""

    def __init__(self, target: str = "localhost:50051", token: Optional[str] = None,
                 tls: Union[bool, PEM] = False, timeout: float = 60.0, *,
                 client_cert: Optional[PEM] = None, client_key: Optional[PEM] = None) -> None:
        creds, options = _channel_settings(tls, client_cert, client_key)
        self.channel = (grpc.aio.insecure_channel(target, options=options) if creds is None
                        else grpc.aio.secure_channel(target, creds, options=options))
        self.stub = rpc_grpc.RobustnessStub(self.channel)
        super().__init__(target, token, timeout)
        self._settings = dict(target=target, token=token, tls=tls, timeout=timeout, client_cert=client_cert,
                              client_key=client_key)
        self._sync: Optional[Client] = None

    async def close(self) -> None:
        await self.channel.close()
        if self._sync is not None:
            self._sync.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server accepts connections."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    def _op(self, proto: op_pb.Operation) -> AsyncOperation:
        return AsyncOperation(self, proto)

    def _blocking(self) -> Client:
        """A blocking twin on the same server (for what a result fetches when drawn, outside the loop)."""
        if self._sync is None:
            self._sync = Client(**self._settings)
        return self._sync

    async def _unary(self, method: str, request, timeout: float, then=None):
        r = await getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        return r if then is None else then(r)

    async def _upload(self, method: str, parts: list, timeout: float):
        return await getattr(self.stub, method)(iter(parts), metadata=self.metadata, timeout=timeout)

    async def _download(self, method: str, request, timeout: float, then):
        return then([msg async for msg in getattr(self.stub, method)(request, metadata=self.metadata,
                                                                     timeout=timeout)])

    async def _pages(self, method: str, request, limit: Optional[int] = None, then=list):
        pager = _Pager(method, request, limit)
        while pager.take(await self._unary(method, request, self.timeout)):
            pass
        return then(pager.items)


class _Pager:
    """The items of every page of a list RPC (or the first `limit`), following next_page_token."""

    def __init__(self, method: str, request, limit: Optional[int]) -> None:
        self.method, self.request, self.limit = method, request, limit
        self._items: list = []
        self._seen: set[str] = set()

    def take(self, resp) -> bool:
        """Keep a page's items; True when another page is wanted (the request then asks for it)."""
        field = resp.DESCRIPTOR.fields_by_number[1].name  # models, datasets, operations, records
        self._items.extend(getattr(resp, field))
        token = resp.next_page_token
        if not token or (self.limit is not None and len(self._items) >= self.limit):
            return False
        if token in self._seen:  # a server that does not advance: stop rather than loop
            raise RuntimeError(f"{self.method}: the server answered the same next_page_token twice")
        self._seen.add(token)
        self.request.page_token = token
        return True

    @property
    def items(self) -> list:
        return self._items if self.limit is None else self._items[:self.limit]


def _nothing(_response) -> None:
    return None


_INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def to_dict(message) -> dict:
    """A protobuf message (or a result that wraps one) as plain Python (field names as in the
    .proto). Unlike protobuf's JSON mapping, 64-bit integers stay numbers (the JSON mapping writes
    them as strings)."""
    message = getattr(message, "proto", message)
    return _numbers(message.DESCRIPTOR, json_format.MessageToDict(message, preserving_proto_field_name=True))


def _numbers(descriptor, value: dict) -> dict:
    for f in descriptor.fields:
        if f.name not in value:
            continue
        v = value[f.name]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            val_field = f.message_type.fields_by_name["value"]
            value[f.name] = {k: _field_value(val_field, x) for k, x in v.items()}
        elif f.is_repeated:
            value[f.name] = [_field_value(f, x) for x in v]
        else:
            value[f.name] = _field_value(f, v)
    return value


def _field_value(f, v):
    if f.type in _INT64_TYPES and isinstance(v, str):
        return int(v)
    if f.message_type is not None and isinstance(v, dict):  # well-known types (Timestamp) arrive as strings
        return _numbers(f.message_type, v)
    return v


def _chunks(data: bytes, size: int = CHUNK) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def worst_case_mask(result: results.EvaluateResult, norm: str, eps: float) -> np.ndarray:
    """uint8 [N]: 1 where the example survived every attack at (norm, eps)."""
    for wc in result.worst_case:
        if wc.norm == NORMS[norm.lower()] and abs(wc.eps - eps) <= 1e-9 * max(1.0, eps):
            return from_tensor(wc.per_example)
    raise KeyError(f"no worst case at {norm} eps={eps}")
