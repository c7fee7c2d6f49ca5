"""Quantization error bound, int4 packing, and expert <-> blob round trips (torch side)."""

from __future__ import annotations

import pytest
import torch

from expert_store import format as fmt
from expert_store.format import BlobError
from expert_store.quant import (
    QMAX,
    QuantizedWeight,
    blob_to_tensors,
    dequantize,
    error_bound,
    expert_to_blob,
    quantize,
    tensors_from_raw,
)


def _weights(kind: str, shape=(24, 200), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if kind == "normal":
        return w * 0.02
    if kind == "bf16":
        return (w * 0.02).to(torch.bfloat16)
    if kind == "outliers":  # one huge value per row: the rest of its group quantizes coarsely
        w = w * 0.01
        w[:, 3] = 5.0
        return w
    if kind == "tiny":  # scales in fp16's subnormal range
        return w * 1e-7
    if kind == "zeros_mixed":
        w = w * 0.1
        w[:, :64] = 0.0
        return w
    if kind == "half_steps":  # values at exact .5 steps of the scale: rounding ties
        steps = torch.randint(-20, 21, shape, generator=g).float() + 0.5
        return steps / 16
    raise AssertionError(kind)


KINDS = ["normal", "bf16", "outliers", "tiny", "zeros_mixed", "half_steps"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [128, 64, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_error_within_stated_bound(bits, group_size, kind):
    w = _weights(kind)
    q, scales = quantize(w, bits, group_size)
    out_f, in_f = w.shape
    n_groups = -(-in_f // group_size)
    assert scales.dtype == torch.float16 and tuple(scales.shape) == (out_f, n_groups)
    if bits == 8:
        assert q.dtype == torch.int8 and tuple(q.shape) == (out_f, in_f)
    else:
        assert q.dtype == torch.uint8 and tuple(q.shape) == (out_f, (in_f + 1) // 2)
    deq = dequantize(q, scales, bits, group_size, w.shape, torch.float32)
    err = (w.float() - deq).abs()
    bound = error_bound(scales, group_size, in_f)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    # the scale is never below absmax/qmax (so nothing clamps) and, in fp16's normal range,
    # at most one part in 2**10 above it: the bound relative to the group's absmax holds too
    pad = n_groups * group_size - in_f
    absmax = torch.nn.functional.pad(w.float().abs(), (0, pad)).view(out_f, n_groups, group_size).amax(-1)
    ideal = absmax / QMAX[bits]
    assert (scales.float() >= ideal).all()
    normal = ideal >= 2.0**-14
    assert (scales.float()[normal] <= ideal[normal] * (1 + 2.0**-10)).all()
    rel_bound = (absmax / (2 * QMAX[bits]) * (1 + 2.0**-9)).repeat_interleave(group_size, 1)[:, :in_f]
    rows_normal = normal.repeat_interleave(group_size, 1)[:, :in_f]
    assert (err[rows_normal] <= rel_bound[rows_normal]).all()
    if kind != "zeros_mixed" and kind != "half_steps":
        # the bound is not vacuous: quantization does lose something close to half a step
        assert (err > bound / 4).any()


def test_all_zero_groups_quantize_to_exact_zeros():
    w = torch.zeros(4, 130)
    for bits in (8, 4):
        q, s = quantize(w, bits, 128)
        assert (s == 0).all()
        assert (dequantize(q, s, bits, 128, w.shape, torch.float32) == 0).all()


def test_int4_packing_layout():
    # one group, scale 1.0 (absmax 7): values -7..7 map to nibbles 1..15, even column low
    w = torch.tensor([[-7.0, 7.0, 0.0, 1.0, -1.0]])
    q, s = quantize(w, 4, group_size=8)
    assert s.item() == 1.0
    assert q.tolist() == [[(1) | (15 << 4), (8) | (9 << 4), 7 | (8 << 4)]]  # odd width padded with 8 (=0)
    assert dequantize(q, s, 4, 8, w.shape, torch.float32).tolist() == w.tolist()
    q8, s8 = quantize(w, 8, group_size=8)
    assert q8.tolist() == [[-127, 127, 0, 18, -18]] and abs(s8.item() - 7 / 127) < 1e-4


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError):
        quantize(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(ValueError):
        quantize(torch.tensor([[1.0, float("inf")]]), 4)
    with pytest.raises(ValueError):
        quantize(torch.ones(2, 4), 3)
    with pytest.raises(ValueError):
        quantize(torch.ones(2, 4), 8, group_size=7)
    with pytest.raises(ValueError):
        quantize(torch.ones(4), 8)
    with pytest.raises(ValueError):
        quantize(torch.full((2, 4), 1e7), 4)  # scale would not fit fp16


def _expert(hidden=64, ffn=96, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": (torch.randn(ffn, hidden, generator=g) * 0.02).to(dtype),
        "w3": (torch.randn(ffn, hidden, generator=g) * 0.02).to(dtype),
        "w2": (torch.randn(hidden, ffn, generator=g) * 0.02).to(dtype),
    }


def test_bf16_blob_round_trip_is_bit_exact():
    ex = _expert()
    blob = expert_to_blob("m", 1, 2, "bf16", ex)
    header, _ = fmt.read_header(blob)
    assert header.codec == "bf16-planes+lz4" and header.names == ("w1", "w3", "w2")
    got = blob_to_tensors(blob)
    for name, w in ex.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name].view(torch.int16), w.view(torch.int16))
    # a float32 source is stored as its bf16 rounding
    ex32 = _expert(dtype=torch.float32)
    got32 = blob_to_tensors(expert_to_blob("m", 0, 0, "bf16", ex32))
    for name, w in ex32.items():
        assert torch.equal(got32[name], w.to(torch.bfloat16))


@pytest.mark.parametrize("precision,bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("group_size", [128, 32])
def test_int_blob_round_trip_within_bound(precision, bits, group_size):
    ex = _expert(hidden=64, ffn=96, dtype=torch.float32)
    blob = expert_to_blob("m", 0, 3, precision, ex, group_size=group_size)
    header, _ = fmt.read_header(blob)
    assert header.precision == precision and header.codec == "none"
    assert all(t.quant.group_size == group_size and t.quant.bits == bits for t in header.tensors)
    raw_views = blob_to_tensors(blob, dequant=False)
    got = blob_to_tensors(blob, dtype=torch.float32)
    for name, w in ex.items():
        qw = raw_views[name]
        assert isinstance(qw, QuantizedWeight)
        q, scales = qw  # iterates as (q, scales)
        err = (w - got[name]).abs()
        assert (err <= error_bound(scales, group_size, w.shape[1])).all()
        assert err.max() > 0
        ref_q, ref_s = quantize(w, bits, group_size)
        assert torch.equal(q, ref_q) and torch.equal(scales, ref_s)


def test_decode_into_caller_buffers_and_views_without_copies():
    ex = _expert()
    for precision in ("bf16", "int8", "int4"):
        blob = expert_to_blob("m", 0, 0, precision, ex, group_size=32)
        header, _ = fmt.read_header(blob)
        # a torch uint8 buffer (what a pinned host slot is), larger than needed
        slot = torch.full((header.raw_size + 64,), 0xAB, dtype=torch.uint8)
        views = blob_to_tensors(blob, out=slot, dequant=False)
        lo, hi = slot.data_ptr(), slot.data_ptr() + header.raw_size
        for v in views.values():
            for t in (v,) if isinstance(v, torch.Tensor) else (v.q, v.scales):
                assert lo <= t.data_ptr() < hi  # a view into the caller's buffer
        assert (slot[header.raw_size :] == 0xAB).all()
        # a bytearray buffer
        buf = bytearray(header.raw_size)
        again = blob_to_tensors(blob, out=buf, dtype=torch.float32)
        assert bytes(buf) == bytes(slot[: header.raw_size].numpy())
        # tensors_from_raw over the same bytes gives the same weights
        viewed = tensors_from_raw(header, slot)
        for name in ("w1", "w3", "w2"):
            v = viewed[name]
            deq = v.float() if isinstance(v, torch.Tensor) else v.dequantize(torch.float32)
            assert torch.equal(deq, again[name])
        if precision == "bf16":
            for name, w in ex.items():
                assert torch.equal(viewed[name], w)


def test_tensors_from_raw_rejects_short_or_wrong_buffers():
    blob = expert_to_blob("m", 0, 0, "int8", _expert())
    header, raw = fmt.decode_raw(blob)
    with pytest.raises(ValueError):
        tensors_from_raw(header, torch.zeros(header.raw_size - 1, dtype=torch.uint8))
    with pytest.raises(ValueError):
        tensors_from_raw(header, torch.zeros(header.raw_size, dtype=torch.int16))


def test_expert_to_blob_rejects_bad_experts():
    ex = _expert()
    with pytest.raises(ValueError):
        expert_to_blob("m", 0, 0, "bf16", {"w1": ex["w1"], "w2": ex["w2"]})
    with pytest.raises(ValueError):
        expert_to_blob("m", 0, 0, "fp8", ex)
    with pytest.raises(ValueError):
        expert_to_blob("m", 0, 0, "bf16", {**ex, "w1": ex["w1"].flatten()})


def test_malformed_blobs_raise_blob_error_through_the_torch_path():
    blob = bytearray(expert_to_blob("m", 0, 0, "int4", _expert()))
    blob[-5] ^= 0x40
    with pytest.raises(BlobError):
        blob_to_tensors(bytes(blob))
    with pytest.raises(BlobError):
        blob_to_tensors(bytes(blob[:100]))
    with pytest.raises(BlobError):
        blob_to_tensors(b"not a blob at all")


def _reference_dequant(q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_f: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """The definition, spelled out: nibbles (v + 8) unpacked by masks, q * scale in float32, one rounding."""
    if bits == 4:
        u = q.to(torch.int16)
        vals = torch.stack(((u & 15) - 8, (u >> 4) - 8), dim=-1).view(q.shape[0], -1)[:, :in_f]
    else:
        vals = q.to(torch.int16)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :in_f]
    return (vals.to(torch.float32) * s).to(dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape,group_size", [((24, 200), 8), ((24, 201), 64), ((300, 4096), 128), ((7, 256), 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_into_out_equals_the_definition(bits, shape, group_size, dtype):
    # (300, 4096) runs over several blocks of rows on the CPU; (24, 201) has a short last group
    w = _weights("normal", shape=shape, seed=3) * 10
    q, scales = quantize(w, bits, group_size)
    want = _reference_dequant(q, scales, bits, group_size, shape[1], dtype)
    got = dequantize(q, scales, bits, group_size, shape, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    out = torch.full(shape, float("nan"), dtype=dtype)
    assert dequantize(q, scales, bits, group_size, shape, out=out) is out
    assert torch.equal(out, want)
    qw = QuantizedWeight(q, scales, bits, group_size, shape)
    assert torch.equal(qw.dequantize(dtype), want) and qw.dequantize().dtype == torch.bfloat16
    # a strided destination (a column slice of a wider buffer) gets the same values
    wide = torch.zeros(shape[0], shape[1] + 3, dtype=dtype)
    dequantize(q, scales, bits, group_size, shape, out=wide[:, 1:-2])
    assert torch.equal(wide[:, 1:-2], want) and (wide[:, 0] == 0).all() and (wide[:, -2:] == 0).all()


def test_dequantize_rejects_a_mismatched_out_or_q():
    w = _weights("normal", shape=(8, 64))
    q, s = quantize(w, 4, 32)
    with pytest.raises(ValueError, match="out must be"):
        dequantize(q, s, 4, 32, w.shape, out=torch.empty(8, 63))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(q, s, 4, 32, w.shape, torch.bfloat16, out=torch.empty(8, 64))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(q, s, 4, 32, w.shape, out=torch.empty(8, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="quantized values shape"):
        dequantize(q[:, :-1], s, 4, 32, w.shape)
    with pytest.raises(ValueError, match="scales shape"):
        dequantize(q, s[:, :1], 4, 32, w.shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336), (96, 384), (64, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_fused_cuda_kernel_is_bit_identical_to_the_torch_path(shape, dtype):
    from expert_store import dequant_kernels

    g = torch.Generator().manual_seed(7)
    w = torch.randn(shape, generator=g) * 0.02
    q, s = quantize(w, 4, 128)
    q, s = q.cuda(), s.cuda()
    fused = dequantize(q, s, 4, 128, shape, dtype)
    ref = dequantize(q, s, 4, 128, shape, dtype, kernel="torch")
    assert torch.equal(fused, ref)
    if shape[1] % 128 == 0 and dequant_kernels._kernel() is None:
        pytest.skip("triton is not installed: only the torch path ran")
