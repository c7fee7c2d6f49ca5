from expert_store._proto.adapmoe.v1 import expert_store_pb2 as _expert_store_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnsureRequest(_message.Message):
    __slots__ = ("model", "refs", "priority", "pin_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PIN_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    refs: _containers.RepeatedCompositeFieldContainer[_expert_store_pb2.ExpertRef]
    priority: _expert_store_pb2.Priority
    pin_s: float
    def __init__(self, model: _Optional[str] = ..., refs: _Optional[_Iterable[_Union[_expert_store_pb2.ExpertRef, _Mapping]]] = ..., priority: _Optional[_Union[_expert_store_pb2.Priority, str]] = ..., pin_s: _Optional[float] = ...) -> None: ...

class BlobLocation(_message.Message):
    __slots__ = ("slot", "offset", "size", "generation")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    slot: int
    offset: int
    size: int
    generation: int
    def __init__(self, slot: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class EnsureResponse(_message.Message):
    __slots__ = ("epoch", "blobs")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    blobs: _containers.RepeatedCompositeFieldContainer[BlobLocation]
    def __init__(self, epoch: _Optional[int] = ..., blobs: _Optional[_Iterable[_Union[BlobLocation, _Mapping]]] = ...) -> None: ...

class DescribeArenaRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ArenaInfo(_message.Message):
    __slots__ = ("path", "epoch", "slots", "slot_bytes", "used", "pinned", "hits", "misses", "publishes", "evictions", "data_loss", "bytes_published", "fill_gbps")
    PATH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PUBLISHES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_LOSS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    FILL_GBPS_FIELD_NUMBER: _ClassVar[int]
    path: str
    epoch: int
    slots: int
    slot_bytes: int
    used: int
    pinned: int
    hits: int
    misses: int
    publishes: int
    evictions: int
    data_loss: int
    bytes_published: int
    fill_gbps: float
    def __init__(self, path: _Optional[str] = ..., epoch: _Optional[int] = ..., slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., used: _Optional[int] = ..., pinned: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., publishes: _Optional[int] = ..., evictions: _Optional[int] = ..., data_loss: _Optional[int] = ..., bytes_published: _Optional[int] = ..., fill_gbps: _Optional[float] = ...) -> None: ...
