import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DirectionScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_SCOPE_UNSPECIFIED: _ClassVar[DirectionScope]
    DIRECTION_SCOPE_GLOBAL: _ClassVar[DirectionScope]
    DIRECTION_SCOPE_PER_LAYER: _ClassVar[DirectionScope]

class RowNormalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROW_NORMALIZATION_UNSPECIFIED: _ClassVar[RowNormalization]
    ROW_NORMALIZATION_NONE: _ClassVar[RowNormalization]
    ROW_NORMALIZATION_PRE: _ClassVar[RowNormalization]
    ROW_NORMALIZATION_FULL: _ClassVar[RowNormalization]
    ROW_NORMALIZATION_COLUMN: _ClassVar[RowNormalization]

class DirectionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_METHOD_UNSPECIFIED: _ClassVar[DirectionMethod]
    DIRECTION_METHOD_MEAN_DIFFERENCE: _ClassVar[DirectionMethod]
    DIRECTION_METHOD_SUBSPACE: _ClassVar[DirectionMethod]
    DIRECTION_METHOD_CONES: _ClassVar[DirectionMethod]
    DIRECTION_METHOD_PROBE: _ClassVar[DirectionMethod]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_MERGED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_LORA: _ClassVar[ExportFormat]

class TrialState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIAL_STATE_UNSPECIFIED: _ClassVar[TrialState]
    TRIAL_STATE_WAITING: _ClassVar[TrialState]
    TRIAL_STATE_RUNNING: _ClassVar[TrialState]
    TRIAL_STATE_COMPLETE: _ClassVar[TrialState]
    TRIAL_STATE_FAIL: _ClassVar[TrialState]
    TRIAL_STATE_PRUNED: _ClassVar[TrialState]
DIRECTION_SCOPE_UNSPECIFIED: DirectionScope
DIRECTION_SCOPE_GLOBAL: DirectionScope
DIRECTION_SCOPE_PER_LAYER: DirectionScope
ROW_NORMALIZATION_UNSPECIFIED: RowNormalization
ROW_NORMALIZATION_NONE: RowNormalization
ROW_NORMALIZATION_PRE: RowNormalization
ROW_NORMALIZATION_FULL: RowNormalization
ROW_NORMALIZATION_COLUMN: RowNormalization
DIRECTION_METHOD_UNSPECIFIED: DirectionMethod
DIRECTION_METHOD_MEAN_DIFFERENCE: DirectionMethod
DIRECTION_METHOD_SUBSPACE: DirectionMethod
DIRECTION_METHOD_CONES: DirectionMethod
DIRECTION_METHOD_PROBE: DirectionMethod
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_MERGED: ExportFormat
EXPORT_FORMAT_LORA: ExportFormat
TRIAL_STATE_UNSPECIFIED: TrialState
TRIAL_STATE_WAITING: TrialState
TRIAL_STATE_RUNNING: TrialState
TRIAL_STATE_COMPLETE: TrialState
TRIAL_STATE_FAIL: TrialState
TRIAL_STATE_PRUNED: TrialState

class TensorBlob(_message.Message):
    __slots__ = ("safetensors", "sha256")
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    safetensors: bytes
    sha256: str
    def __init__(self, safetensors: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class ComponentKernel(_message.Message):
    __slots__ = ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_POSITION_FIELD_NUMBER: _ClassVar[int]
    MIN_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIN_WEIGHT_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float
    def __init__(self, max_weight: _Optional[float] = ..., max_weight_position: _Optional[float] = ..., min_weight: _Optional[float] = ..., min_weight_distance: _Optional[float] = ...) -> None: ...

class AblationParams(_message.Message):
    __slots__ = ("direction_scope", "direction_index", "components", "row_normalization", "subspace_weights", "compliance_addition", "head_ablation")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ComponentKernel
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ComponentKernel, _Mapping]] = ...) -> None: ...
    DIRECTION_SCOPE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    ROW_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COMPLIANCE_ADDITION_FIELD_NUMBER: _ClassVar[int]
    HEAD_ABLATION_FIELD_NUMBER: _ClassVar[int]
    direction_scope: DirectionScope
    direction_index: float
    components: _containers.MessageMap[str, ComponentKernel]
    row_normalization: RowNormalization
    subspace_weights: _containers.RepeatedScalarFieldContainer[float]
    compliance_addition: ComplianceAddition
    head_ablation: HeadAblation
    def __init__(self, direction_scope: _Optional[_Union[DirectionScope, str]] = ..., direction_index: _Optional[float] = ..., components: _Optional[_Mapping[str, ComponentKernel]] = ..., row_normalization: _Optional[_Union[RowNormalization, str]] = ..., subspace_weights: _Optional[_Iterable[float]] = ..., compliance_addition: _Optional[_Union[ComplianceAddition, _Mapping]] = ..., head_ablation: _Optional[_Union[HeadAblation, _Mapping]] = ...) -> None: ...

class ComplianceAddition(_message.Message):
    __slots__ = ("strength", "layer")
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    strength: float
    layer: int
    def __init__(self, strength: _Optional[float] = ..., layer: _Optional[int] = ...) -> None: ...

class HeadAblation(_message.Message):
    __slots__ = ("top_heads", "weight")
    TOP_HEADS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    top_heads: int
    weight: float
    def __init__(self, top_heads: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("source", "gguf_file", "dtype", "device_map", "load_in_4bit", "trust_remote_code", "system_prompt", "chat_template_mode")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    GGUF_FILE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MAP_FIELD_NUMBER: _ClassVar[int]
    LOAD_IN_4BIT_FIELD_NUMBER: _ClassVar[int]
    TRUST_REMOTE_CODE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_MODE_FIELD_NUMBER: _ClassVar[int]
    source: str
    gguf_file: str
    dtype: str
    device_map: str
    load_in_4bit: bool
    trust_remote_code: bool
    system_prompt: str
    chat_template_mode: str
    def __init__(self, source: _Optional[str] = ..., gguf_file: _Optional[str] = ..., dtype: _Optional[str] = ..., device_map: _Optional[str] = ..., load_in_4bit: _Optional[bool] = ..., trust_remote_code: _Optional[bool] = ..., system_prompt: _Optional[str] = ..., chat_template_mode: _Optional[str] = ...) -> None: ...

class PromptSetSpec(_message.Message):
    __slots__ = ("source", "split", "column", "config", "streaming", "limit", "prompts")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    source: str
    split: str
    column: str
    config: str
    streaming: bool
    limit: int
    prompts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source: _Optional[str] = ..., split: _Optional[str] = ..., column: _Optional[str] = ..., config: _Optional[str] = ..., streaming: _Optional[bool] = ..., limit: _Optional[int] = ..., prompts: _Optional[_Iterable[str]] = ...) -> None: ...

class LayerModules(_message.Message):
    __slots__ = ("layer", "matrices")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MATRICES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    matrices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, layer: _Optional[int] = ..., matrices: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("architecture", "n_layers", "hidden_size", "components", "layers", "dtype", "device", "spec", "n_parameters", "model_type")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    N_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    n_layers: int
    hidden_size: int
    components: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedCompositeFieldContainer[LayerModules]
    dtype: str
    device: str
    spec: ModelSpec
    n_parameters: int
    model_type: str
    def __init__(self, architecture: _Optional[str] = ..., n_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., components: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[_Union[LayerModules, _Mapping]]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., n_parameters: _Optional[int] = ..., model_type: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "done", "total", "message")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    done: int
    total: int
    message: str
    def __init__(self, phase: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class TrialScores(_message.Message):
    __slots__ = ("kl", "refusals", "n_refusal_prompts", "n_kl_prompts", "timings_s", "pruned", "dominated_by", "degenerate", "unjudged")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KL_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    N_REFUSAL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    N_KL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    PRUNED_FIELD_NUMBER: _ClassVar[int]
    DOMINATED_BY_FIELD_NUMBER: _ClassVar[int]
    DEGENERATE_FIELD_NUMBER: _ClassVar[int]
    UNJUDGED_FIELD_NUMBER: _ClassVar[int]
    kl: float
    refusals: int
    n_refusal_prompts: int
    n_kl_prompts: int
    timings_s: _containers.ScalarMap[str, float]
    pruned: bool
    dominated_by: int
    degenerate: int
    unjudged: int
    def __init__(self, kl: _Optional[float] = ..., refusals: _Optional[int] = ..., n_refusal_prompts: _Optional[int] = ..., n_kl_prompts: _Optional[int] = ..., timings_s: _Optional[_Mapping[str, float]] = ..., pruned: _Optional[bool] = ..., dominated_by: _Optional[int] = ..., degenerate: _Optional[int] = ..., unjudged: _Optional[int] = ...) -> None: ...

class RefusalJudge(_message.Message):
    __slots__ = ("kind", "threshold", "model", "endpoint", "api_key_env", "timeout_s")
    KIND_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ENV_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    kind: str
    threshold: float
    model: str
    endpoint: str
    api_key_env: str
    timeout_s: float
    def __init__(self, kind: _Optional[str] = ..., threshold: _Optional[float] = ..., model: _Optional[str] = ..., endpoint: _Optional[str] = ..., api_key_env: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class BaselineSpec(_message.Message):
    __slots__ = ("kl_prompts", "refusal_prompts", "max_new_tokens", "kl_tokens", "refusal_markers", "model", "judge")
    KL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_MARKERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    kl_prompts: PromptSetSpec
    refusal_prompts: PromptSetSpec
    max_new_tokens: int
    kl_tokens: int
    refusal_markers: _containers.RepeatedScalarFieldContainer[str]
    model: ModelSpec
    judge: RefusalJudge
    def __init__(self, kl_prompts: _Optional[_Union[PromptSetSpec, _Mapping]] = ..., refusal_prompts: _Optional[_Union[PromptSetSpec, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., kl_tokens: _Optional[int] = ..., refusal_markers: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., judge: _Optional[_Union[RefusalJudge, _Mapping]] = ...) -> None: ...

class ExtractionOptions(_message.Message):
    __slots__ = ("projected", "winsorize_quantile", "batch_size", "sacred", "capability", "baseline", "n_sacred", "orthogonalize_against_sacred", "winsorize_scope", "direction_method", "n_directions", "cone_layer", "probe_weight", "label_max_new_tokens", "compliance", "head_scores", "calibration", "helpful", "unhelpful", "label_markers")
    PROJECTED_FIELD_NUMBER: _ClassVar[int]
    WINSORIZE_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SACRED_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    N_SACRED_FIELD_NUMBER: _ClassVar[int]
    ORTHOGONALIZE_AGAINST_SACRED_FIELD_NUMBER: _ClassVar[int]
    WINSORIZE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_METHOD_FIELD_NUMBER: _ClassVar[int]
    N_DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    CONE_LAYER_FIELD_NUMBER: _ClassVar[int]
    PROBE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABEL_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLIANCE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SCORES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    HELPFUL_FIELD_NUMBER: _ClassVar[int]
    UNHELPFUL_FIELD_NUMBER: _ClassVar[int]
    LABEL_MARKERS_FIELD_NUMBER: _ClassVar[int]
    projected: bool
    winsorize_quantile: float
    batch_size: int
    sacred: bool
    capability: PromptSetSpec
    baseline: PromptSetSpec
    n_sacred: int
    orthogonalize_against_sacred: bool
    winsorize_scope: str
    direction_method: DirectionMethod
    n_directions: int
    cone_layer: int
    probe_weight: float
    label_max_new_tokens: int
    compliance: bool
    head_scores: bool
    calibration: ActivationCalibration
    helpful: PromptSetSpec
    unhelpful: PromptSetSpec
    label_markers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, projected: _Optional[bool] = ..., winsorize_quantile: _Optional[float] = ..., batch_size: _Optional[int] = ..., sacred: _Optional[bool] = ..., capability: _Optional[_Union[PromptSetSpec, _Mapping]] = ..., baseline: _Optional[_Union[PromptSetSpec, _Mapping]] = ..., n_sacred: _Optional[int] = ..., orthogonalize_against_sacred: _Optional[bool] = ..., winsorize_scope: _Optional[str] = ..., direction_method: _Optional[_Union[DirectionMethod, str]] = ..., n_directions: _Optional[int] = ..., cone_layer: _Optional[int] = ..., probe_weight: _Optional[float] = ..., label_max_new_tokens: _Optional[int] = ..., compliance: _Optional[bool] = ..., head_scores: _Optional[bool] = ..., calibration: _Optional[_Union[ActivationCalibration, _Mapping]] = ..., helpful: _Optional[_Union[PromptSetSpec, _Mapping]] = ..., unhelpful: _Optional[_Union[PromptSetSpec, _Mapping]] = ..., label_markers: _Optional[_Iterable[str]] = ...) -> None: ...

class ActivationCalibration(_message.Message):
    __slots__ = ("enabled", "percentile", "min_factor", "max_factor")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    MIN_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_FACTOR_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    percentile: float
    min_factor: float
    max_factor: float
    def __init__(self, enabled: _Optional[bool] = ..., percentile: _Optional[float] = ..., min_factor: _Optional[float] = ..., max_factor: _Optional[float] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Trial(_message.Message):
    __slots__ = ("number", "state", "params", "scores", "evaluator", "started_at", "finished_at", "on_pareto_front", "error", "retry_of", "warm_start", "audit")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    EVALUATOR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ON_PARETO_FRONT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRY_OF_FIELD_NUMBER: _ClassVar[int]
    WARM_START_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    number: int
    state: TrialState
    params: AblationParams
    scores: TrialScores
    evaluator: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    on_pareto_front: bool
    error: str
    retry_of: int
    warm_start: bool
    audit: TrialAudit
    def __init__(self, number: _Optional[int] = ..., state: _Optional[_Union[TrialState, str]] = ..., params: _Optional[_Union[AblationParams, _Mapping]] = ..., scores: _Optional[_Union[TrialScores, _Mapping]] = ..., evaluator: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., on_pareto_front: _Optional[bool] = ..., error: _Optional[str] = ..., retry_of: _Optional[int] = ..., warm_start: _Optional[bool] = ..., audit: _Optional[_Union[TrialAudit, _Mapping]] = ...) -> None: ...

class TrialAudit(_message.Message):
    __slots__ = ("refusals", "degenerate", "unjudged", "n_prompts", "min_new_tokens", "max_new_tokens", "judge", "mean_tokens", "prompts", "audited_at", "capability_accuracy", "capability_original", "capability_questions")
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    DEGENERATE_FIELD_NUMBER: _ClassVar[int]
    UNJUDGED_FIELD_NUMBER: _ClassVar[int]
    N_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    MEAN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    AUDITED_AT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    refusals: int
    degenerate: int
    unjudged: int
    n_prompts: int
    min_new_tokens: int
    max_new_tokens: int
    judge: str
    mean_tokens: float
    prompts: PromptSetSpec
    audited_at: _timestamp_pb2.Timestamp
    capability_accuracy: float
    capability_original: float
    capability_questions: int
    def __init__(self, refusals: _Optional[int] = ..., degenerate: _Optional[int] = ..., unjudged: _Optional[int] = ..., n_prompts: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., judge: _Optional[str] = ..., mean_tokens: _Optional[float] = ..., prompts: _Optional[_Union[PromptSetSpec, _Mapping]] = ..., audited_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., capability_accuracy: _Optional[float] = ..., capability_original: _Optional[float] = ..., capability_questions: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...
