"""Fused int4 dequantization on CUDA (Triton): one pass from packed nibbles to the compute dtype.

`expert_store.quant.dequantize` in plain torch runs five elementwise passes for an int4 matrix
(xor, two shifts into an int8 buffer, the scale multiply, the cast). On an H200 that was
~1.6 ms per Mixtral-shaped expert (3 matrices of 58.7 M elements): as long as copying the
expert's 91 MB over PCIe, so a dense-slot load cost twice its copy. This kernel reads the packed
bytes and the fp16 scales once and writes the result once (29 MB in, 117 MB out per matrix).

Same arithmetic as the torch path, so the results are bit-identical: a stored nibble is v + 8
(even column in the low nibble); each element is float32(v) * float32(scale), rounded once to
the output dtype (round to nearest even).

Used by `quant.dequantize` for CUDA tensors when Triton imports and the row length is a
multiple of the group size; anything else (CPU, no Triton, odd shapes) takes the torch path.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

BLOCK = 1024          # packed bytes per program (2048 output elements)


@functools.lru_cache(maxsize=1)
def _kernel():
    """The compiled Triton kernel, or None when Triton is not available."""
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # pragma: no cover - depends on the install
        log.info("triton unavailable (%s): int4 dequantization uses the torch path", e)
        return None

    @triton.jit
    def dequant_int4(q_ptr, s_ptr, out_ptr, packed_cols, n_groups, out_cols,
                     GROUP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)        # packed byte index in the row
        mask = cols < packed_cols
        b = tl.load(q_ptr + row * packed_cols + cols, mask=mask, other=0).to(tl.int32)
        lo = ((b & 0xF) - 8).to(tl.float32)                           # element 2j
        hi = ((b >> 4) - 8).to(tl.float32)                            # element 2j + 1
        g = (cols * 2) // GROUP                                       # GROUP is even: one group for both
        s = tl.load(s_ptr + row * n_groups + g, mask=mask, other=0.0).to(tl.float32)
        dst = out_ptr + row * out_cols + cols * 2
        ty = out_ptr.dtype.element_ty
        tl.store(dst, (lo * s).to(ty), mask=mask)
        tl.store(dst + 1, (hi * s).to(ty), mask=mask)

    return dequant_int4


def available(q: torch.Tensor, in_f: int, group_size: int, out: torch.Tensor) -> bool:
    """True when `dequantize_int4` can take this call (CUDA, Triton, whole groups, plain layouts)."""
    return (q.is_cuda and out.is_cuda and out.is_contiguous() and q.is_contiguous()
            and in_f % 2 == 0 and group_size % 2 == 0 and in_f % group_size == 0
            and out.dtype in (torch.bfloat16, torch.float16, torch.float32) and _kernel() is not None)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, group_size: int, out: torch.Tensor) -> torch.Tensor:
    """q: uint8 [out, in/2] (packed), scales: fp16 [out, in/group] -> writes `out` [out, in]
    (on the current CUDA stream) and returns it. Check `available` first."""
    import triton

    out_f, in_f = out.shape
    packed = in_f // 2
    scales = scales.contiguous()
    grid = (out_f, triton.cdiv(packed, BLOCK))
    with torch.cuda.device(q.device):
        _kernel()[grid](q, scales, out, packed, scales.shape[1], in_f, GROUP=group_size, BLOCK=BLOCK)
    return out
