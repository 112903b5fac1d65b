import datetime

from abliterate.v1 import common_pb2 as _common_pb2
from abliterate.v1 import extractor_pb2 as _extractor_pb2
from abliterate.v1 import optimizer_pb2 as _optimizer_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_PHASE_UNSPECIFIED: _ClassVar[JobPhase]
    JOB_PHASE_QUEUED: _ClassVar[JobPhase]
    JOB_PHASE_EXTRACTING: _ClassVar[JobPhase]
    JOB_PHASE_OPTIMIZING: _ClassVar[JobPhase]
    JOB_PHASE_SUCCEEDED: _ClassVar[JobPhase]
    JOB_PHASE_FAILED: _ClassVar[JobPhase]
    JOB_PHASE_CANCELLED: _ClassVar[JobPhase]
    JOB_PHASE_INTERRUPTED: _ClassVar[JobPhase]
JOB_PHASE_UNSPECIFIED: JobPhase
JOB_PHASE_QUEUED: JobPhase
JOB_PHASE_EXTRACTING: JobPhase
JOB_PHASE_OPTIMIZING: JobPhase
JOB_PHASE_SUCCEEDED: JobPhase
JOB_PHASE_FAILED: JobPhase
JOB_PHASE_CANCELLED: JobPhase
JOB_PHASE_INTERRUPTED: JobPhase

class JobOptions(_message.Message):
    __slots__ = ("extraction", "search_space", "kl_tokens", "warm_start", "refusal_markers", "trial_timeout_s", "max_trial_retries", "disable_pruning", "judge", "audit_front", "audit_min_new_tokens", "audit_max_new_tokens", "warm_start_profile")
    EXTRACTION_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SPACE_FIELD_NUMBER: _ClassVar[int]
    KL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WARM_START_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_MARKERS_FIELD_NUMBER: _ClassVar[int]
    TRIAL_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_TRIAL_RETRIES_FIELD_NUMBER: _ClassVar[int]
    DISABLE_PRUNING_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FRONT_FIELD_NUMBER: _ClassVar[int]
    AUDIT_MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WARM_START_PROFILE_FIELD_NUMBER: _ClassVar[int]
    extraction: _common_pb2.ExtractionOptions
    search_space: _optimizer_pb2.SearchSpace
    kl_tokens: int
    warm_start: _containers.RepeatedCompositeFieldContainer[_common_pb2.AblationParams]
    refusal_markers: _containers.RepeatedScalarFieldContainer[str]
    trial_timeout_s: float
    max_trial_retries: int
    disable_pruning: bool
    judge: _common_pb2.RefusalJudge
    audit_front: bool
    audit_min_new_tokens: int
    audit_max_new_tokens: int
    warm_start_profile: str
    def __init__(self, extraction: _Optional[_Union[_common_pb2.ExtractionOptions, _Mapping]] = ..., search_space: _Optional[_Union[_optimizer_pb2.SearchSpace, _Mapping]] = ..., kl_tokens: _Optional[int] = ..., warm_start: _Optional[_Iterable[_Union[_common_pb2.AblationParams, _Mapping]]] = ..., refusal_markers: _Optional[_Iterable[str]] = ..., trial_timeout_s: _Optional[float] = ..., max_trial_retries: _Optional[int] = ..., disable_pruning: _Optional[bool] = ..., judge: _Optional[_Union[_common_pb2.RefusalJudge, _Mapping]] = ..., audit_front: _Optional[bool] = ..., audit_min_new_tokens: _Optional[int] = ..., audit_max_new_tokens: _Optional[int] = ..., warm_start_profile: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "model", "harmful_train", "harmless_train", "harmful_eval", "harmless_eval", "n_trials", "seed", "kl_cap", "max_new_tokens", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HARMFUL_TRAIN_FIELD_NUMBER: _ClassVar[int]
    HARMLESS_TRAIN_FIELD_NUMBER: _ClassVar[int]
    HARMFUL_EVAL_FIELD_NUMBER: _ClassVar[int]
    HARMLESS_EVAL_FIELD_NUMBER: _ClassVar[int]
    N_TRIALS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KL_CAP_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: _common_pb2.ModelSpec
    harmful_train: _common_pb2.PromptSetSpec
    harmless_train: _common_pb2.PromptSetSpec
    harmful_eval: _common_pb2.PromptSetSpec
    harmless_eval: _common_pb2.PromptSetSpec
    n_trials: int
    seed: int
    kl_cap: float
    max_new_tokens: int
    options: JobOptions
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., harmful_train: _Optional[_Union[_common_pb2.PromptSetSpec, _Mapping]] = ..., harmless_train: _Optional[_Union[_common_pb2.PromptSetSpec, _Mapping]] = ..., harmful_eval: _Optional[_Union[_common_pb2.PromptSetSpec, _Mapping]] = ..., harmless_eval: _Optional[_Union[_common_pb2.PromptSetSpec, _Mapping]] = ..., n_trials: _Optional[int] = ..., seed: _Optional[int] = ..., kl_cap: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., options: _Optional[_Union[JobOptions, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "name", "spec", "phase", "error", "created_at", "updated_at", "finished_at", "direction_set_id", "diagnostics", "model", "study_name", "n_trials_complete", "n_trials_failed", "eta_s", "auto_selected_trial", "methods")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    N_TRIALS_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    N_TRIALS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    AUTO_SELECTED_TRIAL_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    spec: JobSpec
    phase: JobPhase
    error: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    direction_set_id: str
    diagnostics: _containers.RepeatedCompositeFieldContainer[_extractor_pb2.LayerDiagnostics]
    model: _common_pb2.ModelInfo
    study_name: str
    n_trials_complete: int
    n_trials_failed: int
    eta_s: float
    auto_selected_trial: int
    methods: _extractor_pb2.MethodSummary
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., phase: _Optional[_Union[JobPhase, str]] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., direction_set_id: _Optional[str] = ..., diagnostics: _Optional[_Iterable[_Union[_extractor_pb2.LayerDiagnostics, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., study_name: _Optional[str] = ..., n_trials_complete: _Optional[int] = ..., n_trials_failed: _Optional[int] = ..., eta_s: _Optional[float] = ..., auto_selected_trial: _Optional[int] = ..., methods: _Optional[_Union[_extractor_pb2.MethodSummary, _Mapping]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    job: Job
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PhaseChanged(_message.Message):
    __slots__ = ("previous", "current", "message")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    previous: JobPhase
    current: JobPhase
    message: str
    def __init__(self, previous: _Optional[_Union[JobPhase, str]] = ..., current: _Optional[_Union[JobPhase, str]] = ..., message: _Optional[str] = ...) -> None: ...

class JobTrialFinished(_message.Message):
    __slots__ = ("trial", "n_complete", "n_trials")
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    N_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    N_TRIALS_FIELD_NUMBER: _ClassVar[int]
    trial: _common_pb2.Trial
    n_complete: int
    n_trials: int
    def __init__(self, trial: _Optional[_Union[_common_pb2.Trial, _Mapping]] = ..., n_complete: _Optional[int] = ..., n_trials: _Optional[int] = ...) -> None: ...

class JobTrialFailed(_message.Message):
    __slots__ = ("number", "evaluator", "error", "will_retry")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    EVALUATOR_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WILL_RETRY_FIELD_NUMBER: _ClassVar[int]
    number: int
    evaluator: str
    error: str
    will_retry: bool
    def __init__(self, number: _Optional[int] = ..., evaluator: _Optional[str] = ..., error: _Optional[str] = ..., will_retry: _Optional[bool] = ...) -> None: ...

class ParetoFront(_message.Message):
    __slots__ = ("trials", "auto_selected_trial", "selection_rule", "kl_cap")
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    AUTO_SELECTED_TRIAL_FIELD_NUMBER: _ClassVar[int]
    SELECTION_RULE_FIELD_NUMBER: _ClassVar[int]
    KL_CAP_FIELD_NUMBER: _ClassVar[int]
    trials: _containers.RepeatedCompositeFieldContainer[_common_pb2.Trial]
    auto_selected_trial: int
    selection_rule: str
    kl_cap: float
    def __init__(self, trials: _Optional[_Iterable[_Union[_common_pb2.Trial, _Mapping]]] = ..., auto_selected_trial: _Optional[int] = ..., selection_rule: _Optional[str] = ..., kl_cap: _Optional[float] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message", "recoverable")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RECOVERABLE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    recoverable: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., recoverable: _Optional[bool] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("sequence", "time", "job_id", "eta_s", "phase_changed", "progress", "trial_finished", "trial_failed", "pareto_front", "error")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    PHASE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FINISHED_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FAILED_FIELD_NUMBER: _ClassVar[int]
    PARETO_FRONT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    job_id: str
    eta_s: float
    phase_changed: PhaseChanged
    progress: _common_pb2.Progress
    trial_finished: JobTrialFinished
    trial_failed: JobTrialFailed
    pareto_front: ParetoFront
    error: JobError
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job_id: _Optional[str] = ..., eta_s: _Optional[float] = ..., phase_changed: _Optional[_Union[PhaseChanged, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., trial_finished: _Optional[_Union[JobTrialFinished, _Mapping]] = ..., trial_failed: _Optional[_Union[JobTrialFailed, _Mapping]] = ..., pareto_front: _Optional[_Union[ParetoFront, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: JobEvent
    def __init__(self, event: _Optional[_Union[JobEvent, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    job: Job
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("phases", "offset", "limit")
    PHASES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    phases: _containers.RepeatedScalarFieldContainer[JobPhase]
    offset: int
    limit: int
    def __init__(self, phases: _Optional[_Iterable[_Union[JobPhase, str]]] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "total", "timings_s", "next_offset")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOBS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    total: int
    timings_s: _containers.ScalarMap[str, float]
    next_offset: int
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., total: _Optional[int] = ..., timings_s: _Optional[_Mapping[str, float]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    job: Job
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ResumeJobRequest(_message.Message):
    __slots__ = ("job_id", "n_trials")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    N_TRIALS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    n_trials: int
    def __init__(self, job_id: _Optional[str] = ..., n_trials: _Optional[int] = ...) -> None: ...

class ResumeJobResponse(_message.Message):
    __slots__ = ("job", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    job: Job
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetParetoFrontRequest(_message.Message):
    __slots__ = ("job_id", "kl_cap")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KL_CAP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kl_cap: float
    def __init__(self, job_id: _Optional[str] = ..., kl_cap: _Optional[float] = ...) -> None: ...

class GetParetoFrontResponse(_message.Message):
    __slots__ = ("front", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FRONT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    front: ParetoFront
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, front: _Optional[_Union[ParetoFront, _Mapping]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GatewayServiceExportModelRequest(_message.Message):
    __slots__ = ("job_id", "trial_number", "path", "format", "hub_repo", "hub_private", "overwrite")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    HUB_REPO_FIELD_NUMBER: _ClassVar[int]
    HUB_PRIVATE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    trial_number: int
    path: str
    format: _common_pb2.ExportFormat
    hub_repo: str
    hub_private: bool
    overwrite: bool
    def __init__(self, job_id: _Optional[str] = ..., trial_number: _Optional[int] = ..., path: _Optional[str] = ..., format: _Optional[_Union[_common_pb2.ExportFormat, str]] = ..., hub_repo: _Optional[str] = ..., hub_private: _Optional[bool] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class GatewayServiceExportModelResponse(_message.Message):
    __slots__ = ("trial_number", "path", "files", "bytes_written", "hub_url", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    HUB_URL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    trial_number: int
    path: str
    files: _containers.RepeatedScalarFieldContainer[str]
    bytes_written: int
    hub_url: str
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, trial_number: _Optional[int] = ..., path: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ..., bytes_written: _Optional[int] = ..., hub_url: _Optional[str] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GatewayServiceChatRequest(_message.Message):
    __slots__ = ("job_id", "trial_number", "messages", "options", "original_model")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    trial_number: int
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    options: _common_pb2.GenerationOptions
    original_model: bool
    def __init__(self, job_id: _Optional[str] = ..., trial_number: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., options: _Optional[_Union[_common_pb2.GenerationOptions, _Mapping]] = ..., original_model: _Optional[bool] = ...) -> None: ...

class GatewayServiceChatResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "n_tokens", "trial_number", "timings_s")
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
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    n_tokens: int
    trial_number: int
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., n_tokens: _Optional[int] = ..., trial_number: _Optional[int] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AuditJobRequest(_message.Message):
    __slots__ = ("job_id", "trial_number", "min_new_tokens", "max_new_tokens", "judge", "prompts")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    trial_number: int
    min_new_tokens: int
    max_new_tokens: int
    judge: _common_pb2.RefusalJudge
    prompts: _common_pb2.PromptSetSpec
    def __init__(self, job_id: _Optional[str] = ..., trial_number: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., judge: _Optional[_Union[_common_pb2.RefusalJudge, _Mapping]] = ..., prompts: _Optional[_Union[_common_pb2.PromptSetSpec, _Mapping]] = ...) -> None: ...

class AuditJobResponse(_message.Message):
    __slots__ = ("trials", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    trials: _containers.RepeatedCompositeFieldContainer[_common_pb2.Trial]
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, trials: _Optional[_Iterable[_Union[_common_pb2.Trial, _Mapping]]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...
