"""The plain logic inside the gRPC servicer: chunking (the tiers' BufferReader), the stream limiter, PutBlob's
assembler, status mapping, --listen parsing (no server needed)."""

from __future__ import annotations

import grpc
import pytest

from expert_store import format as blob_format
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted
from expert_store.tiers import BufferReader
from expert_store.server import (
    MAX_CHUNK_BYTES,
    PutAssembler,
    ServerConfig,
    StreamLimiter,
    split_host_port,
    status_for,
)


@pytest.mark.parametrize("size,offset", [(0, 0), (1, 0), (1 << 20, 0), ((1 << 20) + 1, 0), (3_000_000, 1_234_567),
                                         (3_000_000, 3_000_000)])
def test_chunks_cover_the_rest_of_the_blob_in_order(size, offset):
    blob = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pieces = list(BufferReader(blob, offset, MAX_CHUNK_BYTES, "whole"))
    assert pieces, "at least one chunk, even when nothing is left"
    assert b"".join(d for _, d, _ in pieces) == blob[offset:]
    assert [last for _, _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    pos = offset
    for off, data, _ in pieces:
        assert off == pos and len(data) <= MAX_CHUNK_BYTES
        pos += len(data)


def test_chunks_reject_an_offset_past_the_end():
    with pytest.raises(InvalidArgument):
        list(BufferReader(b"abc", 4, MAX_CHUNK_BYTES, "whole"))


def test_stream_limiter_reserves_slots_for_demand():
    lim = StreamLimiter(4, prefetch_share=0.5)
    assert lim.try_acquire(prefetch=True) and lim.try_acquire(prefetch=True)
    assert not lim.try_acquire(prefetch=True)  # prefetch capped at 2
    assert lim.try_acquire() and lim.try_acquire()
    assert not lim.try_acquire()
    lim.release()
    assert lim.try_acquire() and lim.active == 4


def _header(**kw):
    base = dict(model="m", kind="expert", layer=0, expert=0, precision="bf16", total_size=10, xxh3="0" * 32)
    base.update(kw)
    return pb.PutBlobHeader(**base)


def test_put_assembler_checks_header_and_size():
    with pytest.raises(InvalidArgument):
        PutAssembler(_header(model="../x"), 1 << 20)
    with pytest.raises(InvalidArgument):
        PutAssembler(_header(kind="weights"), 1 << 20)
    with pytest.raises(ResourceExhausted):
        PutAssembler(_header(total_size=2 << 20), 1 << 20)
    up = PutAssembler(_header(), 1 << 20)
    up.add(b"12345")
    with pytest.raises(InvalidArgument):
        up.finish()  # short
    up.add(b"67890")
    assert bytes(up.finish()) == b"1234567890"
    with pytest.raises(InvalidArgument):
        up.add(b"!")  # more than announced


def test_status_mapping():
    assert status_for(NotFound("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(DataLoss("x"))[0] == grpc.StatusCode.DATA_LOSS
    assert status_for(blob_format.BlobError("bad"))[0] == grpc.StatusCode.DATA_LOSS
    assert status_for(ValueError("bad"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(RuntimeError("bug"))[0] == grpc.StatusCode.INTERNAL


def test_listen_and_config_validation():
    assert split_host_port("127.0.0.1:0") == ("127.0.0.1", 0)
    assert split_host_port("[::]:50051") == ("::", 50051)
    for bad in ("50051", "host:", ":1", "h:70000"):
        with pytest.raises(ValueError):
            split_host_port(bad)
    with pytest.raises(ValueError):
        ServerConfig(chunk_bytes=1024)
    with pytest.raises(ValueError):
        ServerConfig(tls_cert=b"x")
    with pytest.raises(ValueError):
        ServerConfig(token="")
