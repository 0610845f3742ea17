from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    REDUCTION_MEAN: _ClassVar[Reduction]
    REDUCTION_SUM: _ClassVar[Reduction]
    REDUCTION_NONE: _ClassVar[Reduction]
    REDUCTION_WEIGHTED_MEAN: _ClassVar[Reduction]

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_EAGER: _ClassVar[Backend]
    BACKEND_TORCHSCRIPT: _ClassVar[Backend]
    BACKEND_ONNX: _ClassVar[Backend]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
REDUCTION_UNSPECIFIED: Reduction
REDUCTION_MEAN: Reduction
REDUCTION_SUM: Reduction
REDUCTION_NONE: Reduction
REDUCTION_WEIGHTED_MEAN: Reduction
BACKEND_UNSPECIFIED: Backend
BACKEND_EAGER: Backend
BACKEND_TORCHSCRIPT: Backend
BACKEND_ONNX: Backend

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Param(_message.Message):
    __slots__ = ("double_value", "int_value", "bool_value", "string_value")
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    double_value: float
    int_value: int
    bool_value: bool
    string_value: str
    def __init__(self, double_value: _Optional[float] = ..., int_value: _Optional[int] = ..., bool_value: _Optional[bool] = ..., string_value: _Optional[str] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("loss", "params", "predictions", "targets", "weights", "class_weights", "pos_weight", "reduction", "backend", "return_per_sample", "request_id", "labels", "tensor_params", "group_ids", "return_statistics", "return_per_class")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Param
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Param, _Mapping]] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TensorParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    POS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RETURN_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARAMS_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    loss: str
    params: _containers.MessageMap[str, Param]
    predictions: Tensor
    targets: Tensor
    weights: Tensor
    class_weights: Tensor
    pos_weight: Tensor
    reduction: Reduction
    backend: Backend
    return_per_sample: bool
    request_id: str
    labels: _containers.ScalarMap[str, str]
    tensor_params: _containers.MessageMap[str, Tensor]
    group_ids: Tensor
    return_statistics: bool
    return_per_class: bool
    def __init__(self, loss: _Optional[str] = ..., params: _Optional[_Mapping[str, Param]] = ..., predictions: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., class_weights: _Optional[_Union[Tensor, _Mapping]] = ..., pos_weight: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., backend: _Optional[_Union[Backend, str]] = ..., return_per_sample: _Optional[bool] = ..., request_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., tensor_params: _Optional[_Mapping[str, Tensor]] = ..., group_ids: _Optional[_Union[Tensor, _Mapping]] = ..., return_statistics: _Optional[bool] = ..., return_per_class: _Optional[bool] = ...) -> None: ...

class NamedParam(_message.Message):
    __slots__ = ("name", "value", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: Param
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., value: _Optional[_Union[Param, _Mapping]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Statistics(_message.Message):
    __slots__ = ("version", "loss", "params", "reduction", "layout", "totals", "group_ids", "group_totals", "num_batches", "class_layout", "class_totals")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_TOTALS_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CLASS_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CLASS_TOTALS_FIELD_NUMBER: _ClassVar[int]
    version: int
    loss: str
    params: _containers.RepeatedCompositeFieldContainer[NamedParam]
    reduction: Reduction
    layout: _containers.RepeatedScalarFieldContainer[str]
    totals: Tensor
    group_ids: Tensor
    group_totals: Tensor
    num_batches: int
    class_layout: _containers.RepeatedScalarFieldContainer[str]
    class_totals: Tensor
    def __init__(self, version: _Optional[int] = ..., loss: _Optional[str] = ..., params: _Optional[_Iterable[_Union[NamedParam, _Mapping]]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., layout: _Optional[_Iterable[str]] = ..., totals: _Optional[_Union[Tensor, _Mapping]] = ..., group_ids: _Optional[_Union[Tensor, _Mapping]] = ..., group_totals: _Optional[_Union[Tensor, _Mapping]] = ..., num_batches: _Optional[int] = ..., class_layout: _Optional[_Iterable[str]] = ..., class_totals: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("loss", "values", "per_sample", "weight_sum", "num_elements", "backend", "device", "request_id", "denominator", "group_ids", "group_losses", "statistics", "class_losses", "class_scores")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    NUM_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_LOSSES_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    CLASS_LOSSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_SCORES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    values: Tensor
    per_sample: Tensor
    weight_sum: float
    num_elements: int
    backend: str
    device: str
    request_id: str
    denominator: float
    group_ids: Tensor
    group_losses: Tensor
    statistics: Statistics
    class_losses: Tensor
    class_scores: Tensor
    def __init__(self, loss: _Optional[float] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., per_sample: _Optional[_Union[Tensor, _Mapping]] = ..., weight_sum: _Optional[float] = ..., num_elements: _Optional[int] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., request_id: _Optional[str] = ..., denominator: _Optional[float] = ..., group_ids: _Optional[_Union[Tensor, _Mapping]] = ..., group_losses: _Optional[_Union[Tensor, _Mapping]] = ..., statistics: _Optional[_Union[Statistics, _Mapping]] = ..., class_losses: _Optional[_Union[Tensor, _Mapping]] = ..., class_scores: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("loss", "weight_sum", "num_elements", "num_batches", "backend", "device", "denominator", "group_ids", "group_losses", "statistics", "class_losses", "class_scores")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    NUM_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_LOSSES_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    CLASS_LOSSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_SCORES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    weight_sum: float
    num_elements: int
    num_batches: int
    backend: str
    device: str
    denominator: float
    group_ids: Tensor
    group_losses: Tensor
    statistics: Statistics
    class_losses: Tensor
    class_scores: Tensor
    def __init__(self, loss: _Optional[float] = ..., weight_sum: _Optional[float] = ..., num_elements: _Optional[int] = ..., num_batches: _Optional[int] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., denominator: _Optional[float] = ..., group_ids: _Optional[_Union[Tensor, _Mapping]] = ..., group_losses: _Optional[_Union[Tensor, _Mapping]] = ..., statistics: _Optional[_Union[Statistics, _Mapping]] = ..., class_losses: _Optional[_Union[Tensor, _Mapping]] = ..., class_scores: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class MergeStatisticsRequest(_message.Message):
    __slots__ = ("statistics",)
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    statistics: _containers.RepeatedCompositeFieldContainer[Statistics]
    def __init__(self, statistics: _Optional[_Iterable[_Union[Statistics, _Mapping]]] = ...) -> None: ...

class ListLossesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ParamInfo(_message.Message):
    __slots__ = ("name", "kind", "default_value", "range", "doc", "choices", "request_field")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    default_value: Param
    range: str
    doc: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    request_field: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., default_value: _Optional[_Union[Param, _Mapping]] = ..., range: _Optional[str] = ..., doc: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ..., request_field: _Optional[str] = ...) -> None: ...

class LossInfo(_message.Message):
    __slots__ = ("name", "summary", "predictions", "targets", "prediction_shape", "target_shape", "params", "backends", "reference", "family")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    predictions: str
    targets: str
    prediction_shape: str
    target_shape: str
    params: _containers.RepeatedCompositeFieldContainer[ParamInfo]
    backends: _containers.RepeatedScalarFieldContainer[Backend]
    reference: str
    family: str
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., predictions: _Optional[str] = ..., targets: _Optional[str] = ..., prediction_shape: _Optional[str] = ..., target_shape: _Optional[str] = ..., params: _Optional[_Iterable[_Union[ParamInfo, _Mapping]]] = ..., backends: _Optional[_Iterable[_Union[Backend, str]]] = ..., reference: _Optional[str] = ..., family: _Optional[str] = ...) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses",)
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossInfo]
    def __init__(self, losses: _Optional[_Iterable[_Union[LossInfo, _Mapping]]] = ...) -> None: ...
