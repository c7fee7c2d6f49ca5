"""The BlobChunk codec the store's streaming reads use instead of protobuf objects
(server.encode_blob_chunk, client.decode_blob_chunk): byte for byte what protobuf writes, and
read the way protobuf reads it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store.client import decode_blob_chunk
from expert_store.server import encode_blob_chunk

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


def fields(c) -> tuple:
    return c.index, c.offset, c.total_size, bytes(c.data), c.last


@settings(max_examples=300, deadline=None)
@given(index=U32, offset=U64, total=U64, data=st.binary(max_size=3000), last=st.booleans())
def test_encode_is_protobufs_serialization(index, offset, total, data, last):
    want = pb.BlobChunk(index=index, offset=offset, total_size=total, data=data, last=last).SerializeToString()
    assert encode_blob_chunk((index, offset, total, data, last)) == want
    assert encode_blob_chunk((index, offset, total, memoryview(data), last)) == want
    assert encode_blob_chunk(pb.BlobChunk(index=index, offset=offset, total_size=total, data=data, last=last)) == want
    got = decode_blob_chunk(want)
    assert fields(got) == fields(pb.BlobChunk.FromString(want))
    assert isinstance(got.data, memoryview)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.one_of(
    st.tuples(st.sampled_from([1, 2, 3, 5, 9, 100]), st.just(0), st.integers(0, 2**64 - 1)),
    st.tuples(st.sampled_from([4, 7, 1]), st.just(2), st.binary(max_size=40)),
    st.tuples(st.sampled_from([6, 2]), st.just(1), st.binary(min_size=8, max_size=8)),
    st.tuples(st.sampled_from([8, 3]), st.just(5), st.binary(min_size=4, max_size=4)),
), max_size=12))
def test_decode_reads_what_protobuf_reads(parts):
    """Any field order, repeated scalars (last wins), unknown fields and known fields with
    another wire type (skipped), uint32 truncation: the same values protobuf parses."""
    msg = b"".join(_field(n, w, _varint(v) if w == 0 else (_varint(len(v)) + v if w == 2 else v))
                   for n, w, v in parts)
    assert fields(decode_blob_chunk(msg)) == fields(pb.BlobChunk.FromString(msg))


@pytest.mark.parametrize("msg", [
    b"\x08",                        # varint cut short
    b"\x22\x05abc",                 # data longer than the message
    b"\x22",                        # length missing
    b"\x11\x00\x00",                # fixed64 cut short
    b"\x00\x01",                    # field number 0
    b"\x08" + b"\xff" * 11 + b"\x01",  # varint longer than 10 bytes
])
def test_malformed_chunks_raise(msg):
    with pytest.raises(ValueError):
        decode_blob_chunk(msg)
    with pytest.raises(Exception):  # protobuf refuses them too
        pb.BlobChunk.FromString(msg)
