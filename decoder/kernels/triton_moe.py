"""Triton kernels of the fused MoE (decoder/kernels/fused_moe.py launches them). A module of
its own so that Triton, an optional CUDA-only dependency, is imported only when they run."""

import triton
import triton.language as tl


@triton.jit
def load_q(q_ptr, s_ptr, rows, cols, row_mask, col_mask, ncols, ngroups, QBITS: tl.constexpr,
           GROUP: tl.constexpr, HALF: tl.constexpr):
    """Dequantized fp32 tile of a group-wise int8 / int4 matrix: w[rows, cols] (for int4
    `cols` index packed bytes and HALF picks the high (odd column) or low nibble)."""
    m = row_mask[:, None] & col_mask[None, :]
    if QBITS == 8:
        v = tl.load(q_ptr + rows[:, None].to(tl.int64) * ncols + cols[None, :], mask=m, other=0).to(tl.float32)
        g = cols // GROUP
    else:
        b = tl.load(q_ptr + rows[:, None].to(tl.int64) * (ncols // 2) + cols[None, :], mask=m, other=0).to(tl.int32)
        if HALF:
            v = ((b >> 4) - 8).to(tl.float32)
        else:
            v = ((b & 0xF) - 8).to(tl.float32)
        g = (cols * 2) // GROUP
    sc = tl.load(s_ptr + rows[:, None].to(tl.int64) * ngroups + g[None, :], mask=m, other=0.0).to(tl.float32)
    return v * sc


@triton.jit
def moe_up(x_ptr, ids_ptr, slot_ptr, w1_ptr, w3_ptr, act_ptr, R, H, Fd, stride_x, slot_stride,
           off1, off3, s_ptr, scale_stride, soff1, soff3, K: tl.constexpr, WIDEN: tl.constexpr,
           QBITS: tl.constexpr, GROUP: tl.constexpr, DIV: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr):
    e = tl.program_id(0)
    slot = tl.load(slot_ptr + e)
    r = tl.arange(0, BLOCK_R)
    ids = tl.load(ids_ptr + r, mask=r < R, other=-1)
    match = ids == e                                               # [BLOCK_R]
    if (slot < 0) | (tl.max(match.to(tl.int32), axis=0) == 0):
        return
    tok = r // K
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    base = slot.to(tl.int64) * slot_stride
    g = tl.zeros((BLOCK_F, BLOCK_R), dtype=tl.float32)
    u = tl.zeros((BLOCK_F, BLOCK_R), dtype=tl.float32)
    fm = f < Fd
    if QBITS == 0:
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            xt = tl.load(x_ptr + tok[None, :] * stride_x + h[:, None],
                         mask=match[None, :] & (h[:, None] < H), other=0.0)      # [BLOCK_H, BLOCK_R]
            wm = fm[:, None] & (h[None, :] < H)
            w_off = f[:, None].to(tl.int64) * H + h[None, :]
            a = tl.load(w1_ptr + base + off1 + w_off, mask=wm, other=0.0)        # [BLOCK_F, BLOCK_H]
            b = tl.load(w3_ptr + base + off3 + w_off, mask=wm, other=0.0)
            if WIDEN:
                xt, a, b = xt.to(tl.float32), a.to(tl.float32), b.to(tl.float32)
            g = tl.dot(a, xt, g)
            u = tl.dot(b, xt, u)
    else:
        # quantized slot: dequantize each tile in registers, rounded once to x's dtype as
        # expert_store.quant.dequantize does; int4 runs over packed bytes, the even
        # columns' x against the low nibbles and the odd columns' against the high ones
        sbase = slot.to(tl.int64) * scale_stride
        ng = (H + GROUP - 1) // GROUP
        q1, q3 = w1_ptr + base + off1, w3_ptr + base + off3
        s1, s3 = s_ptr + sbase + soff1, s_ptr + sbase + soff3
        for c0 in range(0, H // DIV, BLOCK_H // DIV):
            c = c0 + tl.arange(0, BLOCK_H // DIV)                             # stored column
            cm = c < H // DIV
            for half in tl.static_range(DIV):
                col = DIV * c + half                                           # its x column
                xt = tl.load(x_ptr + tok[None, :] * stride_x + col[:, None], mask=match[None, :] & cm[:, None],
                             other=0.0)
                a = load_q(q1, s1, f, c, fm, cm, H, ng, QBITS, GROUP, half)
                b = load_q(q3, s3, f, c, fm, cm, H, ng, QBITS, GROUP, half)
                if WIDEN:
                    xt = xt.to(tl.float32)
                else:
                    a, b = a.to(xt.dtype), b.to(xt.dtype)
                g = tl.dot(a, xt, g)
                u = tl.dot(b, xt, u)
    act = g * tl.sigmoid(g) * u                                    # SiLU(g) * u  [BLOCK_F, BLOCK_R]
    tl.store(act_ptr + r[None, :] * Fd + f[:, None], act.to(act_ptr.dtype.element_ty),
             mask=match[None, :] & (f[:, None] < Fd))


@triton.jit
def moe_down(act_ptr, ids_ptr, wts_ptr, slot_ptr, w2_ptr, y_ptr, R, H, Fd, slot_stride, off2, f_per_split,
             s_ptr, scale_stride, soff2, WIDEN: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr,
             DIV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    e = tl.program_id(0)
    slot = tl.load(slot_ptr + e)
    r = tl.arange(0, BLOCK_R)
    ids = tl.load(ids_ptr + r, mask=r < R, other=-1)
    match = ids == e
    if (slot < 0) | (tl.max(match.to(tl.int32), axis=0) == 0):
        return
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    f_lo = split * f_per_split
    base = slot.to(tl.int64) * slot_stride + off2
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    if QBITS == 0:
        for f0 in range(f_lo, f_lo + f_per_split, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            fm = (f < Fd) & (f < f_lo + f_per_split)
            at = tl.load(act_ptr + r[None, :] * Fd + f[:, None], mask=match[None, :] & fm[:, None],
                         other=0.0)                                          # [BLOCK_F, BLOCK_R]
            w = tl.load(w2_ptr + base + d[:, None].to(tl.int64) * Fd + f[None, :],
                        mask=(d[:, None] < H) & fm[None, :], other=0.0)     # [BLOCK_D, BLOCK_F]
            if WIDEN:
                at, w = at.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(w, at.to(w.dtype), acc)
    else:
        sbase = slot.to(tl.int64) * scale_stride + soff2
        ng = (Fd + GROUP - 1) // GROUP
        dm = d < H
        for c0 in range(f_lo // DIV, (f_lo + f_per_split) // DIV, BLOCK_F // DIV):
            c = c0 + tl.arange(0, BLOCK_F // DIV)
            cm = (c < Fd // DIV) & (c < (f_lo + f_per_split) // DIV)
            for half in tl.static_range(DIV):
                col = DIV * c + half
                at = tl.load(act_ptr + r[None, :] * Fd + col[:, None], mask=match[None, :] & cm[:, None],
                             other=0.0)
                w = load_q(w2_ptr + base, s_ptr + sbase, d, c, dm, cm, Fd, ng, QBITS, GROUP, half)
                if WIDEN:
                    at = at.to(tl.float32)
                else:
                    w = w.to(act_ptr.dtype.element_ty)
                acc = tl.dot(w, at.to(w.dtype), acc)
    scale = tl.load(wts_ptr + r, mask=match, other=0.0)
    acc = acc * scale[None, :]
    tl.store(y_ptr + (split * R + r[None, :]) * H + d[:, None], acc,
             mask=match[None, :] & (d[:, None] < H))
