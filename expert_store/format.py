"""Blob format: one expert at one precision, as bytes (no torch here).

Layout::

    MAGIC (b"AMOEBLOB") | u32 little-endian header length | msgpack header | payload

The *raw payload* is the concatenation of every tensor (and, for int8/int4, its fp16 scales)
exactly as the decoder wants them in memory; each region starts at a 16-byte aligned offset so
views of another dtype can be taken over it without copies.  The *payload* is the raw payload
after the codec:

- ``"none"``: payload == raw payload.
- ``"bf16-planes"``: raw bf16 bytes split into two byte planes, ``lo`` (byte 0 of every
  element: low mantissa bits) then ``hi`` (byte 1: sign and exponent).
- ``"bf16-planes+lz4"``: as above, with the ``hi`` plane compressed by lz4 (block format).
  :func:`encode_blob` applies it only when it shrinks that plane by at least 3 %.

The header (a msgpack dict) describes every tensor, the codec and its ``segments``, the
xxh3-128 of the raw payload (``"xxh3"``) and, as its last entry, ``"seal"``: 8 bytes holding the
xxh3-64 of the whole blob computed with the seal bytes zeroed.  The seal makes any change to
any byte of the blob detectable without decompressing (:func:`check_blob`, what the store runs
before serving); :func:`decode_raw` verifies the seal and, after undoing the codec, the xxh3 of
the raw payload.  Every malformed blob raises :class:`BlobError` and nothing else.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import lz4.block
import msgpack
import xxhash

_NUMPY: list[Any] = []


def _numpy() -> Any:
    """numpy if installed (imported on first use: the store's serving path never needs it).
    It makes the byte-plane shuffle ~10x faster; without it a pure-bytes path is used."""
    if not _NUMPY:
        try:
            import numpy
        except ImportError:  # pragma: no cover - a store-only install
            numpy = None
        _NUMPY.append(numpy)
    return _NUMPY[0]

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "PRECISIONS",
    "CODECS",
    "DTYPE_ITEMSIZE",
    "ALIGN",
    "MIN_CODEC_SAVING",
    "MODEL_NAME_RE",
    "BlobError",
    "QuantLayout",
    "RawTensor",
    "Segment",
    "BlobHeader",
    "read_header",
    "check_blob",
    "decode_raw",
    "encode_blob",
    "blob_checksum",
    "payload_checksum",
    "validate_model_name",
    "expert_key",
    "dense_key",
    "file_key",
    "MODEL_FILES",
]

MAGIC = b"AMOEBLOB"
FORMAT_VERSION = 1
PRECISIONS = ("bf16", "int8", "int4")
CODECS = ("none", "bf16-planes", "bf16-planes+lz4")
DTYPE_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1, "uint8": 1}
# storage dtype of the weight tensors at each precision
PRECISION_DTYPE = {"bf16": "bfloat16", "int8": "int8", "int4": "uint8"}
PRECISION_BITS = {"bf16": None, "int8": 8, "int4": 4}
ALIGN = 16  # every region of the raw payload starts at a multiple of this
MIN_CODEC_SAVING = 0.03  # a codec that saves less than this fraction is not applied
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 64
MAX_DIMS = 8
# lz4 cannot expand data by more than ~255x; a header claiming more is lying (and a memory bomb)
_LZ4_MAX_RATIO = 256
_PREFIX = struct.Struct("<8sI")
_SEAL_BIN_PREFIX = b"\xc4\x08"  # msgpack bin8 of length 8
_SEAL_LEN = 8

MODEL_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_MODEL_NAME = re.compile(MODEL_NAME_RE)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json", "profile.json")


class BlobError(ValueError):
    """The one error for a malformed blob: bad magic, truncated, inconsistent header,
    checksum mismatch, undecodable msgpack or codec data."""


# ---------------------------------------------------------------------------------------------
# names and keys


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ValueError (no "/", no "..")."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name) or ".." in name:
        raise ValueError(f"invalid model name {name!r}: must match {MODEL_NAME_RE} and not contain '..'")
    return name


def _check_index(what: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 999:
        raise ValueError(f"{what} must be an int in [0, 999], got {value!r}")


def expert_key(model: str, layer: int, expert: int, precision: str) -> str:
    validate_model_name(model)
    _check_index("layer", layer)
    _check_index("expert", expert)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return f"{model}/experts/L{layer:03d}/E{expert:03d}.{precision}.blob"


def dense_key(model: str) -> str:
    validate_model_name(model)
    return f"{model}/dense.safetensors"


def file_key(model: str, name: str) -> str:
    validate_model_name(model)
    if name not in MODEL_FILES:
        raise ValueError(f"unknown model file {name!r}; expected one of {MODEL_FILES}")
    return f"{model}/{name}"


# ---------------------------------------------------------------------------------------------
# header types


@dataclass(frozen=True)
class QuantLayout:
    """Where a quantized tensor's scales live: fp16, shape ``[out, ceil(in / group_size)]``."""

    bits: int
    group_size: int
    scales_offset: int
    scales_nbytes: int
    scales_dtype: str = "float16"
    scale_layout: str = "[out, in/group]"

    def to_msg(self) -> dict[str, Any]:
        return {
            "group_size": self.group_size,
            "scales_offset": self.scales_offset,
            "scales_nbytes": self.scales_nbytes,
            "scales_dtype": self.scales_dtype,
            "scale_layout": self.scale_layout,
            "bits": self.bits,
        }


@dataclass(frozen=True)
class RawTensor:
    """One tensor in the raw payload.

    ``shape`` is the logical shape ``[out, in]``; ``dtype`` the storage dtype: ``bfloat16``
    (bf16), ``int8`` (int8, one value per byte) or ``uint8`` (int4, two values per byte, low
    nibble = even column, value + 8).  ``nbytes`` is the stored size of the values (not the
    scales, which ``quant`` locates).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int
    quant: QuantLayout | None = None

    @property
    def n_groups(self) -> int:
        if self.quant is None:
            return 0
        return math.ceil(self.shape[-1] / self.quant.group_size)

    def expected_nbytes(self) -> int:
        if self.quant is None:
            return math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]
        rows, cols = self.shape
        if self.quant.bits == 4:
            return rows * ((cols + 1) // 2)
        return rows * cols

    def to_msg(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "quant": None if self.quant is None else self.quant.to_msg(),
        }


@dataclass(frozen=True)
class Segment:
    """One piece of the encoded payload, in payload order."""

    name: str  # "raw" | "lo" | "hi"
    codec: str  # "none" | "lz4"
    nbytes: int  # bytes in the payload
    raw_nbytes: int  # bytes once decoded

    def to_msg(self) -> dict[str, Any]:
        return {"name": self.name, "codec": self.codec, "nbytes": self.nbytes, "raw_nbytes": self.raw_nbytes}


@dataclass(frozen=True)
class BlobHeader:
    version: int
    model: str
    layer: int
    expert: int
    precision: str
    tensors: tuple[RawTensor, ...]
    raw_size: int
    codec: str
    segments: tuple[Segment, ...]
    xxh3: str  # xxh3-128 hex of the raw payload
    payload_offset: int  # where the payload starts in the blob
    payload_size: int  # encoded payload bytes

    @property
    def blob_size(self) -> int:
        return self.payload_offset + self.payload_size

    def tensor(self, name: str) -> RawTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)


# ---------------------------------------------------------------------------------------------
# helpers


def _as_bytes_view(data: Any) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError as e:
        raise BlobError(f"blob must be bytes-like, got {type(data).__name__}") from e
    if view.ndim != 1 or view.format not in ("B", "b", "c") or not view.contiguous:
        try:
            view = view.cast("B")
        except TypeError as e:
            raise BlobError("blob must be a contiguous bytes-like object") from e
    elif view.format != "B":
        view = view.cast("B")
    return view


def payload_checksum(raw: Any) -> str:
    """xxh3-128 hex of a raw payload (what the header's ``xxh3`` holds)."""
    return xxhash.xxh3_128_hexdigest(raw)


def blob_checksum(blob: Any) -> str:
    """xxh3-128 hex of the whole blob (what manifests record)."""
    return xxhash.xxh3_128_hexdigest(blob)


def _seal_of(view: memoryview, seal_pos: int) -> bytes:
    h = xxhash.xxh3_64()
    h.update(view[:seal_pos])
    h.update(b"\0" * _SEAL_LEN)
    h.update(view[seal_pos + _SEAL_LEN :])
    return h.digest()


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _req(cond: bool, msg: str) -> None:
    if not cond:
        raise BlobError(msg)


# ---------------------------------------------------------------------------------------------
# header parsing and validation


def _parse_quant(q: Any, tname: str) -> QuantLayout:
    _req(isinstance(q, dict), f"tensor {tname}: quant must be a map")
    keys = {"group_size", "scales_offset", "scales_nbytes", "scales_dtype", "scale_layout", "bits"}
    _req(set(q) == keys, f"tensor {tname}: quant keys {sorted(map(str, q))} != {sorted(keys)}")
    _req(q["bits"] in (4, 8) and not isinstance(q["bits"], bool), f"tensor {tname}: bits must be 4 or 8")
    _req(_is_uint(q["group_size"]) and q["group_size"] >= 2, f"tensor {tname}: bad group_size")
    _req(_is_uint(q["scales_offset"]) and _is_uint(q["scales_nbytes"]), f"tensor {tname}: bad scales region")
    _req(q["scales_dtype"] == "float16", f"tensor {tname}: scales_dtype must be float16")
    _req(q["scale_layout"] == "[out, in/group]", f"tensor {tname}: unknown scale_layout")
    return QuantLayout(
        bits=q["bits"],
        group_size=q["group_size"],
        scales_offset=q["scales_offset"],
        scales_nbytes=q["scales_nbytes"],
    )


def _parse_tensor(t: Any, precision: str) -> RawTensor:
    _req(isinstance(t, dict), "tensor entry must be a map")
    keys = {"name", "shape", "dtype", "offset", "nbytes", "quant"}
    _req(set(t) == keys, f"tensor keys {sorted(map(str, t))} != {sorted(keys)}")
    name = t["name"]
    _req(isinstance(name, str) and 0 < len(name) <= 64, "tensor name must be a short string")
    shape = t["shape"]
    _req(isinstance(shape, list) and 1 <= len(shape) <= MAX_DIMS, f"tensor {name}: bad shape")
    _req(all(_is_uint(d) and d > 0 for d in shape), f"tensor {name}: shape must be positive ints")
    dtype = t["dtype"]
    _req(dtype == PRECISION_DTYPE[precision], f"tensor {name}: dtype {dtype!r} invalid at {precision}")
    _req(_is_uint(t["offset"]) and _is_uint(t["nbytes"]), f"tensor {name}: bad offset/nbytes")
    quant = None
    if PRECISION_BITS[precision] is None:
        _req(t["quant"] is None, f"tensor {name}: {precision} tensors are not quantized")
    else:
        quant = _parse_quant(t["quant"], name)
        _req(quant.bits == PRECISION_BITS[precision], f"tensor {name}: bits do not match {precision}")
        _req(len(shape) == 2, f"tensor {name}: quantized tensors are 2-D")
    rt = RawTensor(name=name, shape=tuple(shape), dtype=dtype, offset=t["offset"], nbytes=t["nbytes"], quant=quant)
    _req(rt.nbytes == rt.expected_nbytes(), f"tensor {name}: nbytes {rt.nbytes} != {rt.expected_nbytes()} for shape")
    if quant is not None:
        _req(
            quant.scales_nbytes == shape[0] * rt.n_groups * 2,
            f"tensor {name}: scales_nbytes {quant.scales_nbytes} != {shape[0] * rt.n_groups * 2}",
        )
    return rt


def _check_regions(tensors: tuple[RawTensor, ...], raw_size: int) -> None:
    regions = []
    for t in tensors:
        regions.append((t.offset, t.nbytes, t.name, DTYPE_ITEMSIZE[t.dtype]))
        if t.quant is not None:
            regions.append((t.quant.scales_offset, t.quant.scales_nbytes, t.name + ".scales", 2))
    regions.sort()
    end = 0
    for off, n, what, itemsize in regions:
        _req(off % itemsize == 0, f"{what}: offset {off} not aligned to its dtype")
        _req(off >= end, f"{what}: overlaps the previous region")
        end = off + n
        _req(end <= raw_size, f"{what}: ends at {end}, past raw_size {raw_size}")


def _parse_segments(segs: Any, codec: str, raw_size: int) -> tuple[Segment, ...]:
    _req(isinstance(segs, list) and 1 <= len(segs) <= 2, "segments must be a list of 1-2 entries")
    out = []
    for s in segs:
        _req(isinstance(s, dict) and set(s) == {"name", "codec", "nbytes", "raw_nbytes"}, "bad segment entry")
        _req(_is_uint(s["nbytes"]) and _is_uint(s["raw_nbytes"]), "bad segment sizes")
        _req(s["codec"] in ("none", "lz4"), f"unknown segment codec {s['codec']!r}")
        out.append(Segment(name=s["name"], codec=s["codec"], nbytes=s["nbytes"], raw_nbytes=s["raw_nbytes"]))
    if codec == "none":
        _req(len(out) == 1 and out[0].name == "raw" and out[0].codec == "none", "codec none needs one raw segment")
        _req(out[0].nbytes == out[0].raw_nbytes == raw_size, "raw segment size != raw_size")
    else:
        _req(raw_size % 2 == 0, "bf16 planes need an even raw_size")
        half = raw_size // 2
        _req(len(out) == 2 and [s.name for s in out] == ["lo", "hi"], "bf16 planes need segments lo, hi")
        lo, hi = out
        _req(lo.codec == "none" and lo.nbytes == lo.raw_nbytes == half, "lo plane size != raw_size/2")
        _req(hi.raw_nbytes == half, "hi plane raw size != raw_size/2")
        if codec == "bf16-planes":
            _req(hi.codec == "none" and hi.nbytes == half, "hi plane must be stored plain")
        else:
            _req(hi.codec == "lz4", "hi plane must be lz4")
            _req(0 < hi.nbytes and half <= _LZ4_MAX_RATIO * hi.nbytes + 64, "hi plane sizes impossible for lz4")
    return tuple(out)


def read_header(blob: Any) -> tuple[BlobHeader, int]:
    """Parse and validate the header; return ``(header, payload_offset)``.

    Needs only the bytes up to the end of the header (a prefix of the blob is fine), so it
    does not verify the seal or the payload: :func:`check_blob` and :func:`decode_raw` do.
    """
    view = _as_bytes_view(blob)
    _req(len(view) >= _PREFIX.size, f"blob truncated: {len(view)} bytes, prefix needs {_PREFIX.size}")
    magic, hlen = _PREFIX.unpack_from(view, 0)
    _req(magic == MAGIC, f"bad magic {bytes(magic)!r}")
    _req(0 < hlen <= MAX_HEADER_BYTES, f"header length {hlen} out of range")
    payload_offset = _PREFIX.size + hlen
    _req(len(view) >= payload_offset, f"blob truncated inside the header ({len(view)} < {payload_offset})")
    hbytes = view[_PREFIX.size : payload_offset]
    _req(bytes(hbytes[-_SEAL_LEN - 2 : -_SEAL_LEN]) == _SEAL_BIN_PREFIX, "header does not end with its seal")
    try:
        h = msgpack.unpackb(hbytes, raw=False, strict_map_key=True, use_list=True, max_bin_len=_SEAL_LEN)
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, FormatError, ...)
        raise BlobError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    _req(isinstance(h, dict), "header must be a map")
    keys = ["v", "model", "layer", "expert", "precision", "tensors", "raw_size", "codec", "segments", "xxh3", "seal"]
    _req(list(h) == keys, f"header keys {list(map(str, h))} != {keys}")
    _req(h["v"] == FORMAT_VERSION and not isinstance(h["v"], bool), f"unsupported blob version {h['v']!r}")
    try:
        validate_model_name(h["model"])
    except ValueError as e:
        raise BlobError(str(e)) from None
    _req(_is_uint(h["layer"]) and _is_uint(h["expert"]), "layer/expert must be non-negative ints")
    precision = h["precision"]
    _req(precision in PRECISIONS, f"unknown precision {precision!r}")
    _req(_is_uint(h["raw_size"]), "raw_size must be a non-negative int")
    raw_size = h["raw_size"]
    codec = h["codec"]
    _req(codec in CODECS, f"unknown codec {codec!r}")
    _req(codec == "none" or precision == "bf16", f"codec {codec} only applies to bf16 blobs")
    xx = h["xxh3"]
    _req(isinstance(xx, str) and len(xx) == 32 and all(c in "0123456789abcdef" for c in xx), "bad xxh3 field")
    _req(isinstance(h["seal"], bytes) and len(h["seal"]) == _SEAL_LEN, "bad seal field")
    tlist = h["tensors"]
    _req(isinstance(tlist, list) and 1 <= len(tlist) <= MAX_TENSORS, "tensors must be a non-empty list")
    tensors = tuple(_parse_tensor(t, precision) for t in tlist)
    _req(len({t.name for t in tensors}) == len(tensors), "duplicate tensor names")
    _check_regions(tensors, raw_size)
    segments = _parse_segments(h["segments"], codec, raw_size)
    header = BlobHeader(
        version=h["v"],
        model=h["model"],
        layer=h["layer"],
        expert=h["expert"],
        precision=precision,
        tensors=tensors,
        raw_size=raw_size,
        codec=codec,
        segments=segments,
        xxh3=xx,
        payload_offset=payload_offset,
        payload_size=sum(s.nbytes for s in segments),
    )
    return header, payload_offset


def check_blob(blob: Any) -> BlobHeader:
    """Cheap full integrity check without decompressing: header valid, exact length, seal
    (xxh3-64 over every byte) matches.  What the store runs before serving a blob."""
    view = _as_bytes_view(blob)
    header, payload_offset = read_header(view)
    _req(
        len(view) == header.blob_size,
        f"blob is {len(view)} bytes but its header says {header.blob_size}",
    )
    seal_pos = payload_offset - _SEAL_LEN
    _req(_seal_of(view, seal_pos) == bytes(view[seal_pos:payload_offset]), "blob seal mismatch (corrupted)")
    return header


def _writable_out(out: Any, raw_size: int) -> memoryview:
    view = memoryview(out)
    if view.readonly:
        raise ValueError("out buffer is read-only")
    if not view.contiguous:
        raise ValueError("out buffer must be contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if len(view) < raw_size:
        raise ValueError(f"out buffer has {len(view)} bytes, the raw payload needs {raw_size}")
    return view[:raw_size]


def decode_raw(blob: Any, out: Any = None) -> tuple[BlobHeader, memoryview]:
    """Verify the blob and reassemble its raw payload.

    With ``out`` (any writable contiguous buffer of at least ``raw_size`` bytes, e.g. a
    pinned host tensor's memory), the raw payload is written to ``out[:raw_size]`` and the
    returned view points there; without it, a fresh buffer is used (for codec ``none`` the
    view is a read-only slice of ``blob`` itself).  Raises :class:`BlobError` for any malformed
    or corrupted blob (the xxh3 of the raw payload and the whole-blob seal are both checked),
    ValueError for an unusable ``out``.  After a BlobError, ``out`` may hold partial data.
    """
    view = _as_bytes_view(blob)
    header = check_blob(view)
    off = header.payload_offset
    payload = view[off : off + header.payload_size]
    dst = _writable_out(out, header.raw_size) if out is not None else None
    if header.codec == "none":
        if dst is None:
            raw = payload
        else:
            dst[:] = payload
            raw = dst
    else:
        half = header.raw_size // 2
        lo_seg, hi_seg = header.segments
        lo = payload[:half]
        hi_enc = payload[half : half + hi_seg.nbytes]
        if hi_seg.codec == "lz4":
            try:
                hi = lz4.block.decompress(hi_enc, uncompressed_size=half)
            except Exception as e:  # lz4.block.LZ4BlockError and friends
                raise BlobError(f"hi plane does not decompress: {e}") from None
            _req(len(hi) == half, f"hi plane decompressed to {len(hi)} bytes, expected {half}")
        else:
            hi = hi_enc
        if dst is None:
            dst = memoryview(bytearray(header.raw_size))
        _join_planes(lo, hi, dst)
        raw = dst
    _req(payload_checksum(raw) == header.xxh3, "raw payload checksum mismatch")
    return header, raw


# ---------------------------------------------------------------------------------------------
# encoding


def _split_planes(raw: memoryview) -> tuple[bytes, bytes]:
    """bf16 bytes -> (lo plane, hi plane): byte 0 and byte 1 of every little-endian element."""
    np = _numpy()
    if np is not None:
        pairs = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2)
        return pairs[:, 0].tobytes(), pairs[:, 1].tobytes()
    whole = bytes(raw)
    return whole[0::2], whole[1::2]  # extended slicing of bytes runs in C


def _join_planes(lo: Any, hi: Any, dst: memoryview) -> None:
    np = _numpy()
    if np is not None:
        pairs = np.frombuffer(dst, dtype=np.uint8).reshape(-1, 2)
        pairs[:, 0] = np.frombuffer(lo, dtype=np.uint8)
        pairs[:, 1] = np.frombuffer(hi, dtype=np.uint8)
        return
    tmp = bytearray(len(dst))  # bytearray slice assignment is C-fast; memoryview's is not
    tmp[0::2] = lo
    tmp[1::2] = hi
    dst[:] = tmp


def _encode_payload(raw: memoryview, codec: str, min_saving: float) -> tuple[str, list[Segment], list[Any]]:
    n = len(raw)
    if codec in ("auto", "bf16-planes", "bf16-planes+lz4"):
        lo, hi = _split_planes(raw)
        half = n // 2
        if codec == "bf16-planes":
            return codec, [Segment("lo", "none", half, half), Segment("hi", "none", half, half)], [lo, hi]
        hi_c = lz4.block.compress(hi, store_size=False)
        if codec == "bf16-planes+lz4" or len(hi_c) <= (1.0 - min_saving) * half:
            return (
                "bf16-planes+lz4",
                [Segment("lo", "none", half, half), Segment("hi", "lz4", len(hi_c), half)],
                [lo, hi_c],
            )
    return "none", [Segment("raw", "none", n, n)], [raw]


def _raw_header(header: "BlobHeader") -> bytes:
    """The msgpack header of `header`'s blob stored with codec ``none`` (seal zeroed)."""
    n = header.raw_size
    hbytes = msgpack.packb({
        "v": FORMAT_VERSION,
        "model": header.model,
        "layer": header.layer,
        "expert": header.expert,
        "precision": header.precision,
        "tensors": [t.to_msg() for t in header.tensors],
        "raw_size": n,
        "codec": "none",
        "segments": [Segment("raw", "none", n, n).to_msg()],
        "xxh3": header.xxh3,
        "seal": b"\0" * _SEAL_LEN,
    }, use_bin_type=True)
    assert hbytes.endswith(_SEAL_BIN_PREFIX + b"\0" * _SEAL_LEN)
    return hbytes


def raw_blob_size(header: "BlobHeader") -> int:
    """Bytes of `header`'s blob stored with codec ``none`` (what :func:`transcode_raw` writes)."""
    return _PREFIX.size + len(_raw_header(header)) + header.raw_size


def transcode_raw(blob: Any, out: Any) -> int:
    """Write `blob` with codec ``none`` into `out` (a writable buffer of at least
    :func:`raw_blob_size` bytes): the same expert, tensors and raw payload checksum, its byte
    planes joined, a new seal. A reader then uses the payload where it lies (a co-located
    store publishes bf16 blobs this way, so the decoder copies them to the GPU as they are).
    The input is verified as :func:`decode_raw` does (BlobError); ValueError when `out` is
    too small. Returns the bytes written."""
    header, _ = read_header(blob)
    dst = memoryview(out)
    dst = _writable_out(dst, len(dst) if dst.format == "B" and dst.ndim == 1 else dst.nbytes)
    if header.codec == "none":
        check_blob(blob)
        n = header.blob_size
        if len(dst) < n:
            raise ValueError(f"a {n}-byte blob does not fit {len(dst)} bytes")
        dst[:n] = _as_bytes_view(blob)[:n]
        return n
    hbytes = _raw_header(header)
    prefix = _PREFIX.pack(MAGIC, len(hbytes))
    off = len(prefix) + len(hbytes)
    n = off + header.raw_size
    if len(dst) < n:
        raise ValueError(f"the {n}-byte raw blob does not fit {len(dst)} bytes")
    _, raw = decode_raw(blob, out=dst[off:n])
    seal = xxhash.xxh3_64()
    for piece in (prefix, hbytes, raw):
        seal.update(piece)
    dst[:off] = prefix + hbytes[:-_SEAL_LEN] + seal.digest()
    return n


def encode_blob(
    model: str,
    layer: int,
    expert: int,
    precision: str,
    tensors: Iterable[RawTensor],
    raw: Any,
    *,
    codec: str = "auto",
    min_saving: float = MIN_CODEC_SAVING,
) -> bytes:
    """Build a blob from a raw payload laid out as ``tensors`` describe.

    ``codec="auto"`` applies ``bf16-planes+lz4`` to bf16 blobs when lz4 shrinks the exponent
    plane by at least ``min_saving`` (3 %), else stores the payload as is; other values force
    a codec (for tests).  Raises ValueError when the description is inconsistent.
    """
    validate_model_name(model)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if codec not in ("auto",) + CODECS:
        raise ValueError(f"unknown codec {codec!r}")
    raw_view = _as_bytes_view(raw)
    raw_size = len(raw_view)
    if precision != "bf16" or raw_size % 2:
        if codec not in ("auto", "none"):
            raise ValueError(f"codec {codec} needs a bf16 payload of even size")
        codec = "none"
    codec, segments, parts = _encode_payload(raw_view, codec, min_saving)
    header = {
        "v": FORMAT_VERSION,
        "model": model,
        "layer": layer,
        "expert": expert,
        "precision": precision,
        "tensors": [t.to_msg() for t in tensors],
        "raw_size": raw_size,
        "codec": codec,
        "segments": [s.to_msg() for s in segments],
        "xxh3": payload_checksum(raw_view),
        "seal": b"\0" * _SEAL_LEN,
    }
    hbytes = msgpack.packb(header, use_bin_type=True)
    assert hbytes.endswith(_SEAL_BIN_PREFIX + b"\0" * _SEAL_LEN)
    prefix = _PREFIX.pack(MAGIC, len(hbytes))
    try:
        read_header(prefix + hbytes)  # the description must be one a reader accepts
    except BlobError as e:
        raise ValueError(f"inconsistent blob description: {e}") from None
    seal = xxhash.xxh3_64()  # over the blob with the seal zeroed, as hbytes still has it
    for piece in (prefix, hbytes, *parts):
        seal.update(piece)
    hbytes = hbytes[:-_SEAL_LEN] + seal.digest()
    return b"".join((prefix, hbytes, *parts))  # one copy of the payload
