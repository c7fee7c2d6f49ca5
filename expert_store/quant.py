"""Group-wise symmetric int8/int4 quantization and the torch side of the blob format.

Quantization (per row, groups of ``group_size`` consecutive input columns; a row whose length
is not a multiple of the group size ends with a shorter group):

    qmax  = 127 (int8) or 7 (int4)
    scale = fp16 value >= absmax(group) / qmax   (computed in fp32, rounded *up* to fp16)
    q     = round(w / scale)  in [-qmax, qmax]
    deq   = q * scale

Error bound (what the tests check), for every element ``w`` and the stored fp16 ``scale`` of
its group, dequantizing in float32::

    |w - deq| <= scale / 2 * (1 + 2**-10)

(``scale / 2`` is the rounding step; the ``2**-10`` covers fp32 rounding of ``w / scale``.)
Because the scale is rounded up, no value is ever clamped; and while ``absmax / qmax`` is in
fp16's normal range (>= 2**-14) the scale is at most ``absmax / qmax * (1 + 2**-10)``, so
relative to the group's largest magnitude ``|w - deq| <= absmax / (2 * qmax) * (1 + 2**-9)``.
Dequantizing into bf16/fp16 adds that dtype's rounding of the result (half an ulp of ``deq``).

Storage: int8 values as ``int8 [out, in]``; int4 values offset by 8 (1..15) and packed two per
byte, the even column in the low nibble: ``uint8 [out, ceil(in / 2)]``; scales ``float16
[out, ceil(in / group_size)]``.  A blob holds an expert's ``w1`` (gate, ``[ffn, hidden]``),
``w3`` (up, ``[ffn, hidden]``) and ``w2`` (down, ``[hidden, ffn]``) in that order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from . import format as fmt
from .format import ALIGN, BlobHeader, QuantLayout, RawTensor

__all__ = [
    "EXPERT_TENSORS",
    "DEFAULT_GROUP_SIZE",
    "QMAX",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "error_bound",
    "expert_to_blob",
    "blob_to_tensors",
    "tensors_from_raw",
]

EXPERT_TENSORS = ("w1", "w3", "w2")
DEFAULT_GROUP_SIZE = 128
QMAX = {8: 127, 4: 7}
_PRECISION_BITS = {"int8": 8, "int4": 4}
_CPU_BLOCK_ELEMENTS = 1 << 19  # dequantize on a CPU in blocks of rows of about this many values

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("the blob format stores little-endian values; this host is big-endian")


def _check_bits(bits: int) -> int:
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return QMAX[bits]


def _check_group(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")


def quantize(w: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` (any float dtype) -> ``(q, scales)``: ``q`` int8 ``[out, in]`` (bits=8)
    or uint8 ``[out, ceil(in/2)]`` (bits=4, packed); ``scales`` fp16 ``[out, ceil(in/group)]``.
    See the module docstring for the error bound.  Raises ValueError for non-finite weights
    or weights whose scale does not fit fp16."""
    qmax = _check_bits(bits)
    _check_group(group_size)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize expects a 2-D float tensor, got {tuple(w.shape)} {w.dtype}")
    out_f, in_f = w.shape
    n_groups = -(-in_f // group_size)
    w32 = w.detach().to(torch.float32)
    pad = n_groups * group_size - in_f
    if pad:
        w32 = torch.nn.functional.pad(w32, (0, pad))
    groups = w32.view(out_f, n_groups, group_size)  # [out, G, gs]
    absmax = groups.abs().amax(dim=-1)  # [out, G]; NaN/inf anywhere in a group shows up here
    if not torch.isfinite(absmax).all():
        raise ValueError("cannot quantize non-finite weights")
    scale32 = absmax / qmax
    scales = scale32.to(torch.float16)
    if torch.isinf(scales).any():
        raise ValueError(f"weights too large for fp16 scales (absmax {absmax.max().item():.3g})")
    low = scales.to(torch.float32) < scale32  # rounded down: step up one fp16 ulp so |w/scale| <= qmax
    if low.any():
        scales = torch.where(low, torch.nextafter(scales, torch.full_like(scales, float("inf"))), scales)
    s32 = scales.to(torch.float32)
    s32 = torch.where(s32 > 0, s32, torch.ones_like(s32)).unsqueeze(-1)  # [out, G, 1]; all-zero groups: 0/1 = 0
    q = torch.div(groups, s32).round_().clamp_(-qmax, qmax)
    q = q.view(out_f, n_groups * group_size)[:, :in_f].to(torch.int8)
    if bits == 8:
        return q.contiguous(), scales.contiguous()
    u = (q + 8).to(torch.uint8)  # 1..15
    if in_f % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    return packed.contiguous(), scales.contiguous()


def _unpack_int4(packed: torch.Tensor, in_f: int) -> torch.Tensor:
    """uint8 ``[out, ceil(in/2)]`` -> int8 ``[out, in]`` in [-8, 7]."""
    vals = torch.empty((packed.shape[0], packed.shape[1], 2), dtype=torch.int8, device=packed.device)
    _unpack_int4_into(packed, vals)
    return vals.view(packed.shape[0], -1)[:, :in_f]


def _unpack_int4_into(packed: torch.Tensor, vals: torch.Tensor) -> None:
    """Signed nibbles of uint8 ``packed [..., n]`` into int8 ``vals [..., n, 2]`` (even column low).

    A stored nibble is ``v + 8``; xor with 8 flips its top bit, which makes it the 4-bit two's
    complement of ``v``, and arithmetic shifts of int8 sign-extend it: three elementwise passes
    over the packed bytes, no wider temporaries."""
    x = torch.bitwise_xor(packed.view(torch.int8), -0x78)       # 0x88: both nibbles, as int8
    lo, hi = vals[..., 0], vals[..., 1]
    torch.bitwise_left_shift(x, 4, out=lo)
    lo.bitwise_right_shift_(4)                                   # arithmetic: sign-extends
    torch.bitwise_right_shift(x, 4, out=hi)


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    shape: tuple[int, int] | torch.Size,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``[out, in]`` tensor of ``dtype`` on ``q``'s device.

    Every element is ``q * scale`` computed in float32 and rounded once to ``dtype`` (exact in
    float32: a 4- or 8-bit integer times an fp16 scale). ``out``: an ``[out, in]`` float tensor on
    ``q``'s device to write into (returned; ``dtype`` defaults to its dtype, bfloat16 without
    it). When ``in`` is a multiple of ``group_size`` the values go straight into the result: one
    multiply pass writing ``dtype`` (int4 adds three passes over the packed bytes and an int8
    buffer of ``[out, in]``; on a CPU both run over blocks of rows that stay in cache), no
    float32 copy of the matrix. On CUDA, int4 goes through one fused Triton pass
    (expert_store/dequant_kernels.py, bit-identical) when Triton is installed and can compile it
    (else the torch path, after one warning line); ``kernel="torch"`` forces the torch path."""
    _check_bits(bits)
    if kernel not in ("auto", "torch"):
        raise ValueError(f"kernel must be 'auto' or 'torch', got {kernel!r}")
    out_f, in_f = int(shape[0]), int(shape[1])
    n_groups = -(-in_f // group_size)
    if tuple(scales.shape) != (out_f, n_groups):
        raise ValueError(f"scales shape {tuple(scales.shape)} != {(out_f, n_groups)}")
    stored_cols = in_f if bits == 8 else (in_f + 1) // 2
    if q.dim() != 2 or tuple(q.shape) != (out_f, stored_cols):
        raise ValueError(f"quantized values shape {tuple(q.shape)} does not match {(out_f, in_f)} "
                         f"({bits}-bit: {(out_f, stored_cols)} stored)")
    if dtype is None:
        dtype = out.dtype if out is not None else torch.bfloat16
    if out is None:
        out = torch.empty((out_f, in_f), dtype=dtype, device=q.device)
    elif tuple(out.shape) != (out_f, in_f) or out.dtype != dtype or out.device != q.device \
            or not out.is_floating_point():
        raise ValueError(f"out must be a {dtype} [{out_f}, {in_f}] tensor on {q.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if bits == 4 and kernel != "torch":  # the kernel takes CUDA tensors only
        from expert_store import dequant_kernels
        fused = dequant_kernels.try_dequantize_int4(q, scales, group_size, out)   # one fused pass
        if fused is not None:
            return fused
    s32 = scales.to(torch.float32).unsqueeze(-1)                 # [out, G, 1]
    if in_f % group_size == 0 and out.is_contiguous():
        dst = out.view(out_f, n_groups, group_size)              # [out, G, gs]
        # one pass on a GPU; on a CPU, blocks of rows whose temporaries stay in cache
        rows = out_f if q.device.type == "cuda" else max(1, _CPU_BLOCK_ELEMENTS // in_f)
        buf = None
        if bits == 4:
            buf = torch.empty((min(rows, out_f), stored_cols, 2), dtype=torch.int8, device=q.device)
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            if bits == 8:
                vals = q[r0:r1].view(torch.int8)
            else:
                vals = buf[:r1 - r0]
                _unpack_int4_into(q[r0:r1], vals)
            # int * fp32, rounded once to dtype as it is stored
            torch.mul(vals.view(r1 - r0, n_groups, group_size), s32[r0:r1], out=dst[r0:r1])
        return out
    # a last group shorter than group_size (or a strided out): pad to whole groups
    vals = _unpack_int4(q, in_f) if bits == 4 else q.view(torch.int8)
    pad = n_groups * group_size - in_f
    v = torch.nn.functional.pad(vals.to(torch.float32), (0, pad)).view(out_f, n_groups, group_size)
    out.copy_((v * s32).view(out_f, n_groups * group_size)[:, :in_f])
    return out


# the 16 FP4 (e2m1) values, by nibble: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6
_FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OCP MX FP4 weights (GPT-OSS's released experts) -> float32, exactly.

    ``blocks`` uint8 ``[..., rows, G, 16]``: blocks of 32 values along the input dim, two FP4
    (e2m1) values per byte, the even column in the low nibble; ``scales`` uint8 ``[..., rows,
    G]``: one E8M0 exponent per block (value = fp4 x 2^(scale - 127)). Returns ``[..., rows, G*32]``.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != 16 \
            or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 needs uint8 blocks [..., G, 16] and uint8 scales [..., G], got "
                         f"{blocks.dtype} {tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    lut = torch.tensor(_FP4_E2M1, dtype=torch.float32, device=blocks.device)
    vals = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)   # [..., G, 16, 2]
    vals = torch.ldexp(vals.flatten(-2), (scales.to(torch.int32) - 127)[..., None])       # [..., G, 32]
    return vals.flatten(-2)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-scaled fp8 weights (DeepSeek-V3 as released) -> float32: ``weight [out, in]``
    (float8_e4m3fn) times ``scale_inv [ceil(out/b0), ceil(in/b1)]`` (float32), one scale per
    b0 x b1 block."""
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"fp8 weight and scales must be 2-D, got {tuple(weight.shape)} and {tuple(scale_inv.shape)}")
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return weight.float() * scale


def error_bound(scales: torch.Tensor, group_size: int, in_f: int) -> torch.Tensor:
    """Per-element bound ``scale/2 * (1 + 2**-10)`` as a float32 ``[out, in]`` tensor."""
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :in_f]
    return s / 2 * (1 + 2.0**-10)


@dataclass(frozen=True)
class QuantizedWeight:
    """Views of one quantized tensor inside a raw payload.  Iterates as ``(q, scales)``."""

    q: torch.Tensor  # int8 [out, in] or uint8 [out, ceil(in/2)]
    scales: torch.Tensor  # float16 [out, ceil(in/group)]
    bits: int
    group_size: int
    shape: tuple[int, int]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.q, self.scales))

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.bits, self.group_size, self.shape, dtype, out=out)

    def to(self, device: Any) -> "QuantizedWeight":
        return QuantizedWeight(self.q.to(device), self.scales.to(device), self.bits, self.group_size, self.shape)


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).view(-1).numpy())


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def expert_to_blob(
    model: str,
    layer: int,
    expert: int,
    precision: str,
    tensors: Mapping[str, torch.Tensor],
    group_size: int = DEFAULT_GROUP_SIZE,
    codec: str = "auto",
) -> bytes:
    """Encode one expert's ``{"w1", "w3", "w2"}`` (2-D float tensors) as a blob at
    ``precision`` ("bf16": cast to bfloat16, exact for bf16 sources; "int8"/"int4":
    group-wise quantized). codec: "auto" (bf16 byte planes + lz4 where that saves) or "none"
    (the raw payload: larger, but a reader uses it where it lies, see ``format.encode_blob``)."""
    if precision not in fmt.PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {fmt.PRECISIONS}")
    if set(tensors) != set(EXPERT_TENSORS):
        raise ValueError(f"an expert needs exactly {EXPERT_TENSORS}, got {sorted(tensors)}")
    parts: list[tuple[int, memoryview]] = []
    layout: list[RawTensor] = []
    offset = 0

    def place(data: memoryview) -> int:
        nonlocal offset
        start = _align(offset)
        parts.append((start, data))
        offset = start + len(data)
        return start

    for name in EXPERT_TENSORS:
        w = tensors[name]
        if w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"{name}: expected a 2-D float tensor, got {tuple(w.shape)} {w.dtype}")
        shape = (int(w.shape[0]), int(w.shape[1]))
        if precision == "bf16":
            data = _as_bytes(w.to(torch.bfloat16))
            layout.append(RawTensor(name, shape, "bfloat16", place(data), len(data)))
        else:
            bits = _PRECISION_BITS[precision]
            q, scales = quantize(w, bits, group_size)
            qdata, sdata = _as_bytes(q), _as_bytes(scales)
            q_off = place(qdata)
            s_off = place(sdata)
            quant = QuantLayout(bits=bits, group_size=group_size, scales_offset=s_off, scales_nbytes=len(sdata))
            layout.append(RawTensor(name, shape, fmt.PRECISION_DTYPE[precision], q_off, len(qdata), quant))
    raw = bytearray(offset)
    for start, data in parts:
        raw[start : start + len(data)] = data
    return fmt.encode_blob(model, layer, expert, precision, layout, raw, codec=codec)


def tensors_from_raw(header: BlobHeader, raw: torch.Tensor) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Views (no copies) of every tensor of a blob over its raw payload ``raw`` (1-D uint8
    tensor on any device, e.g. a GPU cache slot, starting at a 16-byte aligned address):
    bf16 blobs give bfloat16 ``[out, in]`` tensors, int8/int4 blobs :class:`QuantizedWeight`."""
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValueError(f"raw must be a 1-D uint8 tensor, got {raw.dtype} {tuple(raw.shape)}")
    if raw.numel() < header.raw_size:
        raise ValueError(f"raw has {raw.numel()} bytes, the payload needs {header.raw_size}")
    torch_dtype = {"bfloat16": torch.bfloat16, "int8": torch.int8, "uint8": torch.uint8}
    result: dict[str, torch.Tensor | QuantizedWeight] = {}
    for t in header.tensors:
        region = raw[t.offset : t.offset + t.nbytes]
        if t.quant is None:
            result[t.name] = region.view(torch_dtype[t.dtype]).view(t.shape)
            continue
        rows, cols = t.shape
        stored_cols = cols if t.quant.bits == 8 else (cols + 1) // 2
        q = region.view(torch_dtype[t.dtype]).view(rows, stored_cols)
        s = raw[t.quant.scales_offset : t.quant.scales_offset + t.quant.scales_nbytes]
        scales = s.view(torch.float16).view(rows, t.n_groups)
        result[t.name] = QuantizedWeight(q, scales, t.quant.bits, t.quant.group_size, (rows, cols))
    return result


def blob_to_tensors(
    blob: Any,
    out: Any = None,
    device: str | torch.device = "cpu",
    dequant: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Decode a blob (verifying it; :class:`format.BlobError` if malformed) into tensors.

    ``out``: optional caller buffer for the raw payload (bytearray/memoryview, or a CPU uint8
    torch tensor such as a pinned slot); the returned tensors are views of it when they stay on
    the CPU undequantized.  ``dequant=True`` returns ``dtype`` tensors (bf16 weights are
    returned as stored when ``dtype`` is bfloat16); ``dequant=False`` returns bf16 tensors or
    :class:`QuantizedWeight` views.  Results are moved to ``device``.
    """
    header, _ = fmt.read_header(blob)
    if out is None:
        out = bytearray(header.raw_size)
    if isinstance(out, torch.Tensor):
        if out.device.type != "cpu" or out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError("out tensor must be a contiguous CPU uint8 tensor")
        raw_t = out.view(-1)
        fmt.decode_raw(blob, memoryview(raw_t.numpy()))
    else:
        view = memoryview(out)
        fmt.decode_raw(blob, view)
        if view.readonly:
            raise ValueError("out buffer is read-only")
        raw_t = torch.frombuffer(view.cast("B") if view.format != "B" else view, dtype=torch.uint8)
    views = tensors_from_raw(header, raw_t[: header.raw_size])
    result: dict[str, torch.Tensor | QuantizedWeight] = {}
    for name, v in views.items():
        if isinstance(v, QuantizedWeight):
            v = v.to(device)
            result[name] = v.dequantize(dtype) if dequant else v
        else:
            v = v.to(device)
            result[name] = v.to(dtype) if dequant else v
    return result
