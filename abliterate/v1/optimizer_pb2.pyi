import datetime

from abliterate.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StudyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STUDY_STATE_UNSPECIFIED: _ClassVar[StudyState]
    STUDY_STATE_CREATED: _ClassVar[StudyState]
    STUDY_STATE_RUNNING: _ClassVar[StudyState]
    STUDY_STATE_STOPPING: _ClassVar[StudyState]
    STUDY_STATE_STOPPED: _ClassVar[StudyState]
    STUDY_STATE_DONE: _ClassVar[StudyState]
    STUDY_STATE_FAILED: _ClassVar[StudyState]

class EvaluatorState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVALUATOR_STATE_UNSPECIFIED: _ClassVar[EvaluatorState]
    EVALUATOR_STATE_PREPARING: _ClassVar[EvaluatorState]
    EVALUATOR_STATE_IDLE: _ClassVar[EvaluatorState]
    EVALUATOR_STATE_BUSY: _ClassVar[EvaluatorState]
    EVALUATOR_STATE_UNREACHABLE: _ClassVar[EvaluatorState]
STUDY_STATE_UNSPECIFIED: StudyState
STUDY_STATE_CREATED: StudyState
STUDY_STATE_RUNNING: StudyState
STUDY_STATE_STOPPING: StudyState
STUDY_STATE_STOPPED: StudyState
STUDY_STATE_DONE: StudyState
STUDY_STATE_FAILED: StudyState
EVALUATOR_STATE_UNSPECIFIED: EvaluatorState
EVALUATOR_STATE_PREPARING: EvaluatorState
EVALUATOR_STATE_IDLE: EvaluatorState
EVALUATOR_STATE_BUSY: EvaluatorState
EVALUATOR_STATE_UNREACHABLE: EvaluatorState

class FloatRange(_message.Message):
    __slots__ = ("low", "high")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ...) -> None: ...

class ComponentSearchSpace(_message.Message):
    __slots__ = ("max_weight", "max_weight_position", "min_weight_fraction", "min_weight_distance", "clamp_negative_to_zero")
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_POSITION_FIELD_NUMBER: _ClassVar[int]
    MIN_WEIGHT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MIN_WEIGHT_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    CLAMP_NEGATIVE_TO_ZERO_FIELD_NUMBER: _ClassVar[int]
    max_weight: FloatRange
    max_weight_position: FloatRange
    min_weight_fraction: FloatRange
    min_weight_distance: FloatRange
    clamp_negative_to_zero: bool
    def __init__(self, max_weight: _Optional[_Union[FloatRange, _Mapping]] = ..., max_weight_position: _Optional[_Union[FloatRange, _Mapping]] = ..., min_weight_fraction: _Optional[_Union[FloatRange, _Mapping]] = ..., min_weight_distance: _Optional[_Union[FloatRange, _Mapping]] = ..., clamp_negative_to_zero: _Optional[bool] = ...) -> None: ...

class SearchSpace(_message.Message):
    __slots__ = ("direction_scopes", "direction_index", "components", "row_normalizations", "n_startup_trials", "n_ei_candidates", "subspace_weight", "compliance_strength", "top_heads", "head_weight")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ComponentSearchSpace
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ComponentSearchSpace, _Mapping]] = ...) -> None: ...
    DIRECTION_SCOPES_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    ROW_NORMALIZATIONS_FIELD_NUMBER: _ClassVar[int]
    N_STARTUP_TRIALS_FIELD_NUMBER: _ClassVar[int]
    N_EI_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    COMPLIANCE_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    TOP_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    direction_scopes: _containers.RepeatedScalarFieldContainer[_common_pb2.DirectionScope]
    direction_index: FloatRange
    components: _containers.MessageMap[str, ComponentSearchSpace]
    row_normalizations: _containers.RepeatedScalarFieldContainer[_common_pb2.RowNormalization]
    n_startup_trials: int
    n_ei_candidates: int
    subspace_weight: FloatRange
    compliance_strength: FloatRange
    top_heads: FloatRange
    head_weight: FloatRange
    def __init__(self, direction_scopes: _Optional[_Iterable[_Union[_common_pb2.DirectionScope, str]]] = ..., direction_index: _Optional[_Union[FloatRange, _Mapping]] = ..., components: _Optional[_Mapping[str, ComponentSearchSpace]] = ..., row_normalizations: _Optional[_Iterable[_Union[_common_pb2.RowNormalization, str]]] = ..., n_startup_trials: _Optional[int] = ..., n_ei_candidates: _Optional[int] = ..., subspace_weight: _Optional[_Union[FloatRange, _Mapping]] = ..., compliance_strength: _Optional[_Union[FloatRange, _Mapping]] = ..., top_heads: _Optional[_Union[FloatRange, _Mapping]] = ..., head_weight: _Optional[_Union[FloatRange, _Mapping]] = ...) -> None: ...

class CreateStudyRequest(_message.Message):
    __slots__ = ("study_name", "direction_set_id", "directions", "baseline", "search_space", "n_trials", "seed", "evaluator_addresses", "job_settings_json", "warm_start", "trial_timeout_s", "max_trial_retries", "load_if_exists", "disable_pruning")
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SPACE_FIELD_NUMBER: _ClassVar[int]
    N_TRIALS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EVALUATOR_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    JOB_SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    WARM_START_FIELD_NUMBER: _ClassVar[int]
    TRIAL_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_TRIAL_RETRIES_FIELD_NUMBER: _ClassVar[int]
    LOAD_IF_EXISTS_FIELD_NUMBER: _ClassVar[int]
    DISABLE_PRUNING_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    direction_set_id: str
    directions: _common_pb2.TensorBlob
    baseline: _common_pb2.BaselineSpec
    search_space: SearchSpace
    n_trials: int
    seed: int
    evaluator_addresses: _containers.RepeatedScalarFieldContainer[str]
    job_settings_json: str
    warm_start: _containers.RepeatedCompositeFieldContainer[_common_pb2.AblationParams]
    trial_timeout_s: float
    max_trial_retries: int
    load_if_exists: bool
    disable_pruning: bool
    def __init__(self, study_name: _Optional[str] = ..., direction_set_id: _Optional[str] = ..., directions: _Optional[_Union[_common_pb2.TensorBlob, _Mapping]] = ..., baseline: _Optional[_Union[_common_pb2.BaselineSpec, _Mapping]] = ..., search_space: _Optional[_Union[SearchSpace, _Mapping]] = ..., n_trials: _Optional[int] = ..., seed: _Optional[int] = ..., evaluator_addresses: _Optional[_Iterable[str]] = ..., job_settings_json: _Optional[str] = ..., warm_start: _Optional[_Iterable[_Union[_common_pb2.AblationParams, _Mapping]]] = ..., trial_timeout_s: _Optional[float] = ..., max_trial_retries: _Optional[int] = ..., load_if_exists: _Optional[bool] = ..., disable_pruning: _Optional[bool] = ...) -> None: ...

class CreateStudyResponse(_message.Message):
    __slots__ = ("study", "created", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STUDY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    study: StudyInfo
    created: bool
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, study: _Optional[_Union[StudyInfo, _Mapping]] = ..., created: _Optional[bool] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluatorInfo(_message.Message):
    __slots__ = ("address", "state", "current_trial", "n_trials_done", "last_error")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TRIAL_FIELD_NUMBER: _ClassVar[int]
    N_TRIALS_DONE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    address: str
    state: EvaluatorState
    current_trial: int
    n_trials_done: int
    last_error: str
    def __init__(self, address: _Optional[str] = ..., state: _Optional[_Union[EvaluatorState, str]] = ..., current_trial: _Optional[int] = ..., n_trials_done: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class StudyInfo(_message.Message):
    __slots__ = ("study_name", "state", "direction_set_id", "n_trials", "n_complete", "n_running", "n_failed", "n_waiting", "seed", "search_space", "baseline", "evaluators", "pareto_front", "job_settings_json", "created_at", "eta_s", "n_pruned")
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    N_TRIALS_FIELD_NUMBER: _ClassVar[int]
    N_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    N_RUNNING_FIELD_NUMBER: _ClassVar[int]
    N_FAILED_FIELD_NUMBER: _ClassVar[int]
    N_WAITING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SPACE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    EVALUATORS_FIELD_NUMBER: _ClassVar[int]
    PARETO_FRONT_FIELD_NUMBER: _ClassVar[int]
    JOB_SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    N_PRUNED_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    state: StudyState
    direction_set_id: str
    n_trials: int
    n_complete: int
    n_running: int
    n_failed: int
    n_waiting: int
    seed: int
    search_space: SearchSpace
    baseline: _common_pb2.BaselineSpec
    evaluators: _containers.RepeatedCompositeFieldContainer[EvaluatorInfo]
    pareto_front: _containers.RepeatedScalarFieldContainer[int]
    job_settings_json: str
    created_at: _timestamp_pb2.Timestamp
    eta_s: float
    n_pruned: int
    def __init__(self, study_name: _Optional[str] = ..., state: _Optional[_Union[StudyState, str]] = ..., direction_set_id: _Optional[str] = ..., n_trials: _Optional[int] = ..., n_complete: _Optional[int] = ..., n_running: _Optional[int] = ..., n_failed: _Optional[int] = ..., n_waiting: _Optional[int] = ..., seed: _Optional[int] = ..., search_space: _Optional[_Union[SearchSpace, _Mapping]] = ..., baseline: _Optional[_Union[_common_pb2.BaselineSpec, _Mapping]] = ..., evaluators: _Optional[_Iterable[_Union[EvaluatorInfo, _Mapping]]] = ..., pareto_front: _Optional[_Iterable[int]] = ..., job_settings_json: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., eta_s: _Optional[float] = ..., n_pruned: _Optional[int] = ...) -> None: ...

class RunStudyRequest(_message.Message):
    __slots__ = ("study_name", "include_history")
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    include_history: bool
    def __init__(self, study_name: _Optional[str] = ..., include_history: _Optional[bool] = ...) -> None: ...

class TrialFinished(_message.Message):
    __slots__ = ("trial", "pareto_front", "n_complete", "n_trials", "eta_s", "front_trials", "n_failed", "n_pruned")
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    PARETO_FRONT_FIELD_NUMBER: _ClassVar[int]
    N_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    N_TRIALS_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    FRONT_TRIALS_FIELD_NUMBER: _ClassVar[int]
    N_FAILED_FIELD_NUMBER: _ClassVar[int]
    N_PRUNED_FIELD_NUMBER: _ClassVar[int]
    trial: _common_pb2.Trial
    pareto_front: _containers.RepeatedScalarFieldContainer[int]
    n_complete: int
    n_trials: int
    eta_s: float
    front_trials: _containers.RepeatedCompositeFieldContainer[_common_pb2.Trial]
    n_failed: int
    n_pruned: int
    def __init__(self, trial: _Optional[_Union[_common_pb2.Trial, _Mapping]] = ..., pareto_front: _Optional[_Iterable[int]] = ..., n_complete: _Optional[int] = ..., n_trials: _Optional[int] = ..., eta_s: _Optional[float] = ..., front_trials: _Optional[_Iterable[_Union[_common_pb2.Trial, _Mapping]]] = ..., n_failed: _Optional[int] = ..., n_pruned: _Optional[int] = ...) -> None: ...

class TrialFailed(_message.Message):
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

class TrialRetried(_message.Message):
    __slots__ = ("failed_number", "new_number", "attempt")
    FAILED_NUMBER_FIELD_NUMBER: _ClassVar[int]
    NEW_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    failed_number: int
    new_number: int
    attempt: int
    def __init__(self, failed_number: _Optional[int] = ..., new_number: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class StudyDone(_message.Message):
    __slots__ = ("state", "n_complete", "n_failed", "pareto_front", "message", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    N_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    N_FAILED_FIELD_NUMBER: _ClassVar[int]
    PARETO_FRONT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    state: StudyState
    n_complete: int
    n_failed: int
    pareto_front: _containers.RepeatedScalarFieldContainer[int]
    message: str
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, state: _Optional[_Union[StudyState, str]] = ..., n_complete: _Optional[int] = ..., n_failed: _Optional[int] = ..., pareto_front: _Optional[_Iterable[int]] = ..., message: _Optional[str] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TrialEvent(_message.Message):
    __slots__ = ("time", "trial_finished", "trial_failed", "trial_retried", "done", "progress")
    TIME_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FINISHED_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FAILED_FIELD_NUMBER: _ClassVar[int]
    TRIAL_RETRIED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    trial_finished: TrialFinished
    trial_failed: TrialFailed
    trial_retried: TrialRetried
    done: StudyDone
    progress: _common_pb2.Progress
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trial_finished: _Optional[_Union[TrialFinished, _Mapping]] = ..., trial_failed: _Optional[_Union[TrialFailed, _Mapping]] = ..., trial_retried: _Optional[_Union[TrialRetried, _Mapping]] = ..., done: _Optional[_Union[StudyDone, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ...) -> None: ...

class RunStudyResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: TrialEvent
    def __init__(self, event: _Optional[_Union[TrialEvent, _Mapping]] = ...) -> None: ...

class GetStudyRequest(_message.Message):
    __slots__ = ("study_name",)
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    def __init__(self, study_name: _Optional[str] = ...) -> None: ...

class GetStudyResponse(_message.Message):
    __slots__ = ("study", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STUDY_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    study: StudyInfo
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, study: _Optional[_Union[StudyInfo, _Mapping]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListTrialsRequest(_message.Message):
    __slots__ = ("study_name", "states", "pareto_only", "offset", "limit")
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    PARETO_ONLY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    states: _containers.RepeatedScalarFieldContainer[_common_pb2.TrialState]
    pareto_only: bool
    offset: int
    limit: int
    def __init__(self, study_name: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_common_pb2.TrialState, str]]] = ..., pareto_only: _Optional[bool] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListTrialsResponse(_message.Message):
    __slots__ = ("trials", "pareto_front", "total", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    PARETO_FRONT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    trials: _containers.RepeatedCompositeFieldContainer[_common_pb2.Trial]
    pareto_front: _containers.RepeatedScalarFieldContainer[int]
    total: int
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, trials: _Optional[_Iterable[_Union[_common_pb2.Trial, _Mapping]]] = ..., pareto_front: _Optional[_Iterable[int]] = ..., total: _Optional[int] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StopStudyRequest(_message.Message):
    __slots__ = ("study_name", "abandon_running")
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    ABANDON_RUNNING_FIELD_NUMBER: _ClassVar[int]
    study_name: str
    abandon_running: bool
    def __init__(self, study_name: _Optional[str] = ..., abandon_running: _Optional[bool] = ...) -> None: ...

class StopStudyResponse(_message.Message):
    __slots__ = ("study", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STUDY_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    study: StudyInfo
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, study: _Optional[_Union[StudyInfo, _Mapping]] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RegisterEvaluatorRequest(_message.Message):
    __slots__ = ("address", "study_name")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    address: str
    study_name: str
    def __init__(self, address: _Optional[str] = ..., study_name: _Optional[str] = ...) -> None: ...

class RegisterEvaluatorResponse(_message.Message):
    __slots__ = ("evaluator", "model", "added", "timings_s")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EVALUATOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    evaluator: EvaluatorInfo
    model: _common_pb2.ModelInfo
    added: bool
    timings_s: _containers.ScalarMap[str, float]
    def __init__(self, evaluator: _Optional[_Union[EvaluatorInfo, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., added: _Optional[bool] = ..., timings_s: _Optional[_Mapping[str, float]] = ...) -> None: ...
