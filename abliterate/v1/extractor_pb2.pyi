from abliterate.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExtractDirectionsRequest(_message.Message):
    __slots__ = ("harmful", "harmless", "options", "model")
    HARMFUL_FIELD_NUMBER: _ClassVar[int]
    HARMLESS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    harmful: _common_pb2.PromptSetSpec
    harmless: _common_pb2.PromptSetSpec
    options: _common_pb2.ExtractionOptions
    model: _common_pb2.ModelSpec
    def __init__(self, harmful: _Optional[_Union[_common_pb2.PromptSetSpec, _Mapping]] = ..., harmless: _Optional[_Union[_common_pb2.PromptSetSpec, _Mapping]] = ..., options: _Optional[_Union[_common_pb2.ExtractionOptions, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ...) -> None: ...

class LayerDiagnostics(_message.Message):
    __slots__ = ("residual_index", "mean_diff_norm", "means_cosine", "separation", "sacred_overlap", "cosine_to_next", "subspace_energy", "probe_accuracy", "compliance_cosine", "calibration_factor", "helpfulness_angle_deg")
    RESIDUAL_INDEX_FIELD_NUMBER: _ClassVar[int]
    MEAN_DIFF_NORM_FIELD_NUMBER: _ClassVar[int]
    MEANS_COSINE_FIELD_NUMBER: _ClassVar[int]
    SEPARATION_FIELD_NUMBER: _ClassVar[int]
    SACRED_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    COSINE_TO_NEXT_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_ENERGY_FIELD_NUMBER: _ClassVar[int]
    PROBE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    COMPLIANCE_COSINE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FACTOR_FIELD_NUMBER: _ClassVar[int]
    HELPFULNESS_ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    residual_index: int
    mean_diff_norm: float
    means_cosine: float
    separation: float
    sacred_overlap: float
    cosine_to_next: float
    subspace_energy: _containers.RepeatedScalarFieldContainer[float]
    probe_accuracy: float
    compliance_cosine: float
    calibration_factor: float
    helpfulness_angle_deg: float
    def __init__(self, residual_index: _Optional[int] = ..., mean_diff_norm: _Optional[float] = ..., means_cosine: _Optional[float] = ..., separation: _Optional[float] = ..., sacred_overlap: _Optional[float] = ..., cosine_to_next: _Optional[float] = ..., subspace_energy: _Optional[_Iterable[float]] = ..., probe_accuracy: _Optional[float] = ..., compliance_cosine: _Optional[float] = ..., calibration_factor: _Optional[float] = ..., helpfulness_angle_deg: _Optional[float] = ...) -> None: ...

class MethodSummary(_message.Message):
    __slots__ = ("cones", "top_heads", "labels")
    CONES_FIELD_NUMBER: _ClassVar[int]
    TOP_HEADS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    cones: ConeReport
    top_heads: _containers.RepeatedCompositeFieldContainer[HeadScore]
    labels: ReplyLabels
    def __init__(self, cones: _Optional[_Union[ConeReport, _Mapping]] = ..., top_heads: _Optional[_Iterable[_Union[HeadScore, _Mapping]]] = ..., labels: _Optional[_Union[ReplyLabels, _Mapping]] = ...) -> None: ...

class ConeReport(_message.Message):
    __slots__ = ("layer", "silhouette", "sizes", "labels")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SILHOUETTE_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    silhouette: float
    sizes: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., silhouette: _Optional[float] = ..., sizes: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class HeadScore(_message.Message):
    __slots__ = ("layer", "head", "score")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    score: float
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class ReplyLabels(_message.Message):
    __slots__ = ("harmful_refused", "harmful_complied", "harmless_refused", "harmless_complied")
    HARMFUL_REFUSED_FIELD_NUMBER: _ClassVar[int]
    HARMFUL_COMPLIED_FIELD_NUMBER: _ClassVar[int]
    HARMLESS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    HARMLESS_COMPLIED_FIELD_NUMBER: _ClassVar[int]
    harmful_refused: int
    harmful_complied: int
    harmless_refused: int
    harmless_complied: int
    def __init__(self, harmful_refused: _Optional[int] = ..., harmful_complied: _Optional[int] = ..., harmless_refused: _Optional[int] = ..., harmless_complied: _Optional[int] = ...) -> None: ...

class DirectionSetResult(_message.Message):
    __slots__ = ("directions", "direction_set_id", "layers", "n_harmful", "n_harmless", "batch_size", "timings_s", "cones", "top_heads", "labels")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_SET_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_HARMFUL_FIELD_NUMBER: _ClassVar[int]
    N_HARMLESS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    CONES_FIELD_NUMBER: _ClassVar[int]
    TOP_HEADS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    directions: _common_pb2.TensorBlob
    direction_set_id: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerDiagnostics]
    n_harmful: int
    n_harmless: int
    batch_size: int
    timings_s: _containers.ScalarMap[str, float]
    cones: ConeReport
    top_heads: _containers.RepeatedCompositeFieldContainer[HeadScore]
    labels: ReplyLabels
    def __init__(self, directions: _Optional[_Union[_common_pb2.TensorBlob, _Mapping]] = ..., direction_set_id: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerDiagnostics, _Mapping]]] = ..., n_harmful: _Optional[int] = ..., n_harmless: _Optional[int] = ..., batch_size: _Optional[int] = ..., timings_s: _Optional[_Mapping[str, float]] = ..., cones: _Optional[_Union[ConeReport, _Mapping]] = ..., top_heads: _Optional[_Iterable[_Union[HeadScore, _Mapping]]] = ..., labels: _Optional[_Union[ReplyLabels, _Mapping]] = ...) -> None: ...

class ExtractDirectionsResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: DirectionSetResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[DirectionSetResult, _Mapping]] = ...) -> None: ...
