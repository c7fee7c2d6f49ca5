"""Fused int4 dequantization on CUDA (Triton): one pass from packed nibbles to the compute dtype.

`expert_store.quant.dequantize` in plain torch runs five elementwise passes for an int4 matrix
(xor, two shifts into an int8 buffer, the scale multiply, the cast). On an H200 that takes
~1.6 ms per Mixtral-shaped expert (3 matrices of 58.7 M elements): as long as copying the
expert's 91 MB over PCIe, so a dense-slot load would cost twice its copy. This kernel reads the packed
bytes and the fp16 scales once and writes the result once (29 MB in, 117 MB out per matrix).

Same arithmetic as the torch path, so the results are bit-identical: a stored nibble is v + 8
(even column in the low nibble); each element is float32(v) * float32(scale), rounded once to
the output dtype (round to nearest even).

Used by `quant.dequantize` (through `try_dequantize_int4`) for CUDA tensors when Triton
imports and the row length is a multiple of the group size; anything else (CPU, no Triton, odd
shapes) takes the torch path. Triton compiles the kernel and its launcher at the first call, and
the launcher needs a C compiler at run time; when that compilation (or the launch) fails, the
kernel is switched off for the process with one warning line and every call takes the torch
path, which gives the same bits.
"""

from __future__ import annotations

import functools
import logging
import threading

import torch

log = logging.getLogger(__name__)

BLOCK = 1024          # packed bytes per program (2048 output elements)

# Why the kernel is off for this process (its first compile or launch failed), or None.
_failure: str | None = None
_failure_lock = threading.Lock()


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
            and out.dtype in (torch.bfloat16, torch.float16, torch.float32) and _failure is None
            and _kernel() is not None)


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


def try_dequantize_int4(q: torch.Tensor, scales: torch.Tensor, group_size: int,
                        out: torch.Tensor) -> torch.Tensor | None:
    """`dequantize_int4` when it can take this call, else None (the caller runs the torch path).

    A failure of the kernel (Triton cannot build its launcher without a C compiler, a driver
    or compiler error) switches it off for the process, logged as one warning line, and
    returns None: the results do not change, only the speed."""
    if out.dim() != 2 or not available(q, out.shape[1], group_size, out):
        return None
    try:
        return dequantize_int4(q, scales, group_size, out)
    except Exception as e:  # noqa: BLE001 - any failure of the fast path falls back to the same bits
        _switch_off(e)
        return None


def _switch_off(error: BaseException) -> None:
    """Record the first failure and log it once (threads that failed together log nothing more)."""
    global _failure
    lines = str(error).strip().splitlines()
    with _failure_lock:
        if _failure is not None:
            return
        _failure = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    log.warning("int4 dequantization: the Triton kernel failed (%s); using the torch path from now on "
                "(same results, slower; install a C compiler, e.g. gcc, for the fast path)", _failure)
