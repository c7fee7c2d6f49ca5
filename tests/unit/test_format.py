"""Blob format (bytes only): round trips, codec choice, caller buffers, malformed blobs, fuzz."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expert_store import format as fmt
from expert_store.format import (
    MAGIC,
    BlobError,
    QuantLayout,
    RawTensor,
    blob_checksum,
    check_blob,
    decode_raw,
    dense_key,
    encode_blob,
    expert_key,
    file_key,
    read_header,
    validate_model_name,
)


def _bf16_like(n_elems: int, seed: int = 0) -> bytes:
    """Bytes that look like bf16 weights: small gaussian values (compressible exponent plane)."""
    rng = random.Random(seed)
    out = bytearray()
    for _ in range(n_elems):
        f32 = struct.unpack("<I", struct.pack("<f", rng.gauss(0.0, 0.02)))[0]
        out += struct.pack("<H", f32 >> 16)
    return bytes(out)


def _bf16_blob(rows=8, cols=16, n=3, seed=0, **kw):
    tensors, raw = [], bytearray()
    for i in range(n):
        data = _bf16_like(rows * cols, seed + i)
        tensors.append(RawTensor(f"w{i + 1}", (rows, cols), "bfloat16", len(raw), len(data)))
        raw += data
    return encode_blob("tiny-model", 3, 5, "bf16", tensors, bytes(raw), **kw), bytes(raw), tensors


def _int4_blob(rows=4, cols=10, group=4):
    # values: rows*ceil(cols/2) bytes; scales: rows*ceil(cols/group) fp16, 16-aligned
    nvals = rows * ((cols + 1) // 2)
    ngroups = -(-cols // group)
    soff = (nvals + 15) // 16 * 16
    q = QuantLayout(bits=4, group_size=group, scales_offset=soff, scales_nbytes=rows * ngroups * 2)
    t = RawTensor("w1", (rows, cols), "uint8", 0, nvals, q)
    raw = bytes(range(nvals)) + b"\0" * (soff - nvals) + bytes(range(rows * ngroups * 2))
    return encode_blob("m", 0, 0, "int4", [t], raw), raw


def test_keys_and_names():
    assert expert_key("Mixtral-8x7B", 3, 7, "int4") == "Mixtral-8x7B/experts/L003/E007.int4.blob"
    assert dense_key("m") == "m/dense.safetensors"
    assert file_key("m", "manifest.json") == "m/manifest.json"
    for bad in ["", "../x", "a/b", "a..b", ".hidden", "-x", "x" * 129, "a b", None]:
        with pytest.raises(ValueError):
            validate_model_name(bad)
    assert validate_model_name("a" * 128) == "a" * 128
    with pytest.raises(ValueError):
        expert_key("m", 0, 0, "fp8")
    with pytest.raises(ValueError):
        expert_key("m", -1, 0, "bf16")
    with pytest.raises(ValueError):
        file_key("m", "../../etc/passwd")


def test_bf16_round_trip_uses_lz4_on_exponent_plane():
    blob, raw, tensors = _bf16_blob(rows=32, cols=64)
    header, off = read_header(blob)
    assert header.codec == "bf16-planes+lz4"
    assert len(blob) < len(raw)  # the exponent plane compressed
    assert (header.model, header.layer, header.expert, header.precision) == ("tiny-model", 3, 5, "bf16")
    assert header.tensors == tuple(tensors)
    assert header.xxh3 == xxhash.xxh3_128_hexdigest(raw)
    assert blob[:8] == MAGIC and off == 12 + struct.unpack_from("<I", blob, 8)[0]
    h2, view = decode_raw(blob)
    assert bytes(view) == raw and h2 == header


def test_decode_into_caller_buffer():
    blob, raw, _ = _bf16_blob(rows=16, cols=32)
    out = bytearray(len(raw) + 100)
    out[len(raw) :] = b"\xee" * 100
    header, view = decode_raw(blob, out)
    assert bytes(out[: len(raw)]) == raw
    assert bytes(out[len(raw) :]) == b"\xee" * 100  # nothing past raw_size is touched
    view[0] = view[0] ^ 1  # the returned view is the caller's buffer
    assert out[0] == raw[0] ^ 1
    # also a codec-none blob, and a memoryview over a bigger buffer
    blob4, raw4 = _int4_blob()
    big = bytearray(len(raw4) + 7)
    decode_raw(blob4, memoryview(big))
    assert bytes(big[: len(raw4)]) == raw4
    with pytest.raises(ValueError):
        decode_raw(blob, bytearray(len(raw) - 1))
    with pytest.raises(ValueError):
        decode_raw(blob, bytes(len(raw)))  # read-only


def test_incompressible_bf16_is_stored_plain():
    rnd = random.Random(1).randbytes(4096)
    t = RawTensor("w1", (32, 64), "bfloat16", 0, 4096)
    blob = encode_blob("m", 0, 0, "bf16", [t], rnd)
    assert read_header(blob)[0].codec == "none"
    assert bytes(decode_raw(blob)[1]) == rnd


def test_codec_threshold_is_three_percent():
    blob, raw, tensors = _bf16_blob(rows=32, cols=64)
    hi = raw[1::2]
    import lz4.block

    saving = 1 - len(lz4.block.compress(hi, store_size=False)) / len(hi)
    assert 0.03 < saving < 0.99
    assert read_header(encode_blob("m", 0, 0, "bf16", tensors, raw, min_saving=saving - 0.001))[0].codec != "none"
    assert read_header(encode_blob("m", 0, 0, "bf16", tensors, raw, min_saving=saving + 0.001))[0].codec == "none"


@pytest.fixture(params=["numpy", "pure-bytes"])
def plane_impl(request, monkeypatch):
    """The byte-plane shuffle with numpy and without it (a store-only install)."""
    if request.param == "pure-bytes":
        monkeypatch.setattr(fmt, "_NUMPY", [None])
    return request.param


@pytest.mark.parametrize("codec", ["none", "bf16-planes", "bf16-planes+lz4"])
def test_every_codec_round_trips(codec, plane_impl):
    blob, raw, _ = _bf16_blob(codec=codec)
    assert read_header(blob)[0].codec == codec
    assert bytes(decode_raw(blob)[1]) == raw
    out = bytearray(len(raw))
    decode_raw(blob, out)
    assert bytes(out) == raw


def test_int4_header_layout():
    blob, raw = _int4_blob(rows=4, cols=10, group=4)
    header, _ = read_header(blob)
    (t,) = header.tensors
    assert t.quant.bits == 4 and t.n_groups == 3 and t.nbytes == 20
    assert bytes(decode_raw(blob)[1]) == raw


def test_encode_rejects_inconsistent_descriptions():
    raw = bytes(64)
    with pytest.raises(ValueError):  # nbytes does not match shape
        encode_blob("m", 0, 0, "bf16", [RawTensor("w1", (4, 4), "bfloat16", 0, 30)], raw)
    with pytest.raises(ValueError):  # past the end of the payload
        encode_blob("m", 0, 0, "bf16", [RawTensor("w1", (8, 8), "bfloat16", 0, 128)], raw)
    with pytest.raises(ValueError):  # overlapping
        encode_blob(
            "m",
            0,
            0,
            "bf16",
            [RawTensor("w1", (2, 4), "bfloat16", 0, 16), RawTensor("w2", (2, 4), "bfloat16", 8, 16)],
            raw,
        )
    with pytest.raises(ValueError):  # wrong dtype for the precision
        encode_blob("m", 0, 0, "int8", [RawTensor("w1", (4, 4), "bfloat16", 0, 32)], raw)
    with pytest.raises(ValueError):
        encode_blob("bad/name", 0, 0, "bf16", [RawTensor("w1", (4, 4), "bfloat16", 0, 32)], raw)


# --- malformed blobs -------------------------------------------------------------------------


def _reseal(prefix_and_header: bytes, payload: bytes) -> bytes:
    """Build a blob whose seal is right, so the structural checks are what must catch it."""
    blob = bytearray(prefix_and_header + payload)
    hlen = struct.unpack_from("<I", blob, 8)[0]
    pos = 12 + hlen - 8
    blob[pos : pos + 8] = fmt._seal_of(memoryview(blob), pos)
    return bytes(blob)


def _with_header(blob: bytes, mutate) -> bytes:
    header, off = read_header(blob)
    h = msgpack.unpackb(blob[12:off], raw=False)
    mutate(h)
    h["seal"] = h.pop("seal")  # keep it last
    hb = msgpack.packb(h, use_bin_type=True)
    return _reseal(MAGIC + struct.pack("<I", len(hb)) + hb, blob[off:])


def _lie_raw_size(h):
    h["raw_size"] += 2


def _lie_tensor_nbytes(h):
    h["tensors"][0]["nbytes"] += 2


def _lie_offset(h):
    h["tensors"][1]["offset"] = 1


def _lie_segment(h):
    h["segments"][-1]["nbytes"] -= 1


def _lie_codec(h):
    h["codec"] = "zstd"


def _lie_xxh3(h):
    h["xxh3"] = "0" * 32


def _lie_precision(h):
    h["precision"] = "int8"


def _lie_model(h):
    h["model"] = "../etc"


def _extra_key(h):
    h["extra"] = 1


@pytest.mark.parametrize(
    "mutate",
    [_lie_raw_size, _lie_tensor_nbytes, _lie_offset, _lie_segment, _lie_codec, _lie_xxh3, _lie_precision,
     _lie_model, _extra_key],
)
def test_header_lies_are_blob_errors(mutate):
    blob, _, _ = _bf16_blob()
    bad = _with_header(blob, mutate)
    with pytest.raises(BlobError):
        decode_raw(bad)
    with pytest.raises(BlobError):
        decode_raw(bad, bytearray(1 << 16))


def test_specific_malformations():
    blob, raw, _ = _bf16_blob()
    off = read_header(blob)[1]
    cases = {
        "bad magic": b"XMOEBLOB" + blob[8:],
        "empty": b"",
        "prefix only": blob[:12],
        "truncated header": blob[: off - 3],
        "truncated payload": blob[:-1],
        "trailing bytes": blob + b"\0",
        "huge header length": blob[:8] + struct.pack("<I", 1 << 30) + blob[12:],
        "flipped payload byte": blob[:-1] + bytes([blob[-1] ^ 0x10]),
        "not bytes": 12345,
    }
    for what, bad in cases.items():
        with pytest.raises(BlobError):
            decode_raw(bad)
            pytest.fail(what)
    # a payload whose seal is fixed up but whose raw checksum is wrong is still caught
    h, off = read_header(blob)
    lo_plane = bytearray(blob[off:])
    lo_plane[0] ^= 1
    with pytest.raises(BlobError, match="checksum"):
        decode_raw(_reseal(blob[:off], bytes(lo_plane)))
    # lz4 garbage with a valid seal
    garbage = blob[: off + len(raw) // 2] + b"\xff" * (len(blob) - off - len(raw) // 2)
    with pytest.raises(BlobError):
        decode_raw(_reseal(blob[:off], garbage[off:]))


def test_read_header_works_on_a_prefix_and_check_blob_on_the_whole():
    blob, _, _ = _bf16_blob()
    header, off = read_header(blob[: read_header(blob)[1]])
    assert header.blob_size == len(blob)
    assert check_blob(blob) == header
    with pytest.raises(BlobError):
        check_blob(blob[:off])


def test_blob_checksum_is_xxh3_128_of_the_blob():
    blob, _, _ = _bf16_blob()
    assert blob_checksum(blob) == xxhash.xxh3_128_hexdigest(blob)
    assert blob_checksum(memoryview(blob)) == blob_checksum(blob)


# --- fuzz --------------------------------------------------------------------------------------

_BLOBS = [_bf16_blob(rows=4, cols=8)[0], _bf16_blob(rows=4, cols=8, codec="none")[0],
          _bf16_blob(rows=4, cols=8, codec="bf16-planes")[0], _int4_blob()[0]]


def _decode_both_ways(data: bytes) -> None:
    decode_raw(data)
    decode_raw(data, bytearray(1 << 14))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes_only_blob_error(data):
    for candidate in (data, MAGIC + data, MAGIC + struct.pack("<I", len(data)) + data):
        with pytest.raises(BlobError):
            _decode_both_ways(candidate)
        with pytest.raises(BlobError):
            check_blob(candidate)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(_BLOBS) - 1), cut=st.integers(0, 10_000))
def test_fuzz_truncated_only_blob_error(which, cut):
    blob = _BLOBS[which]
    cut = cut % len(blob)
    with pytest.raises(BlobError):
        _decode_both_ways(blob[:cut])
    try:
        read_header(blob[:cut])  # a prefix may or may not hold the whole header
    except BlobError:
        pass


@settings(max_examples=500, deadline=None)
@given(which=st.integers(0, len(_BLOBS) - 1), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_fuzz_any_bit_flip_is_detected(which, pos, bit):
    blob = bytearray(_BLOBS[which])
    pos %= len(blob)
    blob[pos] ^= 1 << bit
    with pytest.raises(BlobError):
        _decode_both_ways(bytes(blob))
    with pytest.raises(BlobError):
        check_blob(bytes(blob))


@settings(max_examples=200, deadline=None)
@given(which=st.integers(0, len(_BLOBS) - 1), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
                                                              min_size=1, max_size=8),
       cut=st.integers(0, 10_000), extra=st.binary(max_size=16))
def test_fuzz_mixed_damage_only_blob_error(which, flips, cut, extra):
    blob = bytearray(_BLOBS[which])
    for pos, x in flips:
        blob[pos % len(blob)] ^= x
    damaged = bytes(blob[: len(blob) - cut % 4]) + extra
    if damaged == _BLOBS[which]:
        return
    with pytest.raises(BlobError):
        _decode_both_ways(damaged)


def test_every_single_bit_flip_of_a_small_blob_is_detected():
    blob = _bf16_blob(rows=2, cols=8, n=1)[0]
    for pos in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(BlobError):
                decode_raw(bytes(bad))


def test_transcode_raw_keeps_the_payload_and_seals_the_copy():
    """A coded bf16 blob rewritten with codec none: same header fields and raw payload (its
    checksum too), a valid new seal; a damaged input is a BlobError; a short buffer ValueError."""
    import numpy as np

    rng = np.random.default_rng(14)
    raw = (rng.normal(size=4096).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    tensors = [fmt.RawTensor("w1", (64, 64), "bfloat16", 0, 8192)]
    blob = fmt.encode_blob("m", 2, 3, "bf16", tensors, raw)
    header, _ = fmt.read_header(blob)
    assert header.codec == "bf16-planes+lz4"
    out = bytearray(fmt.raw_blob_size(header) + 16)
    n = fmt.transcode_raw(blob, out)
    assert n == fmt.raw_blob_size(header)
    h2, got = fmt.decode_raw(bytes(out[:n]))
    assert h2.codec == "none" and bytes(got) == raw and h2.xxh3 == header.xxh3
    assert (h2.model, h2.layer, h2.expert, h2.precision, h2.tensors) == ("m", 2, 3, "bf16", header.tensors)
    with pytest.raises(ValueError):
        fmt.transcode_raw(blob, bytearray(n - 1))
    bad = bytearray(blob)
    bad[-10] ^= 0x10
    with pytest.raises(fmt.BlobError):
        fmt.transcode_raw(bytes(bad), out)
