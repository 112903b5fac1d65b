from abliterate.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditTrialRequest(_message.Message):
    __slots__ = ("direction_set_id", "params", "prompts", "min_new_tokens", "max_new_tokens", "judge", "model")
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    direction_set_id: str
    params: _common_pb2.AblationParams
    prompts: _common_pb2.PromptSetSpec
    min_new_tokens: int
    max_new_tokens: int
    judge: _common_pb2.RefusalJudge
    model: _common_pb2.ModelSpec
    def __init__(self, direction_set_id: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.AblationParams, _Mapping]] = ..., prompts: _Optional[_Union[_common_pb2.PromptSetSpec, _Mapping]] = ..., min_new_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., judge: _Optional[_Union[_common_pb2.RefusalJudge, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ...) -> None: ...

class AuditTrialResponse(_message.Message):
    __slots__ = ("audit", "sample_refusals", "sample_compliances", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COMPLIANCES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    audit: _common_pb2.TrialAudit
    sample_refusals: _containers.RepeatedScalarFieldContainer[str]
    sample_compliances: _containers.RepeatedScalarFieldContainer[str]
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, audit: _Optional[_Union[_common_pb2.TrialAudit, _Mapping]] = ..., sample_refusals: _Optional[_Iterable[str]] = ..., sample_compliances: _Optional[_Iterable[str]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class LoadDirectionsRequest(_message.Message):
    __slots__ = ("directions", "direction_set_id")
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    directions: _common_pb2.TensorBlob
    direction_set_id: str
    def __init__(self, directions: _Optional[_Union[_common_pb2.TensorBlob, _Mapping]] = ..., direction_set_id: _Optional[str] = ...) -> None: ...

class LoadDirectionsResponse(_message.Message):
    __slots__ = ("direction_set_id", "already_loaded", "tensor_names", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_NAMES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    direction_set_id: str
    already_loaded: bool
    tensor_names: _containers.RepeatedScalarFieldContainer[str]
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, direction_set_id: _Optional[str] = ..., already_loaded: _Optional[bool] = ..., tensor_names: _Optional[_Iterable[str]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PrepareBaselineRequest(_message.Message):
    __slots__ = ("baseline", "skip_refusal_count")
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    SKIP_REFUSAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    baseline: _common_pb2.BaselineSpec
    skip_refusal_count: bool
    def __init__(self, baseline: _Optional[_Union[_common_pb2.BaselineSpec, _Mapping]] = ..., skip_refusal_count: _Optional[bool] = ...) -> None: ...

class PrepareBaselineResponse(_message.Message):
    __slots__ = ("baseline_id", "already_prepared", "n_kl_prompts", "n_refusal_prompts", "baseline_refusals", "timings_s", "refusals_counted")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BASELINE_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PREPARED_FIELD_NUMBER: _ClassVar[int]
    N_KL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    N_REFUSAL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_COUNTED_FIELD_NUMBER: _ClassVar[int]
    baseline_id: str
    already_prepared: bool
    n_kl_prompts: int
    n_refusal_prompts: int
    baseline_refusals: int
    timings_s: _containers.ScalarMap[str, float]
    refusals_counted: bool
    def __init__(self, baseline_id: _Optional[str] = ..., already_prepared: _Optional[bool] = ..., n_kl_prompts: _Optional[int] = ..., n_refusal_prompts: _Optional[int] = ..., baseline_refusals: _Optional[int] = ..., timings_s: _Optional[_Mapping[str, float]] = ..., refusals_counted: _Optional[bool] = ...) -> None: ...

class EvaluateTrialRequest(_message.Message):
    __slots__ = ("direction_set_id", "params", "baseline_id", "trial_number", "prune_against")
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ID_FIELD_NUMBER: _ClassVar[int]
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PRUNE_AGAINST_FIELD_NUMBER: _ClassVar[int]
    direction_set_id: str
    params: _common_pb2.AblationParams
    baseline_id: str
    trial_number: int
    prune_against: _containers.RepeatedCompositeFieldContainer[ScorePoint]
    def __init__(self, direction_set_id: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.AblationParams, _Mapping]] = ..., baseline_id: _Optional[str] = ..., trial_number: _Optional[int] = ..., prune_against: _Optional[_Iterable[_Union[ScorePoint, _Mapping]]] = ...) -> None: ...

class ScorePoint(_message.Message):
    __slots__ = ("kl", "refusals", "trial_number")
    KL_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    kl: float
    refusals: int
    trial_number: int
    def __init__(self, kl: _Optional[float] = ..., refusals: _Optional[int] = ..., trial_number: _Optional[int] = ...) -> None: ...

class EvaluateTrialResponse(_message.Message):
    __slots__ = ("scores", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    scores: _common_pb2.TrialScores
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, scores: _Optional[_Union[_common_pb2.TrialScores, _Mapping]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("direction_set_id", "params", "prompt", "options", "raw")
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    direction_set_id: str
    params: _common_pb2.AblationParams
    prompt: str
    options: _common_pb2.GenerationOptions
    raw: bool
    def __init__(self, direction_set_id: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.AblationParams, _Mapping]] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[_common_pb2.GenerationOptions, _Mapping]] = ..., raw: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "n_tokens", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    n_tokens: int
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., n_tokens: _Optional[int] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluatorServiceChatRequest(_message.Message):
    __slots__ = ("direction_set_id", "params", "messages", "options")
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    direction_set_id: str
    params: _common_pb2.AblationParams
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    options: _common_pb2.GenerationOptions
    def __init__(self, direction_set_id: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.AblationParams, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., options: _Optional[_Union[_common_pb2.GenerationOptions, _Mapping]] = ...) -> None: ...

class EvaluatorServiceChatResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "n_tokens", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    n_tokens: int
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., n_tokens: _Optional[int] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluatorServiceExportModelRequest(_message.Message):
    __slots__ = ("direction_set_id", "params", "path", "format", "hub_repo", "hub_private", "overwrite", "manifest_json", "baseline")
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    HUB_REPO_FIELD_NUMBER: _ClassVar[int]
    HUB_PRIVATE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    direction_set_id: str
    params: _common_pb2.AblationParams
    path: str
    format: _common_pb2.ExportFormat
    hub_repo: str
    hub_private: bool
    overwrite: bool
    manifest_json: str
    baseline: _common_pb2.BaselineSpec
    def __init__(self, direction_set_id: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.AblationParams, _Mapping]] = ..., path: _Optional[str] = ..., format: _Optional[_Union[_common_pb2.ExportFormat, str]] = ..., hub_repo: _Optional[str] = ..., hub_private: _Optional[bool] = ..., overwrite: _Optional[bool] = ..., manifest_json: _Optional[str] = ..., baseline: _Optional[_Union[_common_pb2.BaselineSpec, _Mapping]] = ...) -> None: ...

class EvaluatorServiceExportModelResponse(_message.Message):
    __slots__ = ("path", "files", "bytes_written", "hub_url", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    HUB_URL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    path: str
    files: _containers.RepeatedScalarFieldContainer[str]
    bytes_written: int
    hub_url: str
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, path: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ..., bytes_written: _Optional[int] = ..., hub_url: _Optional[str] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...
