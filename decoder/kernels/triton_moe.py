"""Triton kernels of the fused MoE (decoder/kernels/fused_moe.py launches them). A module of
its own so that Triton, an optional CUDA-only dependency, is imported only when they run."""

import triton
import triton.language as tl


@triton.jit
def load_q(q_ptr, s_ptr, rows, c, c0, row_mask, col_mask, ncols, ngroups, QBITS: tl.constexpr,
           GROUP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Dequantized fp32 tiles (lo, hi) of a group-wise int8 / int4 matrix w[rows, :] over the
    stored columns `c` (a block of BLOCK_C starting at c0). int8: lo = w[rows, c] (hi unused).
    int4: each stored byte holds two values, lo = w[rows, 2c] (low nibble) and
    hi = w[rows, 2c + 1] (high nibble): the bytes are read once for both. The integers become
    floats without an int-to-float conversion (a slow instruction on the GPU): OR-ed into the
    mantissa of 2^23 and 2^23 subtracted, which is exact, so w = q * scale rounds exactly as
    expert_store.quant.dequantize does. One scale per row serves the whole tile when it lies
    inside one quantization group, else one per column (a tile past the last column, as
    the last split of the down kernel may be, gets scale 0)."""
    DIV: tl.constexpr = 2 if QBITS == 4 else 1
    m = row_mask[:, None] & col_mask[None, :]
    stored = ncols // DIV
    raw = tl.load(q_ptr + rows[:, None].to(tl.int64) * stored + c[None, :], mask=m, other=0)
    if GROUP % (BLOCK_C * DIV) == 0:
        in_range = rows * 0 + c0 < stored
        sc = tl.load(s_ptr + rows.to(tl.int64) * ngroups + (c0 * DIV) // GROUP, mask=row_mask & in_range,
                     other=0.0).to(tl.float32)[:, None]
    else:
        sc = tl.load(s_ptr + rows[:, None].to(tl.int64) * ngroups + ((c * DIV) // GROUP)[None, :], mask=m,
                     other=0.0).to(tl.float32)
    MAGIC: tl.constexpr = 0x4B000000                               # the bits of 2.0 ** 23
    if QBITS == 8:
        u = (raw.to(tl.int32) & 0xFF) ^ 0x80                       # q + 128, in [1, 255]
        lo = ((u | MAGIC).to(tl.float32, bitcast=True) - 8388736.0) * sc        # 2^23 + 128
        hi = lo
    else:
        b = raw.to(tl.int32)
        lo = (((b & 0xF) | MAGIC).to(tl.float32, bitcast=True) - 8388616.0) * sc   # 2^23 + 8
        hi = (((b >> 4) | MAGIC).to(tl.float32, bitcast=True) - 8388616.0) * sc
    return lo, hi


@triton.jit
def load_q4_biased(q_ptr, s_ptr, rows, c, c0, row_mask, col_mask, ncols, ngroups, GROUP: tl.constexpr,
                   WIDEN: tl.constexpr):
    """int4 tile for scaling after the product: (lo, hi, scale) with lo = q_even + 136 and
    hi = q_odd + 136 (the stored nibbles + 128) as bf16, built from the bits alone (0x4300 is
    bf16 128, whose last 4 mantissa bits take the nibble: no conversion at all), and the one
    fp32 scale per row of the tile (the tile lies inside one group). The caller takes
    136 * sum(x) off the product and multiplies by the scale."""
    m = row_mask[:, None] & col_mask[None, :]
    raw = tl.load(q_ptr + rows[:, None].to(tl.int64) * (ncols // 2) + c[None, :], mask=m, other=0)
    in_range = rows * 0 + c0 < ncols // 2
    sc = tl.load(s_ptr + rows.to(tl.int64) * ngroups + (c0 * 2) // GROUP, mask=row_mask & in_range,
                 other=0.0).to(tl.float32)
    b = raw.to(tl.int32)
    if WIDEN:                                   # the interpreter: the same values in fp32
        lo = ((b & 0xF) + 128).to(tl.float32)
        hi = ((b >> 4) + 128).to(tl.float32)
    else:
        lo = ((b & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = ((b >> 4) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return lo, hi, sc


@triton.jit
def moe_up(x_ptr, ids_ptr, slot_ptr, w1_ptr, w3_ptr, act_ptr, R, H, Fd, stride_x, slot_stride,
           off1, off3, s_ptr, scale_stride, soff1, soff3, h_per_split, part_ptr, K: tl.constexpr,
           WIDEN: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr, DIV: tl.constexpr, POST: tl.constexpr,
           SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr):
    e = tl.program_id(0)
    slot = tl.load(slot_ptr + e)
    r = tl.arange(0, BLOCK_R)
    ids = tl.load(ids_ptr + r, mask=r < R, other=-1)
    match = ids == e                                               # [BLOCK_R]
    if (slot < 0) | (tl.max(match.to(tl.int32), axis=0) == 0):
        return
    tok = r // K
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    split = tl.program_id(2)                  # this program's share of H: [h_lo, h_hi)
    h_lo = split * h_per_split
    h_hi = tl.minimum(H, h_lo + h_per_split)
    base = slot.to(tl.int64) * slot_stride
    g = tl.zeros((BLOCK_F, BLOCK_R), dtype=tl.float32)
    u = tl.zeros((BLOCK_F, BLOCK_R), dtype=tl.float32)
    fm = f < Fd
    if QBITS == 0:
        for h0 in range(h_lo, h_hi, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            xt = tl.load(x_ptr + tok[None, :] * stride_x + h[:, None],
                         mask=match[None, :] & (h[:, None] < h_hi), other=0.0)   # [BLOCK_H, BLOCK_R]
            wm = fm[:, None] & (h[None, :] < h_hi)
            w_off = f[:, None].to(tl.int64) * H + h[None, :]
            a = tl.load(w1_ptr + base + off1 + w_off, mask=wm, other=0.0)        # [BLOCK_F, BLOCK_H]
            b = tl.load(w3_ptr + base + off3 + w_off, mask=wm, other=0.0)
            if WIDEN:
                xt, a, b = xt.to(tl.float32), a.to(tl.float32), b.to(tl.float32)
            g = tl.dot(a, xt, g)
            u = tl.dot(b, xt, u)
    elif POST:
        # int4, scaled after the product (tiles inside one group): g += scale * (B . x - 136 sum(x))
        BLOCK_C: tl.constexpr = BLOCK_H // 2
        sbase = slot.to(tl.int64) * scale_stride
        ng = (H + GROUP - 1) // GROUP
        q1, q3 = w1_ptr + base + off1, w3_ptr + base + off3
        s1, s3 = s_ptr + sbase + soff1, s_ptr + sbase + soff3
        for c0 in range(h_lo // 2, h_hi // 2, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < h_hi // 2
            a_lo, a_hi, sa = load_q4_biased(q1, s1, f, c, c0, fm, cm, H, ng, GROUP, WIDEN)
            b_lo, b_hi, sb = load_q4_biased(q3, s3, f, c, c0, fm, cm, H, ng, GROUP, WIDEN)
            x_lo = tl.load(x_ptr + tok[None, :] * stride_x + (2 * c)[:, None], mask=match[None, :] & cm[:, None],
                           other=0.0)
            x_hi = tl.load(x_ptr + tok[None, :] * stride_x + (2 * c + 1)[:, None], mask=match[None, :] & cm[:, None],
                           other=0.0)
            if WIDEN:
                x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
            bias = 136.0 * (tl.sum(x_lo.to(tl.float32), axis=0) + tl.sum(x_hi.to(tl.float32), axis=0))   # [BLOCK_R]
            ta = tl.dot(a_hi, x_hi, tl.dot(a_lo, x_lo))
            tb = tl.dot(b_hi, x_hi, tl.dot(b_lo, x_lo))
            g += (ta - bias[None, :]) * sa[:, None]
            u += (tb - bias[None, :]) * sb[:, None]
    else:
        # quantized slot: dequantize each tile in registers, rounded once to x's dtype as
        # expert_store.quant.dequantize does; int4 runs over packed bytes, the even
        # columns' x against the low nibbles and the odd columns' against the high ones
        BLOCK_C: tl.constexpr = BLOCK_H // DIV
        sbase = slot.to(tl.int64) * scale_stride
        ng = (H + GROUP - 1) // GROUP
        q1, q3 = w1_ptr + base + off1, w3_ptr + base + off3
        s1, s3 = s_ptr + sbase + soff1, s_ptr + sbase + soff3
        for c0 in range(h_lo // DIV, h_hi // DIV, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)                                     # stored column
            cm = c < h_hi // DIV
            a_lo, a_hi = load_q(q1, s1, f, c, c0, fm, cm, H, ng, QBITS, GROUP, BLOCK_C)
            b_lo, b_hi = load_q(q3, s3, f, c, c0, fm, cm, H, ng, QBITS, GROUP, BLOCK_C)
            x_lo = tl.load(x_ptr + tok[None, :] * stride_x + (DIV * c)[:, None],
                           mask=match[None, :] & cm[:, None], other=0.0)        # [BLOCK_C, BLOCK_R]
            if WIDEN:
                x_lo = x_lo.to(tl.float32)
            else:
                a_lo, b_lo = a_lo.to(x_lo.dtype), b_lo.to(x_lo.dtype)
            g = tl.dot(a_lo, x_lo, g)
            u = tl.dot(b_lo, x_lo, u)
            if DIV == 2:
                x_hi = tl.load(x_ptr + tok[None, :] * stride_x + (DIV * c + 1)[:, None],
                               mask=match[None, :] & cm[:, None], other=0.0)
                if WIDEN:
                    x_hi = x_hi.to(tl.float32)
                else:
                    a_hi, b_hi = a_hi.to(x_hi.dtype), b_hi.to(x_hi.dtype)
                g = tl.dot(a_hi, x_hi, g)
                u = tl.dot(b_hi, x_hi, u)
    out_mask = match[None, :] & (f[:, None] < Fd)
    if SPLIT == 1:
        act = g * tl.sigmoid(g) * u                                # SiLU(g) * u  [BLOCK_F, BLOCK_R]
        tl.store(act_ptr + r[None, :] * Fd + f[:, None], act.to(act_ptr.dtype.element_ty), mask=out_mask)
    else:                       # partial sums [SPLIT, 2, R, F]: the caller adds them and applies SiLU
        pg = part_ptr + (split * 2 * R + r[None, :]).to(tl.int64) * Fd + f[:, None]
        tl.store(pg, g, mask=out_mask)
        tl.store(pg + R * Fd, u, mask=out_mask)


@triton.jit
def moe_down(act_ptr, ids_ptr, wts_ptr, slot_ptr, w2_ptr, y_ptr, R, H, Fd, slot_stride, off2, f_per_split,
             s_ptr, scale_stride, soff2, WIDEN: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr,
             DIV: tl.constexpr, POST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_F: tl.constexpr):
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
    elif POST:
        BLOCK_C: tl.constexpr = BLOCK_F // 2
        sbase = slot.to(tl.int64) * scale_stride + soff2
        ng = (Fd + GROUP - 1) // GROUP
        dm = d < H
        for c0 in range(f_lo // 2, (f_lo + f_per_split) // 2, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = (c < Fd // 2) & (c < (f_lo + f_per_split) // 2)
            w_lo, w_hi, sw = load_q4_biased(w2_ptr + base, s_ptr + sbase, d, c, c0, dm, cm, Fd, ng, GROUP, WIDEN)
            a_lo = tl.load(act_ptr + r[None, :] * Fd + (2 * c)[:, None], mask=match[None, :] & cm[:, None], other=0.0)
            a_hi = tl.load(act_ptr + r[None, :] * Fd + (2 * c + 1)[:, None], mask=match[None, :] & cm[:, None],
                           other=0.0)
            if WIDEN:
                a_lo, a_hi = a_lo.to(tl.float32), a_hi.to(tl.float32)
            else:
                a_lo, a_hi = a_lo.to(tl.bfloat16), a_hi.to(tl.bfloat16)
            bias = 136.0 * (tl.sum(a_lo.to(tl.float32), axis=0) + tl.sum(a_hi.to(tl.float32), axis=0))
            t = tl.dot(w_hi, a_hi, tl.dot(w_lo, a_lo))
            acc += (t - bias[None, :]) * sw[:, None]
    else:
        BLOCK_C: tl.constexpr = BLOCK_F // DIV
        sbase = slot.to(tl.int64) * scale_stride + soff2
        ng = (Fd + GROUP - 1) // GROUP
        dm = d < H
        for c0 in range(f_lo // DIV, (f_lo + f_per_split) // DIV, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = (c < Fd // DIV) & (c < (f_lo + f_per_split) // DIV)
            w_lo, w_hi = load_q(w2_ptr + base, s_ptr + sbase, d, c, c0, dm, cm, Fd, ng, QBITS, GROUP, BLOCK_C)
            at = tl.load(act_ptr + r[None, :] * Fd + (DIV * c)[:, None], mask=match[None, :] & cm[:, None],
                         other=0.0)
            if WIDEN:
                at = at.to(tl.float32)
            else:
                w_lo = w_lo.to(act_ptr.dtype.element_ty)
            acc = tl.dot(w_lo, at.to(w_lo.dtype), acc)
            if DIV == 2:
                at = tl.load(act_ptr + r[None, :] * Fd + (DIV * c + 1)[:, None], mask=match[None, :] & cm[:, None],
                             other=0.0)
                if WIDEN:
                    at = at.to(tl.float32)
                else:
                    w_hi = w_hi.to(act_ptr.dtype.element_ty)
                acc = tl.dot(w_hi, at.to(w_hi.dtype), acc)
    scale = tl.load(wts_ptr + r, mask=match, other=0.0)
    acc = acc * scale[None, :]
    tl.store(y_ptr + (split * R + r[None, :]) * H + d[:, None], acc,
             mask=match[None, :] & (d[:, None] < H))


@triton.jit
def q4_row_dot(q_ptr, s_ptr, rows, row_mask, c0, ncols, ngroups, x_ptr, GROUP: tl.constexpr,
               BLOCK_C: tl.constexpr, UNIT: tl.constexpr = False):
    """sum over the stored columns [c0, c0 + BLOCK_C) of w[row, :] * x for an int4 matrix, one
    fp32 per row: [BLOCK_ROWS]. No tensor cores: each weight is used once at one token, so a
    multiply-add per weight is all the work, and the tile goes straight from the load into ALU
    code. Nibbles become floats through 2^23's mantissa (exact); the group scale multiplies each
    group's partial sum, not each weight. With UNIT, a nibble n becomes 1 + n / 16 instead (its
    bits shifted into the top of 1.0's mantissa: a shift and one logic op, no subtraction), and
    each group's sum is corrected once: sum (n - 8) x = 16 sum (1 + n/16) x - 24 sum x."""
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < ncols // 2
    m = row_mask[:, None] & cm[None, :]
    b = tl.load(q_ptr + rows[:, None].to(tl.int64) * (ncols // 2) + c[None, :], mask=m, other=0).to(tl.int32)
    x_lo = tl.load(x_ptr + 2 * c, mask=cm, other=0.0).to(tl.float32)              # [BLOCK_C]
    x_hi = tl.load(x_ptr + 2 * c + 1, mask=cm, other=0.0).to(tl.float32)
    if UNIT:
        ONE: tl.constexpr = 0x3F800000                                            # 1.0
        lo = (((b << 19) & 0x780000) | ONE).to(tl.float32, bitcast=True)          # 1 + n_even / 16
        hi = (((b << 15) & 0x780000) | ONE).to(tl.float32, bitcast=True)          # 1 + n_odd / 16
    else:
        MAGIC: tl.constexpr = 0x4B000000                                          # 2.0 ** 23
        lo = ((b & 0xF) | MAGIC).to(tl.float32, bitcast=True) - 8388616.0         # q_even (2^23 + 8)
        hi = ((b >> 4) | MAGIC).to(tl.float32, bitcast=True) - 8388616.0          # q_odd
    p = lo * x_lo[None, :] + hi * x_hi[None, :]                                   # [ROWS, BLOCK_C]
    GC: tl.constexpr = GROUP // 2                                                 # stored columns per group
    if GC >= BLOCK_C:                          # the tile lies inside one group: one scale per row
        in_range = rows * 0 + c0 < ncols // 2
        sc = tl.load(s_ptr + rows.to(tl.int64) * ngroups + (c0 * 2) // GROUP, mask=row_mask & in_range,
                     other=0.0).to(tl.float32)
        dot = tl.sum(p, axis=1)
        if UNIT:
            dot = 16.0 * dot - 24.0 * tl.sum(x_lo + x_hi, axis=0)
        return dot * sc
    else:                                      # BLOCK_C / GC groups: a partial sum per group
        NG: tl.constexpr = BLOCK_C // GC
        ROWS: tl.constexpr = p.shape[0]
        part = tl.sum(tl.reshape(p, (ROWS, NG, GC)), axis=2)                       # [ROWS, NG]
        if UNIT:
            sx = tl.sum(tl.reshape(x_lo + x_hi, (NG, GC)), axis=1)                 # [NG]
            part = 16.0 * part - 24.0 * sx[None, :]
        gi = (c0 * 2) // GROUP + tl.arange(0, NG)
        sc = tl.load(s_ptr + rows[:, None].to(tl.int64) * ngroups + gi[None, :],
                     mask=row_mask[:, None] & (gi[None, :] < ngroups), other=0.0).to(tl.float32)
        return tl.sum(part * sc, axis=1)


@triton.jit
def moe_up_gemv4(x_ptr, ids_ptr, slot_ptr, w1_ptr, w3_ptr, act_ptr, H, Fd, stride_x, slot_stride, off1, off3,
                 s_ptr, scale_stride, soff1, soff3, h_per_split, part_ptr, R, K: tl.constexpr,
                 GROUP: tl.constexpr, SPLIT: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr,
                 UNIT: tl.constexpr = False):
    """The up kernel for int4 slots at a token or two: one program per (token, choice) row, F
    block and share of H, a matrix-vector product (`q4_row_dot`). grid (R, F / BLOCK_F, SPLIT)."""
    r = tl.program_id(0)
    e = tl.load(ids_ptr + r)
    if e < 0:
        return
    slot = tl.load(slot_ptr + e)
    if slot < 0:
        return
    tok = r // K
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < Fd
    split = tl.program_id(2)
    h_lo = split * h_per_split
    h_hi = tl.minimum(H, h_lo + h_per_split)
    base = slot.to(tl.int64) * slot_stride
    sbase = slot.to(tl.int64) * scale_stride
    ng = (H + GROUP - 1) // GROUP
    BLOCK_C: tl.constexpr = BLOCK_H // 2
    g = tl.zeros((BLOCK_F,), dtype=tl.float32)
    u = tl.zeros((BLOCK_F,), dtype=tl.float32)
    xr = x_ptr + tok * stride_x
    for c0 in range(h_lo // 2, h_hi // 2, BLOCK_C):
        g += q4_row_dot(w1_ptr + base + off1, s_ptr + sbase + soff1, f, fm, c0, H, ng, xr, GROUP, BLOCK_C, UNIT)
        u += q4_row_dot(w3_ptr + base + off3, s_ptr + sbase + soff3, f, fm, c0, H, ng, xr, GROUP, BLOCK_C, UNIT)
    if SPLIT == 1:
        act = g * tl.sigmoid(g) * u
        tl.store(act_ptr + r * Fd + f, act.to(act_ptr.dtype.element_ty), mask=fm)
    else:
        pg = part_ptr + (split * 2 * R + r).to(tl.int64) * Fd + f
        tl.store(pg, g, mask=fm)
        tl.store(pg + R * Fd, u, mask=fm)


@triton.jit
def moe_down_gemv4(act_ptr, ids_ptr, wts_ptr, slot_ptr, w2_ptr, y_ptr, R, H, Fd, slot_stride, off2, f_per_split,
                   s_ptr, scale_stride, soff2, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
                   UNIT: tl.constexpr = False):
    """The down kernel for int4 slots at a token or two: one program per (token, choice) row,
    H block and share of F; y[split, r, d] = weight_r * sum_f W2[d, f] act[r, f].
    grid (R, H / BLOCK_D, SPLIT)."""
    r = tl.program_id(0)
    e = tl.load(ids_ptr + r)
    if e < 0:
        return
    slot = tl.load(slot_ptr + e)
    if slot < 0:
        return
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < H
    split = tl.program_id(2)
    f_lo = split * f_per_split
    f_hi = tl.minimum(Fd, f_lo + f_per_split)
    base = slot.to(tl.int64) * slot_stride + off2
    sbase = slot.to(tl.int64) * scale_stride + soff2
    ng = (Fd + GROUP - 1) // GROUP
    BLOCK_C: tl.constexpr = BLOCK_F // 2
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ar = act_ptr + r.to(tl.int64) * Fd
    for c0 in range(f_lo // 2, f_hi // 2, BLOCK_C):
        acc += q4_row_dot(w2_ptr + base, s_ptr + sbase, d, dm, c0, Fd, ng, ar, GROUP, BLOCK_C, UNIT)
    acc = acc * tl.load(wts_ptr + r)
    tl.store(y_ptr + (split * R + r).to(tl.int64) * H + d, acc, mask=dm)


@triton.jit
def silu_mul_parts(part_ptr, act_ptr, R, Fd, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """act[r] = SiLU(g) * u of the up kernel's partial sums over its H splits
    (part [SPLIT, 2, R, F] float32 -> act [R, F]). grid (R, F / BLOCK)."""
    r = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = f < Fd
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        g += tl.load(part_ptr + ((2 * s) * R + r).to(tl.int64) * Fd + f, mask=m, other=0.0)
        u += tl.load(part_ptr + ((2 * s + 1) * R + r).to(tl.int64) * Fd + f, mask=m, other=0.0)
    act = g * tl.sigmoid(g) * u
    tl.store(act_ptr + r.to(tl.int64) * Fd + f, act.to(act_ptr.dtype.element_ty), mask=m)


@triton.jit
def moe_reduce(y_ptr, ids_ptr, slot_ptr, res_ptr, out_ptr, T, H, SPLIT, K: tl.constexpr, HAS_RES: tl.constexpr,
               BLOCK: tl.constexpr):
    """out[t] = sum over the down kernel's F splits s and the token's choices j of y[s, t, j]
    (y [SPLIT, T, K, H] float32), rounded to out's dtype, then + res[t] when given (rounded
    again, as `h + moe` is). Choices the gating dropped (id -1) or whose expert has no slot were
    never written by the down kernels and are skipped. grid (T, H / BLOCK)."""
    t = tl.program_id(0)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = d < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.load(ids_ptr + t * K + j)
        slot = tl.load(slot_ptr + tl.maximum(e, 0))
        if (e >= 0) & (slot >= 0):
            for s in range(SPLIT):
                acc += tl.load(y_ptr + ((s * T + t) * K + j).to(tl.int64) * H + d, mask=m, other=0.0)
    dt = out_ptr.dtype.element_ty
    out = acc.to(dt)
    if HAS_RES:
        out = (tl.load(res_ptr + t.to(tl.int64) * H + d, mask=m, other=0.0).to(tl.float32) + out.to(tl.float32)).to(dt)
    tl.store(out_ptr + t.to(tl.int64) * H + d, out, mask=m)
