from advex.v1 import tensor_pb2 as _tensor_pb2
from advex.v1 import resources_pb2 as _resources_pb2
from advex.v1 import results_pb2 as _results_pb2
from advex.v1 import operation_pb2 as _operation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttackRequest(_message.Message):
    __slots__ = ("model_id", "x", "y", "attack", "domain", "eps")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    x: _tensor_pb2.Tensor
    y: _tensor_pb2.Tensor
    attack: _results_pb2.AttackSpec
    domain: _resources_pb2.Domain
    eps: _tensor_pb2.Tensor
    def __init__(self, model_id: _Optional[str] = ..., x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., y: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attack: _Optional[_Union[_results_pb2.AttackSpec, _Mapping]] = ..., domain: _Optional[_Union[_resources_pb2.Domain, str]] = ..., eps: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class AttackResponse(_message.Message):
    __slots__ = ("x_adv", "clean_pred", "adv_pred", "success", "perturbation_norm", "attack", "model_sha256", "queries", "endpoint_usage")
    X_ADV_FIELD_NUMBER: _ClassVar[int]
    CLEAN_PRED_FIELD_NUMBER: _ClassVar[int]
    ADV_PRED_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_NORM_FIELD_NUMBER: _ClassVar[int]
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_USAGE_FIELD_NUMBER: _ClassVar[int]
    x_adv: _tensor_pb2.Tensor
    clean_pred: _tensor_pb2.Tensor
    adv_pred: _tensor_pb2.Tensor
    success: _tensor_pb2.Tensor
    perturbation_norm: _tensor_pb2.Tensor
    attack: _results_pb2.AttackSpec
    model_sha256: str
    queries: _tensor_pb2.Tensor
    endpoint_usage: _results_pb2.EndpointUsage
    def __init__(self, x_adv: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., clean_pred: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., adv_pred: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., success: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., perturbation_norm: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attack: _Optional[_Union[_results_pb2.AttackSpec, _Mapping]] = ..., model_sha256: _Optional[str] = ..., queries: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., endpoint_usage: _Optional[_Union[_results_pb2.EndpointUsage, _Mapping]] = ...) -> None: ...

class AttackSweep(_message.Message):
    __slots__ = ("attack", "eps")
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    attack: _results_pb2.AttackSpec
    eps: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, attack: _Optional[_Union[_results_pb2.AttackSpec, _Mapping]] = ..., eps: _Optional[_Iterable[float]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("model_id", "dataset_id", "split", "limit", "attacks", "batch_size", "surrogate_model_id", "suite", "minimal_distance")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    ATTACKS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SURROGATE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    MINIMAL_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dataset_id: str
    split: str
    limit: int
    attacks: _containers.RepeatedCompositeFieldContainer[AttackSweep]
    batch_size: int
    surrogate_model_id: str
    suite: str
    minimal_distance: _containers.RepeatedScalarFieldContainer[_results_pb2.Norm]
    def __init__(self, model_id: _Optional[str] = ..., dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., limit: _Optional[int] = ..., attacks: _Optional[_Iterable[_Union[AttackSweep, _Mapping]]] = ..., batch_size: _Optional[int] = ..., surrogate_model_id: _Optional[str] = ..., suite: _Optional[str] = ..., minimal_distance: _Optional[_Iterable[_Union[_results_pb2.Norm, str]]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("architecture", "dataset_id", "split", "limit", "preset", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "lr_step_epochs", "lr_gamma", "augment", "adversarial", "seed", "name", "mean", "std", "arch_args")
    class ArchArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LR_STEP_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LR_GAMMA_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_FIELD_NUMBER: _ClassVar[int]
    ADVERSARIAL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    ARCH_ARGS_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    dataset_id: str
    split: str
    limit: int
    preset: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    lr_step_epochs: int
    lr_gamma: float
    augment: bool
    adversarial: _results_pb2.AttackSpec
    seed: int
    name: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    arch_args: _containers.ScalarMap[str, str]
    def __init__(self, architecture: _Optional[str] = ..., dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., limit: _Optional[int] = ..., preset: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., schedule: _Optional[str] = ..., lr_step_epochs: _Optional[int] = ..., lr_gamma: _Optional[float] = ..., augment: _Optional[bool] = ..., adversarial: _Optional[_Union[_results_pb2.AttackSpec, _Mapping]] = ..., seed: _Optional[int] = ..., name: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., arch_args: _Optional[_Mapping[str, str]] = ...) -> None: ...

class InversionSpec(_message.Message):
    __slots__ = ("steps", "step_size", "start", "eps")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    step_size: float
    start: str
    eps: float
    def __init__(self, steps: _Optional[int] = ..., step_size: _Optional[float] = ..., start: _Optional[str] = ..., eps: _Optional[float] = ...) -> None: ...

class RobustifyRequest(_message.Message):
    __slots__ = ("model_id", "dataset_id", "split", "limit", "inversion", "seed", "name", "batch_size", "shard_size")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INVERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dataset_id: str
    split: str
    limit: int
    inversion: InversionSpec
    seed: int
    name: str
    batch_size: int
    shard_size: int
    def __init__(self, model_id: _Optional[str] = ..., dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., limit: _Optional[int] = ..., inversion: _Optional[_Union[InversionSpec, _Mapping]] = ..., seed: _Optional[int] = ..., name: _Optional[str] = ..., batch_size: _Optional[int] = ..., shard_size: _Optional[int] = ...) -> None: ...

class BuildNonRobustDatasetRequest(_message.Message):
    __slots__ = ("mode", "model_id", "dataset_id", "split", "limit", "inversion", "attack", "seed", "name", "batch_size", "shard_size")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[BuildNonRobustDatasetRequest.Mode]
        D_NR: _ClassVar[BuildNonRobustDatasetRequest.Mode]
        D_RAND: _ClassVar[BuildNonRobustDatasetRequest.Mode]
        D_DET: _ClassVar[BuildNonRobustDatasetRequest.Mode]
    MODE_UNSPECIFIED: BuildNonRobustDatasetRequest.Mode
    D_NR: BuildNonRobustDatasetRequest.Mode
    D_RAND: BuildNonRobustDatasetRequest.Mode
    D_DET: BuildNonRobustDatasetRequest.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INVERSION_FIELD_NUMBER: _ClassVar[int]
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    mode: BuildNonRobustDatasetRequest.Mode
    model_id: str
    dataset_id: str
    split: str
    limit: int
    inversion: InversionSpec
    attack: _results_pb2.AttackSpec
    seed: int
    name: str
    batch_size: int
    shard_size: int
    def __init__(self, mode: _Optional[_Union[BuildNonRobustDatasetRequest.Mode, str]] = ..., model_id: _Optional[str] = ..., dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., limit: _Optional[int] = ..., inversion: _Optional[_Union[InversionSpec, _Mapping]] = ..., attack: _Optional[_Union[_results_pb2.AttackSpec, _Mapping]] = ..., seed: _Optional[int] = ..., name: _Optional[str] = ..., batch_size: _Optional[int] = ..., shard_size: _Optional[int] = ...) -> None: ...

class DownloadDatasetRequest(_message.Message):
    __slots__ = ("dataset_id", "split", "lossy_uint8", "limit")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LOSSY_UINT8_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    split: str
    lossy_uint8: bool
    limit: int
    def __init__(self, dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., lossy_uint8: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class DownloadDatasetResponse(_message.Message):
    __slots__ = ("info", "chunk")
    class Info(_message.Message):
        __slots__ = ("dataset_id", "split", "size_bytes", "sha256", "dtype", "num_examples")
        DATASET_ID_FIELD_NUMBER: _ClassVar[int]
        SPLIT_FIELD_NUMBER: _ClassVar[int]
        SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
        SHA256_FIELD_NUMBER: _ClassVar[int]
        DTYPE_FIELD_NUMBER: _ClassVar[int]
        NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
        dataset_id: str
        split: str
        size_bytes: int
        sha256: str
        dtype: str
        num_examples: int
        def __init__(self, dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., dtype: _Optional[str] = ..., num_examples: _Optional[int] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: DownloadDatasetResponse.Info
    chunk: bytes
    def __init__(self, info: _Optional[_Union[DownloadDatasetResponse.Info, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class TransferRateRequest(_message.Message):
    __slots__ = ("source_model_ids", "target_model_ids", "dataset_id", "split", "limit", "attack", "batch_size")
    SOURCE_MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    source_model_ids: _containers.RepeatedScalarFieldContainer[str]
    target_model_ids: _containers.RepeatedScalarFieldContainer[str]
    dataset_id: str
    split: str
    limit: int
    attack: _results_pb2.AttackSpec
    batch_size: int
    def __init__(self, source_model_ids: _Optional[_Iterable[str]] = ..., target_model_ids: _Optional[_Iterable[str]] = ..., dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., limit: _Optional[int] = ..., attack: _Optional[_Union[_results_pb2.AttackSpec, _Mapping]] = ..., batch_size: _Optional[int] = ...) -> None: ...

class AuditThreshold(_message.Message):
    __slots__ = ("norm", "eps", "min_robust_accuracy", "on_ci_lower")
    NORM_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MIN_ROBUST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ON_CI_LOWER_FIELD_NUMBER: _ClassVar[int]
    norm: _results_pb2.Norm
    eps: float
    min_robust_accuracy: float
    on_ci_lower: bool
    def __init__(self, norm: _Optional[_Union[_results_pb2.Norm, str]] = ..., eps: _Optional[float] = ..., min_robust_accuracy: _Optional[float] = ..., on_ci_lower: _Optional[bool] = ...) -> None: ...

class AuditTarget(_message.Message):
    __slots__ = ("model_id", "name")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    name: str
    def __init__(self, model_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("name", "targets", "dataset_id", "split", "limit", "suite", "attacks", "batch_size", "thresholds", "min_clean_accuracy", "max_drop", "spec_text")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    ATTACKS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLEAN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MAX_DROP_FIELD_NUMBER: _ClassVar[int]
    SPEC_TEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    targets: _containers.RepeatedCompositeFieldContainer[AuditTarget]
    dataset_id: str
    split: str
    limit: int
    suite: str
    attacks: _containers.RepeatedCompositeFieldContainer[AttackSweep]
    batch_size: int
    thresholds: _containers.RepeatedCompositeFieldContainer[AuditThreshold]
    min_clean_accuracy: float
    max_drop: float
    spec_text: str
    def __init__(self, name: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[AuditTarget, _Mapping]]] = ..., dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., limit: _Optional[int] = ..., suite: _Optional[str] = ..., attacks: _Optional[_Iterable[_Union[AttackSweep, _Mapping]]] = ..., batch_size: _Optional[int] = ..., thresholds: _Optional[_Iterable[_Union[AuditThreshold, _Mapping]]] = ..., min_clean_accuracy: _Optional[float] = ..., max_drop: _Optional[float] = ..., spec_text: _Optional[str] = ...) -> None: ...

class ListAuditsRequest(_message.Message):
    __slots__ = ("target", "audit_name", "page_size", "page_token")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    AUDIT_NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    target: str
    audit_name: str
    page_size: int
    page_token: str
    def __init__(self, target: _Optional[str] = ..., audit_name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_results_pb2.AuditRecord]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[_results_pb2.AuditRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
