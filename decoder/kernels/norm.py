"""RMSNorm of the decode step in one kernel (with the residual add before it, when given).

    h = x + r                                   (rounded to x's dtype, as `x + r` is)
    y = weight * (h / sqrt(mean(h^2) + eps))    (normalised in float32, rounded to x's dtype,
                                                 then scaled in x's dtype: RMSNorm.forward)

`Transformer.forward`'s RMSNorm is eight elementwise and reduction kernels; in a captured decode
step of tiny batches every kernel costs its launch slot in the graph, so the step uses this one
(a Triton program per row) on CUDA and the module itself elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch

from decoder.kernels.lazy import triton_kernel


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def rms_norm_rows(x_ptr, r_ptr, h_ptr, w_ptr, y_ptr, N, eps, HAS_R: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=m, other=0.0)
        if HAS_R:
            r = tl.load(r_ptr + row * N + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(h_ptr + row * N + cols, x, mask=m)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        y = (xf * inv).to(x.dtype)
        tl.store(y_ptr + row * N + cols, (w.to(tl.float32) * y.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=m)

    return rms_norm_rows


def rms_norm(norm: Any, x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None,
             h_out: torch.Tensor | None = None) -> None:
    """out <- norm(x) (norm: an RMSNorm module; x, out: [B, N] contiguous); with `residual`:
    h_out <- x + residual first and out <- norm(h_out)."""
    kernel = _kernel() if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) else None
    if kernel is None:
        h = x if residual is None else x + residual
        if h_out is not None:
            h_out.copy_(h)
        out.copy_(norm(h))
        return
    import triton

    B, N = x.shape
    r = residual if residual is not None else x
    h = h_out if h_out is not None else x
    kernel[(B,)](x, r, h, norm.weight, out, N, norm.eps, HAS_R=residual is not None,
                 BLOCK=triton.next_power_of_2(N), num_warps=8 if N >= 2048 else 4)
