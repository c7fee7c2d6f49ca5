"""ArenaPublisher's raw write: a coded bf16 blob is transcoded into its slot when the raw form
fits, copied as it came when it does not, and a blob whose seal is right but whose payload is
damaged is refused (BlobError), never copied."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from expert_store import format as fmt
from expert_store.arena_publisher import ArenaPublisher


def _coded_blob() -> tuple[bytes, bytes]:
    rng = np.random.default_rng(7)
    raw = (rng.normal(size=4096).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    blob = fmt.encode_blob("m", 1, 2, "bf16", [fmt.RawTensor("w1", (64, 64), "bfloat16", 0, 8192)], raw)
    assert fmt.read_header(blob)[0].codec == "bf16-planes+lz4"
    return blob, raw


def _resealed(blob: bytes, payload: bytes) -> bytes:
    """`blob`'s header over `payload`, sealed again: only the payload checksum can catch it."""
    _, off = fmt.read_header(blob)
    out = bytearray(blob[:off] + payload)
    hlen = struct.unpack_from("<I", out, 8)[0]
    pos = 12 + hlen - 8
    out[pos:pos + 8] = fmt._seal_of(memoryview(out), pos)
    return bytes(out)


def test_raw_write_transcodes_when_the_raw_blob_fits():
    blob, raw = _coded_blob()
    slot = bytearray(fmt.raw_blob_size(fmt.read_header(blob)[0]))
    n = ArenaPublisher._write_raw(memoryview(blob), memoryview(slot), len(blob))
    header, got = fmt.decode_raw(bytes(slot[:n]))
    assert header.codec == "none" and bytes(got) == raw


def test_raw_write_copies_the_blob_as_it_came_when_the_raw_form_does_not_fit():
    blob, raw = _coded_blob()
    slot = bytearray(len(blob) + 8)
    assert len(slot) < fmt.raw_blob_size(fmt.read_header(blob)[0])
    n = ArenaPublisher._write_raw(memoryview(blob), memoryview(slot), len(blob))
    assert n == len(blob) and bytes(slot[:n]) == blob
    assert bytes(fmt.decode_raw(bytes(slot[:n]))[1]) == raw


def test_raw_write_refuses_a_damaged_payload_under_a_good_seal():
    blob, _ = _coded_blob()
    _, off = fmt.read_header(blob)
    payload = bytearray(blob[off:])
    payload[len(payload) // 2] ^= 0x01
    bad = _resealed(blob, bytes(payload))
    fmt.check_blob(bad)                       # the seal alone passes it
    slot = bytearray(fmt.raw_blob_size(fmt.read_header(bad)[0]))
    with pytest.raises(fmt.BlobError):
        ArenaPublisher._write_raw(memoryview(bad), memoryview(slot), len(bad))
    assert bytes(slot[:len(bad)]) != bad          # the damaged blob was not copied as it came
