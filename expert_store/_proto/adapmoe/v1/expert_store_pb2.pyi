from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEMAND: _ClassVar[Priority]
    PREFETCH: _ClassVar[Priority]
DEMAND: Priority
PREFETCH: Priority

class ExpertRef(_message.Message):
    __slots__ = ("layer", "expert", "precision", "offset")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    precision: str
    offset: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., precision: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class BlobInfo(_message.Message):
    __slots__ = ("layer", "expert", "precision", "size", "xxh3")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    XXH3_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    precision: str
    size: int
    xxh3: str
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., precision: _Optional[str] = ..., size: _Optional[int] = ..., xxh3: _Optional[str] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("model", "config_json", "tokenizer_json", "num_layers", "num_experts", "precisions", "blobs", "dense_size", "dense_xxh3", "profile_json", "tokenizer_config_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    DENSE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DENSE_XXH3_FIELD_NUMBER: _ClassVar[int]
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    config_json: str
    tokenizer_json: bytes
    num_layers: int
    num_experts: int
    precisions: _containers.RepeatedScalarFieldContainer[str]
    blobs: _containers.RepeatedCompositeFieldContainer[BlobInfo]
    dense_size: int
    dense_xxh3: str
    profile_json: str
    tokenizer_config_json: str
    def __init__(self, model: _Optional[str] = ..., config_json: _Optional[str] = ..., tokenizer_json: _Optional[bytes] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., precisions: _Optional[_Iterable[str]] = ..., blobs: _Optional[_Iterable[_Union[BlobInfo, _Mapping]]] = ..., dense_size: _Optional[int] = ..., dense_xxh3: _Optional[str] = ..., profile_json: _Optional[str] = ..., tokenizer_config_json: _Optional[str] = ...) -> None: ...

class FetchExpertsRequest(_message.Message):
    __slots__ = ("model", "refs", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    refs: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    priority: Priority
    def __init__(self, model: _Optional[str] = ..., refs: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class FetchDenseRequest(_message.Message):
    __slots__ = ("model", "offset")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    model: str
    offset: int
    def __init__(self, model: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("index", "offset", "total_size", "data", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    total_size: int
    data: bytes
    last: bool
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class PutBlobHeader(_message.Message):
    __slots__ = ("model", "kind", "layer", "expert", "precision", "total_size", "xxh3")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    XXH3_FIELD_NUMBER: _ClassVar[int]
    model: str
    kind: str
    layer: int
    expert: int
    precision: str
    total_size: int
    xxh3: str
    def __init__(self, model: _Optional[str] = ..., kind: _Optional[str] = ..., layer: _Optional[int] = ..., expert: _Optional[int] = ..., precision: _Optional[str] = ..., total_size: _Optional[int] = ..., xxh3: _Optional[str] = ...) -> None: ...

class PutBlobChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutBlobHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PutBlobHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutBlobResponse(_message.Message):
    __slots__ = ("key", "size")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    key: str
    size: int
    def __init__(self, key: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStat(_message.Message):
    __slots__ = ("name", "hits", "misses", "bytes_read", "bytes_written", "mean_read_latency_ms", "errors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    MEAN_READ_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    hits: int
    misses: int
    bytes_read: int
    bytes_written: int
    mean_read_latency_ms: float
    errors: int
    def __init__(self, name: _Optional[str] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., mean_read_latency_ms: _Optional[float] = ..., errors: _Optional[int] = ...) -> None: ...

class StatResponse(_message.Message):
    __slots__ = ("tiers", "models", "active_streams")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStat]
    models: _containers.RepeatedScalarFieldContainer[str]
    active_streams: int
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStat, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ..., active_streams: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("model", "ref", "dense")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    model: str
    ref: ExpertRef
    dense: bool
    def __init__(self, model: _Optional[str] = ..., ref: _Optional[_Union[ExpertRef, _Mapping]] = ..., dense: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("key", "good", "dropped", "detail")
    KEY_FIELD_NUMBER: _ClassVar[int]
    GOOD_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    key: str
    good: bool
    dropped: bool
    detail: str
    def __init__(self, key: _Optional[str] = ..., good: _Optional[bool] = ..., dropped: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...
