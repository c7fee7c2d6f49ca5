"""RoPE of the decode step's q and k and the write of k, v into the static KV cache, one kernel.

    q_out[b, h]              = rope(q[b, h])                       h < nh
    k_cache[b, j, pos[b]]    = rope(k[b, j]),  v_cache[b, j, pos[b]] = v[b, j]      j < nkv
    rope(x) = x * cos + roll(x, hd / 2) * sin_signed               (`apply_rope_signed`)

q, k, v are read from one projection row [B, nh*hd + 2*nkv*hd] (the fused q/k/v matmul). Each
product and the sum are rounded to the compute dtype as torch's elementwise ops round them, so
the results equal `apply_rope_signed` and the cache's index write bit for bit. The torch way is
ten kernels per layer (two RoPEs of four ops, two index writes); in a captured step of tiny
batches each costs its launch slot in the graph, so the step uses this one (a program per
(row, head)) where Triton runs and the torch ops elsewhere.
"""

from __future__ import annotations

import torch

from decoder.kernels.lazy import runs_on, triton_kernel


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def rope_cache_rows(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, W, NH, NKV, S, HD,
                        BLOCK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)                       # a q head (< NH) or a KV head (NH + j)
        i = tl.arange(0, BLOCK)
        m = i < HD
        rolled = (i + HD // 2) % HD                # roll(x, hd/2)[i] = x[(i - hd/2) mod hd]
        dt = q_ptr.dtype.element_ty
        c = tl.load(cos_ptr + b * HD + i, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * HD + i, mask=m, other=0.0).to(tl.float32)
        src = qkv_ptr + b.to(tl.int64) * W + h * HD
        x = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
        xr = tl.load(src + rolled, mask=m, other=0.0).to(tl.float32)
        out = ((x * c).to(dt).to(tl.float32) + (xr * s).to(dt).to(tl.float32)).to(dt)
        if h < NH:
            tl.store(q_ptr + (b * NH + h).to(tl.int64) * HD + i, out, mask=m)
        else:
            j = h - NH
            pos = tl.load(pos_ptr + b)
            at = ((b * NKV + j).to(tl.int64) * S + pos) * HD
            tl.store(kc_ptr + at + i, out, mask=m)
            v = tl.load(src + NKV * HD + i, mask=m, other=0.0)
            tl.store(vc_ptr + at + i, v.to(dt), mask=m)

    return rope_cache_rows


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                   q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_head: int) -> None:
    """qkv [B, nh*hd + 2*nkv*hd]; cos, sin_signed [B, hd] (this token's); positions [B] int64;
    q_out [B, nh, hd] <- rope(q); k_cache, v_cache [Bmax, nkv, S, hd] get rope(k), v at each
    row's position. All contiguous."""
    B, W = qkv.shape
    _, nkv, S, hd = k_cache.shape
    kernel = _kernel() if runs_on(qkv, _kernel) else None
    if kernel is None:
        from decoder.model.transformer import apply_rope_signed

        q = qkv[:, :n_head * hd].view(B, n_head, 1, hd)
        k = qkv[:, n_head * hd:(n_head + nkv) * hd].view(B, nkv, 1, hd)
        v = qkv[:, (n_head + nkv) * hd:].view(B, nkv, hd)
        c, s = cos.view(B, 1, 1, hd), sin_signed.view(B, 1, 1, hd)
        q_out.copy_(apply_rope_signed(q, c, s).view(B, n_head, hd))
        rows = torch.arange(B, device=qkv.device)
        k_cache[rows, :, positions] = apply_rope_signed(k, c, s)[:, :, 0]
        v_cache[rows, :, positions] = v
        return
    import triton

    kernel[(B, n_head + nkv)](qkv, cos, sin_signed, positions, q_out, k_cache, v_cache, W, n_head, nkv, S, hd,
                              BLOCK=triton.next_power_of_2(hd), num_warps=1 if hd <= 128 else 2)
