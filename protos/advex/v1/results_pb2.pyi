import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from advex.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Norm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORM_UNSPECIFIED: _ClassVar[Norm]
    LINF: _ClassVar[Norm]
    L2: _ClassVar[Norm]
NORM_UNSPECIFIED: Norm
LINF: Norm
L2: Norm

class AttackSpec(_message.Message):
    __slots__ = ("method", "norm", "eps", "step_size", "steps", "random_start", "restarts", "targeted", "seed", "eot")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_START_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    TARGETED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EOT_FIELD_NUMBER: _ClassVar[int]
    method: str
    norm: Norm
    eps: float
    step_size: float
    steps: int
    random_start: bool
    restarts: int
    targeted: bool
    seed: int
    eot: int
    def __init__(self, method: _Optional[str] = ..., norm: _Optional[_Union[Norm, str]] = ..., eps: _Optional[float] = ..., step_size: _Optional[float] = ..., steps: _Optional[int] = ..., random_start: _Optional[bool] = ..., restarts: _Optional[int] = ..., targeted: _Optional[bool] = ..., seed: _Optional[int] = ..., eot: _Optional[int] = ...) -> None: ...

class Interval(_message.Message):
    __slots__ = ("lower", "upper")
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    lower: float
    upper: float
    def __init__(self, lower: _Optional[float] = ..., upper: _Optional[float] = ...) -> None: ...

class RobustAccuracy(_message.Message):
    __slots__ = ("attack", "robust_accuracy", "robust_correct", "total", "success_rate", "per_class_robust_accuracy", "wall_seconds", "mean_queries", "crafted_on_model_id", "robust_accuracy_ci", "suite")
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    ROBUST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ROBUST_CORRECT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_ROBUST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_QUERIES_FIELD_NUMBER: _ClassVar[int]
    CRAFTED_ON_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ROBUST_ACCURACY_CI_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    attack: AttackSpec
    robust_accuracy: float
    robust_correct: int
    total: int
    success_rate: float
    per_class_robust_accuracy: _containers.RepeatedScalarFieldContainer[float]
    wall_seconds: float
    mean_queries: float
    crafted_on_model_id: str
    robust_accuracy_ci: Interval
    suite: str
    def __init__(self, attack: _Optional[_Union[AttackSpec, _Mapping]] = ..., robust_accuracy: _Optional[float] = ..., robust_correct: _Optional[int] = ..., total: _Optional[int] = ..., success_rate: _Optional[float] = ..., per_class_robust_accuracy: _Optional[_Iterable[float]] = ..., wall_seconds: _Optional[float] = ..., mean_queries: _Optional[float] = ..., crafted_on_model_id: _Optional[str] = ..., robust_accuracy_ci: _Optional[_Union[Interval, _Mapping]] = ..., suite: _Optional[str] = ...) -> None: ...

class SkippedAttack(_message.Message):
    __slots__ = ("attack", "reason")
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    attack: AttackSpec
    reason: str
    def __init__(self, attack: _Optional[_Union[AttackSpec, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class WorstCase(_message.Message):
    __slots__ = ("norm", "eps", "robust_accuracy", "robust_correct", "per_example", "robust_accuracy_ci")
    NORM_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    ROBUST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ROBUST_CORRECT_FIELD_NUMBER: _ClassVar[int]
    PER_EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    ROBUST_ACCURACY_CI_FIELD_NUMBER: _ClassVar[int]
    norm: Norm
    eps: float
    robust_accuracy: float
    robust_correct: int
    per_example: _tensor_pb2.Tensor
    robust_accuracy_ci: Interval
    def __init__(self, norm: _Optional[_Union[Norm, str]] = ..., eps: _Optional[float] = ..., robust_accuracy: _Optional[float] = ..., robust_correct: _Optional[int] = ..., per_example: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., robust_accuracy_ci: _Optional[_Union[Interval, _Mapping]] = ...) -> None: ...

class CurvePoint(_message.Message):
    __slots__ = ("eps", "robust_accuracy", "robust_correct", "robust_accuracy_ci")
    EPS_FIELD_NUMBER: _ClassVar[int]
    ROBUST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ROBUST_CORRECT_FIELD_NUMBER: _ClassVar[int]
    ROBUST_ACCURACY_CI_FIELD_NUMBER: _ClassVar[int]
    eps: float
    robust_accuracy: float
    robust_correct: int
    robust_accuracy_ci: Interval
    def __init__(self, eps: _Optional[float] = ..., robust_accuracy: _Optional[float] = ..., robust_correct: _Optional[int] = ..., robust_accuracy_ci: _Optional[_Union[Interval, _Mapping]] = ...) -> None: ...

class DistanceCurve(_message.Message):
    __slots__ = ("norm", "method", "per_example", "points", "median_distance", "wall_seconds")
    NORM_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PER_EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    norm: Norm
    method: str
    per_example: _tensor_pb2.Tensor
    points: _containers.RepeatedCompositeFieldContainer[CurvePoint]
    median_distance: float
    wall_seconds: float
    def __init__(self, norm: _Optional[_Union[Norm, str]] = ..., method: _Optional[str] = ..., per_example: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., points: _Optional[_Iterable[_Union[CurvePoint, _Mapping]]] = ..., median_distance: _Optional[float] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class EvaluateResult(_message.Message):
    __slots__ = ("model_id", "model_sha256", "dataset_id", "split", "num_examples", "clean_accuracy", "clean_correct", "per_class_accuracy", "per_class_count", "robust", "worst_case", "wall_seconds", "device", "gradient_masking_suspected", "notes", "skipped", "clean_accuracy_ci", "distance_curves", "endpoint_usage")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLEAN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CLEAN_CORRECT_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_COUNT_FIELD_NUMBER: _ClassVar[int]
    ROBUST_FIELD_NUMBER: _ClassVar[int]
    WORST_CASE_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_MASKING_SUSPECTED_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CLEAN_ACCURACY_CI_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_CURVES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_USAGE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_sha256: str
    dataset_id: str
    split: str
    num_examples: int
    clean_accuracy: float
    clean_correct: int
    per_class_accuracy: _containers.RepeatedScalarFieldContainer[float]
    per_class_count: _containers.RepeatedScalarFieldContainer[int]
    robust: _containers.RepeatedCompositeFieldContainer[RobustAccuracy]
    worst_case: _containers.RepeatedCompositeFieldContainer[WorstCase]
    wall_seconds: float
    device: str
    gradient_masking_suspected: bool
    notes: _containers.RepeatedScalarFieldContainer[str]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedAttack]
    clean_accuracy_ci: Interval
    distance_curves: _containers.RepeatedCompositeFieldContainer[DistanceCurve]
    endpoint_usage: EndpointUsage
    def __init__(self, model_id: _Optional[str] = ..., model_sha256: _Optional[str] = ..., dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., num_examples: _Optional[int] = ..., clean_accuracy: _Optional[float] = ..., clean_correct: _Optional[int] = ..., per_class_accuracy: _Optional[_Iterable[float]] = ..., per_class_count: _Optional[_Iterable[int]] = ..., robust: _Optional[_Iterable[_Union[RobustAccuracy, _Mapping]]] = ..., worst_case: _Optional[_Iterable[_Union[WorstCase, _Mapping]]] = ..., wall_seconds: _Optional[float] = ..., device: _Optional[str] = ..., gradient_masking_suspected: _Optional[bool] = ..., notes: _Optional[_Iterable[str]] = ..., skipped: _Optional[_Iterable[_Union[SkippedAttack, _Mapping]]] = ..., clean_accuracy_ci: _Optional[_Union[Interval, _Mapping]] = ..., distance_curves: _Optional[_Iterable[_Union[DistanceCurve, _Mapping]]] = ..., endpoint_usage: _Optional[_Union[EndpointUsage, _Mapping]] = ...) -> None: ...

class EndpointUsage(_message.Message):
    __slots__ = ("model_id", "requests", "rows", "retries", "failures")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    requests: int
    rows: int
    retries: int
    failures: int
    def __init__(self, model_id: _Optional[str] = ..., requests: _Optional[int] = ..., rows: _Optional[int] = ..., retries: _Optional[int] = ..., failures: _Optional[int] = ...) -> None: ...

class EpochStats(_message.Message):
    __slots__ = ("epoch", "train_loss", "train_accuracy", "train_robust_accuracy", "lr", "wall_seconds")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ROBUST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    train_loss: float
    train_accuracy: float
    train_robust_accuracy: float
    lr: float
    wall_seconds: float
    def __init__(self, epoch: _Optional[int] = ..., train_loss: _Optional[float] = ..., train_accuracy: _Optional[float] = ..., train_robust_accuracy: _Optional[float] = ..., lr: _Optional[float] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("model_id", "model_sha256", "history", "wall_seconds", "device")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_sha256: str
    history: _containers.RepeatedCompositeFieldContainer[EpochStats]
    wall_seconds: float
    device: str
    def __init__(self, model_id: _Optional[str] = ..., model_sha256: _Optional[str] = ..., history: _Optional[_Iterable[_Union[EpochStats, _Mapping]]] = ..., wall_seconds: _Optional[float] = ..., device: _Optional[str] = ...) -> None: ...

class DatasetBuildResult(_message.Message):
    __slots__ = ("dataset_id", "mode", "num_examples", "target_hit_rate", "mean_l2", "max_l2", "feature_distance_mean", "feature_distance_p95", "feature_distance_start_mean", "mean_l2_from_start", "wall_seconds", "device")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TARGET_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_L2_FIELD_NUMBER: _ClassVar[int]
    MAX_L2_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DISTANCE_MEAN_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DISTANCE_P95_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DISTANCE_START_MEAN_FIELD_NUMBER: _ClassVar[int]
    MEAN_L2_FROM_START_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    mode: str
    num_examples: int
    target_hit_rate: float
    mean_l2: float
    max_l2: float
    feature_distance_mean: float
    feature_distance_p95: float
    feature_distance_start_mean: float
    mean_l2_from_start: float
    wall_seconds: float
    device: str
    def __init__(self, dataset_id: _Optional[str] = ..., mode: _Optional[str] = ..., num_examples: _Optional[int] = ..., target_hit_rate: _Optional[float] = ..., mean_l2: _Optional[float] = ..., max_l2: _Optional[float] = ..., feature_distance_mean: _Optional[float] = ..., feature_distance_p95: _Optional[float] = ..., feature_distance_start_mean: _Optional[float] = ..., mean_l2_from_start: _Optional[float] = ..., wall_seconds: _Optional[float] = ..., device: _Optional[str] = ...) -> None: ...

class TransferPair(_message.Message):
    __slots__ = ("source_model_id", "target_model_id", "examples", "correct_on_source", "correct_on_target", "successful_on_source", "transferred", "fooled_target", "white_box_success_rate", "transfer_rate", "unconditional_rate", "white_box_success_rate_ci", "transfer_rate_ci", "unconditional_rate_ci", "successful_target_correct", "transferred_target_correct", "conditional_transfer_rate", "conditional_transfer_rate_ci")
    SOURCE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CORRECT_ON_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CORRECT_ON_TARGET_FIELD_NUMBER: _ClassVar[int]
    SUCCESSFUL_ON_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    FOOLED_TARGET_FIELD_NUMBER: _ClassVar[int]
    WHITE_BOX_SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_RATE_FIELD_NUMBER: _ClassVar[int]
    UNCONDITIONAL_RATE_FIELD_NUMBER: _ClassVar[int]
    WHITE_BOX_SUCCESS_RATE_CI_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_RATE_CI_FIELD_NUMBER: _ClassVar[int]
    UNCONDITIONAL_RATE_CI_FIELD_NUMBER: _ClassVar[int]
    SUCCESSFUL_TARGET_CORRECT_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_TARGET_CORRECT_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_TRANSFER_RATE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_TRANSFER_RATE_CI_FIELD_NUMBER: _ClassVar[int]
    source_model_id: str
    target_model_id: str
    examples: int
    correct_on_source: int
    correct_on_target: int
    successful_on_source: int
    transferred: int
    fooled_target: int
    white_box_success_rate: float
    transfer_rate: float
    unconditional_rate: float
    white_box_success_rate_ci: Interval
    transfer_rate_ci: Interval
    unconditional_rate_ci: Interval
    successful_target_correct: int
    transferred_target_correct: int
    conditional_transfer_rate: float
    conditional_transfer_rate_ci: Interval
    def __init__(self, source_model_id: _Optional[str] = ..., target_model_id: _Optional[str] = ..., examples: _Optional[int] = ..., correct_on_source: _Optional[int] = ..., correct_on_target: _Optional[int] = ..., successful_on_source: _Optional[int] = ..., transferred: _Optional[int] = ..., fooled_target: _Optional[int] = ..., white_box_success_rate: _Optional[float] = ..., transfer_rate: _Optional[float] = ..., unconditional_rate: _Optional[float] = ..., white_box_success_rate_ci: _Optional[_Union[Interval, _Mapping]] = ..., transfer_rate_ci: _Optional[_Union[Interval, _Mapping]] = ..., unconditional_rate_ci: _Optional[_Union[Interval, _Mapping]] = ..., successful_target_correct: _Optional[int] = ..., transferred_target_correct: _Optional[int] = ..., conditional_transfer_rate: _Optional[float] = ..., conditional_transfer_rate_ci: _Optional[_Union[Interval, _Mapping]] = ...) -> None: ...

class TransferRateResult(_message.Message):
    __slots__ = ("definition", "attack", "dataset_id", "split", "pairs", "wall_seconds", "device", "endpoint_usage")
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_USAGE_FIELD_NUMBER: _ClassVar[int]
    definition: str
    attack: AttackSpec
    dataset_id: str
    split: str
    pairs: _containers.RepeatedCompositeFieldContainer[TransferPair]
    wall_seconds: float
    device: str
    endpoint_usage: _containers.RepeatedCompositeFieldContainer[EndpointUsage]
    def __init__(self, definition: _Optional[str] = ..., attack: _Optional[_Union[AttackSpec, _Mapping]] = ..., dataset_id: _Optional[str] = ..., split: _Optional[str] = ..., pairs: _Optional[_Iterable[_Union[TransferPair, _Mapping]]] = ..., wall_seconds: _Optional[float] = ..., device: _Optional[str] = ..., endpoint_usage: _Optional[_Iterable[_Union[EndpointUsage, _Mapping]]] = ...) -> None: ...

class ExportResult(_message.Message):
    __slots__ = ("model_id", "source_model_id", "model_sha256", "examples", "agreement_rate", "disagreements", "max_abs_logit_difference", "execution_provider", "wall_seconds")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_RATE_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_LOGIT_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    source_model_id: str
    model_sha256: str
    examples: int
    agreement_rate: float
    disagreements: int
    max_abs_logit_difference: float
    execution_provider: str
    wall_seconds: float
    def __init__(self, model_id: _Optional[str] = ..., source_model_id: _Optional[str] = ..., model_sha256: _Optional[str] = ..., examples: _Optional[int] = ..., agreement_rate: _Optional[float] = ..., disagreements: _Optional[int] = ..., max_abs_logit_difference: _Optional[float] = ..., execution_provider: _Optional[str] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class AuditCheck(_message.Message):
    __slots__ = ("kind", "norm", "eps", "on", "measured", "limit", "baseline", "passed", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    ON_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    norm: Norm
    eps: float
    on: str
    measured: float
    limit: float
    baseline: float
    passed: bool
    message: str
    def __init__(self, kind: _Optional[str] = ..., norm: _Optional[_Union[Norm, str]] = ..., eps: _Optional[float] = ..., on: _Optional[str] = ..., measured: _Optional[float] = ..., limit: _Optional[float] = ..., baseline: _Optional[float] = ..., passed: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("id", "operation_id", "audit_name", "model_id", "target_name", "model_sha256", "endpoint_metadata_json", "create_time", "passed", "checks", "evaluation", "baseline_audit_id", "request_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIT_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_AUDIT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    operation_id: str
    audit_name: str
    model_id: str
    target_name: str
    model_sha256: str
    endpoint_metadata_json: str
    create_time: _timestamp_pb2.Timestamp
    passed: bool
    checks: _containers.RepeatedCompositeFieldContainer[AuditCheck]
    evaluation: EvaluateResult
    baseline_audit_id: str
    request_json: str
    def __init__(self, id: _Optional[str] = ..., operation_id: _Optional[str] = ..., audit_name: _Optional[str] = ..., model_id: _Optional[str] = ..., target_name: _Optional[str] = ..., model_sha256: _Optional[str] = ..., endpoint_metadata_json: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., passed: _Optional[bool] = ..., checks: _Optional[_Iterable[_Union[AuditCheck, _Mapping]]] = ..., evaluation: _Optional[_Union[EvaluateResult, _Mapping]] = ..., baseline_audit_id: _Optional[str] = ..., request_json: _Optional[str] = ...) -> None: ...

class AuditResult(_message.Message):
    __slots__ = ("audit_name", "passed", "records")
    AUDIT_NAME_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    audit_name: str
    passed: bool
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    def __init__(self, audit_name: _Optional[str] = ..., passed: _Optional[bool] = ..., records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ...) -> None: ...
