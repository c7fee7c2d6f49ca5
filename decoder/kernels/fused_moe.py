"""Fused MoE for small batches: every routed expert of one layer, read through a slot table.

    out[t] = sum_j w[t, j] * W2[s] (SiLU(W1[s] x[t]) * (W3[s] x[t])),   s = slot_of[ids[t, j]]

The weights stay where the expert cache (or the resident pool) keeps them: an `ExpertBank`
says where expert slot s's w1/w3 ([F, H]) and w2 ([H, F]) start in flat tensors, and
`slot_of[E]` (a row of the device slot table, int32, -1 = not on the GPU) maps the layer's
experts to slots. Nothing is read back to the host, so the call can be captured in a CUDA
graph and replayed after the cache moved experts around (only the table changes).

Two Triton kernels on CUDA (`_kernels`):
- up:   grid (E, F / BLOCK_F, UP_SPLIT). A program takes one expert and one block of F rows,
        returns at once when no token chose that expert (or it has no slot), else multiplies
        the block of W1 and W3 with every token that chose it (tl.dot over [BLOCK_F, H] x
        [H, R]) and stores SiLU(g) * u for those (token, choice) rows (with UP_SPLIT > 1 each
        program covers a share of H and stores partial g, u; `silu_mul_parts` adds them and
        applies SiLU). Each used expert's weights are read once per call, whatever the number
        of tokens.
- down: grid (E, H / BLOCK_D, SPLIT). The same for W2 over a SPLIT-th of F, scaled by the
        routing weight; partial sums go to their own plane of an fp32 buffer and `moe_reduce`
        adds the planes and each token's choices (and the residual stream, for the decode
        step) in a fixed order, so the result does not depend on scheduling (no atomics).
`ids == -1` (a choice the gating dropped) contributes nothing. Slots may hold int8 / int4
experts as the store packs them (group-wise values + fp16 scales): the kernels dequantize each
tile in registers, rounded once to the compute dtype like expert_store.quant.dequantize, so a
quantized expert is read at its stored size (a quarter of bf16 for int4).

Everywhere else (CPU, fp32, no Triton) `moe_torch` computes the same with torch ops, one
matmul chain per used expert: it reads the routing and the slot row on the host. It is also
the reference the kernels are tested against (under `TRITON_INTERPRET=1` on the CPU; the
interpreter has no bf16 arithmetic, so the kernels then widen bf16 tiles to fp32 first).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertBank:
    """Where the experts of one layer live: expert slot s has
    w1 = w1_flat[s * slot_stride + off1 :][: F * H].view(F, H), likewise w3 (off3) and
    w2 = w2_flat[s * slot_stride + off2 :][: H * F].view(H, F). Offsets and strides are in
    elements of the compute dtype. The three flat tensors may be one (a cache pool whose slots
    hold w1, w3, w2 back to back) or three (stacked [E, F, H] parameters)."""

    w1: torch.Tensor                 # 1-D: compute dtype; quantized: the int8 / packed-int4 values
    w3: torch.Tensor
    w2: torch.Tensor
    slot_stride: int
    off1: int
    off3: int
    off2: int
    ffn: int                         # F
    hidden: int                      # H
    # quantized slots (bits 8 / 4, expert_store.quant's group-wise layout read in place): fp16
    # scales [rows, in / group_size] of each matrix at scales[s * scale_stride + soffN]
    bits: int = 16
    group_size: int = 0
    scales: torch.Tensor | None = None
    scale_stride: int = 0
    soff1: int = 0
    soff3: int = 0
    soff2: int = 0

    @classmethod
    def stacked(cls, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> "ExpertBank":
        """From stacked expert tensors w1, w3 [E, F, H] and w2 [E, H, F] (slot = expert)."""
        E, Fd, H = w1.shape
        for t in (w1, w3, w2):
            if not t.is_contiguous():
                raise ValueError("stacked expert tensors must be contiguous")
        return cls(w1.view(-1), w3.view(-1), w2.view(-1), Fd * H, 0, 0, 0, Fd, H)

    @classmethod
    def pool(cls, pool: torch.Tensor, dtype: torch.dtype, offsets: dict[str, int],
             ffn: int, hidden: int) -> "ExpertBank":
        """From a uint8 pool [slots, slot_bytes] whose slots hold w1, w3, w2 at byte `offsets`."""
        item = torch.empty((), dtype=dtype).element_size()
        if pool.dim() != 2 or pool.dtype != torch.uint8 or pool.shape[1] % item:
            raise ValueError("pool must be uint8 [slots, slot_bytes] with whole elements per slot")
        for name in ("w1", "w3", "w2"):
            if offsets[name] % item:
                raise ValueError(f"{name} starts at byte {offsets[name]}, not a multiple of {item}")
        flat = pool.view(-1).view(dtype)
        return cls(flat, flat, flat, pool.shape[1] // item, offsets["w1"] // item, offsets["w3"] // item,
                   offsets["w2"] // item, ffn, hidden)

    @classmethod
    def quantized_pool(cls, pool: torch.Tensor, bits: int, group_size: int, offsets: dict[str, int],
                       scale_offsets: dict[str, int], ffn: int, hidden: int) -> "ExpertBank":
        """From a uint8 pool [slots, slot_bytes] whose slots hold raw int8/int4 expert payloads
        (expert_store.quant layout): values of w1/w3/w2 at byte `offsets`, fp16 scales at byte
        `scale_offsets`. Both in-dimensions and the group size must be even for int4."""
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if pool.dim() != 2 or pool.dtype != torch.uint8 or pool.shape[1] % 2:
            raise ValueError("pool must be uint8 [slots, slot_bytes] with an even slot size")
        if bits == 4 and (ffn % 2 or hidden % 2 or group_size % 2):
            raise ValueError("int4 slots need even in-dimensions and group size")
        if any(v % 2 for v in scale_offsets.values()):
            raise ValueError("fp16 scales must start at even byte offsets")
        flat = pool.view(-1)
        q = flat if bits == 4 else flat.view(torch.int8)
        return cls(q, q, q, pool.shape[1], offsets["w1"], offsets["w3"], offsets["w2"], ffn, hidden,
                   bits=bits, group_size=group_size, scales=flat.view(torch.float16), scale_stride=pool.shape[1] // 2,
                   soff1=scale_offsets["w1"] // 2, soff3=scale_offsets["w3"] // 2, soff2=scale_offsets["w2"] // 2)

    def matrices(self, slot: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1 [F, H], w3 [F, H], w2 [H, F]) of `slot`: views, or for quantized slots the
        matrices dequantized into `dtype` (expert_store.quant.dequantize: the same values)."""
        Fd, H, base = self.ffn, self.hidden, slot * self.slot_stride
        if self.bits == 16:
            return (self.w1[base + self.off1: base + self.off1 + Fd * H].view(Fd, H),
                    self.w3[base + self.off3: base + self.off3 + Fd * H].view(Fd, H),
                    self.w2[base + self.off2: base + self.off2 + H * Fd].view(H, Fd))
        from expert_store.quant import dequantize

        out = []
        sbase = slot * self.scale_stride
        for off, soff, (rows, cols) in ((self.off1, self.soff1, (Fd, H)), (self.off3, self.soff3, (Fd, H)),
                                        (self.off2, self.soff2, (H, Fd))):
            stored = cols if self.bits == 8 else cols // 2
            ng = -(-cols // self.group_size)
            q = self.w1[base + off: base + off + rows * stored].view(rows, stored)
            sc = self.scales[sbase + soff: sbase + soff + rows * ng].view(rows, ng)
            out.append(dequantize(q, sc, self.bits, self.group_size, (rows, cols), dtype or torch.bfloat16))
        return out[0], out[1], out[2]


def fused_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, slot_of: torch.Tensor,
              bank: ExpertBank, residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H]; weights [T, k] float32; ids [T, k] int (-1 = none); slot_of [E] int32 -> [T, H]
    (written into `out` when given), plus `residual` [T, H] when given (the residual stream:
    `residual + moe`, rounded as that sum is).

    The Triton kernels where they apply (CUDA, bf16/fp16, Triton importable), else `moe_torch`.
    Every expert `ids` names must have a slot (slot_of >= 0); the kernels skip one that has none.
    """
    if use_kernels(x):
        return moe_triton(x, weights, ids, slot_of, bank, residual=residual, out=out)
    y = moe_torch(x, weights, ids, slot_of, bank)
    if residual is not None:
        y = residual + y
    if out is None:
        return y
    return out.copy_(y)


def use_kernels(x: torch.Tensor) -> bool:
    """True when `fused_moe` runs the Triton kernels for `x`."""
    if _interpreting():
        return _kernels() is not None
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _kernels() is not None


def moe_torch(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, slot_of: torch.Tensor,
              bank: ExpertBank, experts: list[int] | None = None) -> torch.Tensor:
    """The same sum with torch ops, one expert at a time (reads routing and slots on the host;
    `experts`, when the caller already knows the used ones, saves the routing read).
    Accumulates in float32, like the kernels."""
    T, k = ids.shape
    flat_ids = ids.reshape(-1)
    if experts is None:
        experts = sorted(int(e) for e in flat_ids.unique().tolist() if e >= 0)
    slots = slot_of.tolist()
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    w = weights.reshape(-1).float()
    for e in experts:
        s = slots[e]
        if s < 0:
            raise RuntimeError(f"expert {e} is routed to but has no GPU slot")
        rows = (flat_ids == e).nonzero().flatten()            # [R_e] positions t * k + j
        tok = rows // k
        w1, w3, w2 = bank.matrices(s, x.dtype)
        xs = x[tok]                                           # [R_e, H]
        y = F.linear(F.silu(F.linear(xs, w1)) * F.linear(xs, w3), w2)
        out.index_add_(0, tok, y.float() * w[rows, None])
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def _kernels():
    """(up, down) Triton kernels (decoder/kernels/triton_moe.py), or None when Triton cannot be
    imported."""
    try:
        from decoder.kernels import triton_moe
    except Exception as e:  # pragma: no cover - depends on the install
        log.info("triton unavailable (%s): fused MoE runs the torch path", e)
        return None
    return triton_moe.moe_up, triton_moe.moe_down


@functools.lru_cache(maxsize=1)
def _finish_kernels():
    """(SiLU of split partial sums, sum of the down kernels' planes + residual) Triton kernels."""
    from decoder.kernels import triton_moe

    return triton_moe.silu_mul_parts, triton_moe.moe_reduce


@functools.lru_cache(maxsize=1)
def _gemv_kernels():
    """(up, down) int4 matrix-vector kernels (decoder/kernels/triton_moe.py)."""
    from decoder.kernels import triton_moe

    return triton_moe.moe_up_gemv4, triton_moe.moe_down_gemv4


def gemv_fits(group: int, block: int) -> bool:
    """Whether a tile of `block` values along a row suits the int4 matrix-vector kernels: it
    lies inside one quantization group, or holds whole groups of a power-of-two size."""
    gc, bc = group // 2, block // 2
    return group % 2 == 0 and bc > 0 and (gc % bc == 0 or (bc % gc == 0 and gc & (gc - 1) == 0))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the two kernels: up tiles W1/W3 as [block_f, block_h], down tiles W2 as
    [block_d, block_fd]. `benchmarks/moe_kernel.py` sweeps them on a GPU; the defaults are its
    pick for the benchmark shapes (benchmarks/README.md, "The fused MoE kernels")."""

    block_f: int = 64
    block_h: int = 128
    block_d: int = 64
    block_fd: int = 128
    up_warps: int = 4
    up_stages: int = 3
    down_warps: int = 4
    down_stages: int = 3
    # int4 slots: multiply by the group scale after the product instead of dequantizing each
    # weight (fewer instructions per weight; rounds differently from quant.dequantize, within
    # bf16 tolerance). Applies when both kernels' tiles lie inside one group, x is bf16.
    int4_post_scale: bool = False
    # parallelism: the up kernel splits H over `up_split` programs per F block (partial sums added
    # after it, then SiLU), the down kernel splits F until its programs cover `down_programs`
    # per SM; more programs keep more loads in flight when a kernel is latency-bound
    up_split: int = 1
    down_programs: int = 2
    # int4 slots: matrix-vector kernels (`moe_up_gemv4`, `moe_down_gemv4`: one program per
    # (token, choice) row, no tensor cores, the group scale per partial sum) instead of the
    # tile products; for a token or two, where a tensor-core tile is mostly padding and the
    # dequantized tile has to be staged for the dot. Applies when each tile holds whole groups
    # or lies inside one (`gemv_fits`).
    gemv: bool = False
    # the matrix-vector kernels with each nibble n taken as the float 1 + n / 16 (a shift and one
    # logic op per value instead of a logic op and a subtraction) and each group's sum corrected
    # once (`q4_row_dot`): fewer instructions per weight where the kernels are instruction-bound
    gemv_unit: bool = False


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_file(device_name: str) -> Path:
    """Where the tuned tiles of one GPU model live (written by benchmarks/moe_kernel.py)."""
    return CONFIG_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def config_key(bits: int, hidden: int, ffn: int) -> str:
    return f"bits={bits},hidden={hidden},ffn={ffn}"


@functools.lru_cache(maxsize=None)
def tuned_table(device_name: str) -> dict:
    """One GPU model's tuned tiles {config_key: {tokens: tiles}} as its config file holds them
    (read once; {} when there is none)."""
    path = config_file(device_name)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def tuned_config(device: torch.device, bank: ExpertBank, tokens: int) -> KernelConfig:
    """The tiles measured fastest for this GPU model, precision, layer shape and the smallest
    tuned token count >= `tokens` (else the largest); the defaults where nothing was tuned."""
    if device.type != "cuda":
        return KernelConfig()
    return pick_config(tuned_table(torch.cuda.get_device_name(device)), bank, tokens)


def pick_config(tuned: dict, bank: ExpertBank, tokens: int) -> KernelConfig:
    """`tuned_config`'s choice from one GPU model's table {config_key: {tokens: tiles}}."""
    table = tuned.get(config_key(bank.bits, bank.hidden, bank.ffn), {})
    if not table:
        return KernelConfig()
    counts = sorted(int(t) for t in table)
    pick = next((t for t in counts if t >= tokens), counts[-1])
    return KernelConfig(**table[str(pick)])


def moe_triton(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, slot_of: torch.Tensor,
               bank: ExpertBank, config: KernelConfig | None = None, residual: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """`fused_moe` through the Triton kernels (no host read; capturable): up (+ SiLU of its
    split partial sums), down, and one kernel adding the down kernels' planes and choices (and
    the residual). `config`: the tiles (default: `tuned_config` for x's device)."""
    import triton

    cfg = config or tuned_config(x.device, bank, x.shape[0])
    up, down = _kernels()
    T, H = x.shape
    k = ids.shape[1]
    R = T * k
    E = slot_of.shape[0]
    Fd = bank.ffn
    widen = _interpreting()
    if x.stride(1) != 1:
        x = x.contiguous()
    ids_flat = ids.reshape(-1)                  # int32 or int64: the kernels compare it with the expert
    wts = weights.reshape(-1).float()
    slot_of = slot_of.to(torch.int32)
    BLOCK_R = max(16, triton.next_power_of_2(R))
    BLOCK_F, BLOCK_H = cfg.block_f, cfg.block_h
    act = torch.empty(R, Fd, dtype=torch.float32 if widen else x.dtype, device=x.device)
    qbits = 0 if bank.bits == 16 else bank.bits
    scales = bank.scales if bank.scales is not None else wts          # any pointer when unused
    group = bank.group_size or 1
    div = 2 if qbits == 4 else 1          # values per stored byte along a row
    post = (cfg.int4_post_scale and qbits == 4 and group % BLOCK_H == 0 and group % cfg.block_fd == 0
            and (widen or x.dtype == torch.bfloat16))
    gemv = cfg.gemv and qbits == 4 and gemv_fits(group, BLOCK_H) and gemv_fits(group, cfg.block_fd)
    h_per_split = triton.cdiv(triton.cdiv(H, max(1, cfg.up_split)), BLOCK_H) * BLOCK_H
    split_h = triton.cdiv(H, h_per_split)
    part = torch.empty(split_h, 2, R, Fd, dtype=torch.float32, device=x.device) if split_h > 1 else act
    if gemv:
        y = _moe_gemv4(x, ids_flat, wts, slot_of, bank, cfg, act, part, h_per_split, split_h, k, group)
        return _reduce(y, ids_flat, slot_of, T, k, H, residual, out, x.dtype)
    up[(E, triton.cdiv(Fd, BLOCK_F), split_h)](x, ids_flat, slot_of, bank.w1, bank.w3, act, R, H, Fd, x.stride(0),
                                       bank.slot_stride, bank.off1, bank.off3, scales, bank.scale_stride,
                                       bank.soff1, bank.soff3, h_per_split, part, K=k, WIDEN=widen, QBITS=qbits,
                                       GROUP=group, DIV=div, POST=post, SPLIT=split_h,
                                       BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F, BLOCK_H=BLOCK_H, num_warps=cfg.up_warps,
                                       num_stages=cfg.up_stages)
    if split_h > 1:             # rows no token chose hold garbage here: the down kernel never reads them
        _silu_parts(part, act)
    BLOCK_D, BLOCK_FD = cfg.block_d, cfg.block_fd
    # split F so that the programs of the (at most min(E, R)) used experts cover every SM
    # `down_programs` times
    d_blocks = triton.cdiv(H, BLOCK_D)
    split, f_per_split = _down_split(cfg, H, Fd, min(E, R), d_blocks, x.device)
    y = torch.empty(split, R, H, dtype=torch.float32, device=x.device)     # unwritten rows: never read
    down[(E, d_blocks, split)](act, ids_flat, wts, slot_of, bank.w2, y, R, H, Fd, bank.slot_stride, bank.off2,
                               f_per_split, scales, bank.scale_stride, bank.soff2, WIDEN=widen, QBITS=qbits,
                               GROUP=group, DIV=div, POST=post, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, BLOCK_F=BLOCK_FD,
                               num_warps=cfg.down_warps, num_stages=cfg.down_stages)
    return _reduce(y, ids_flat, slot_of, T, k, H, residual, out, x.dtype)


def _silu_parts(part: torch.Tensor, act: torch.Tensor) -> None:
    """act [R, F] <- SiLU(g) * u of the up kernel's partial sums part [SPLIT, 2, R, F]."""
    import triton

    silu, _ = _finish_kernels()
    split, _, R, Fd = part.shape
    silu[(R, triton.cdiv(Fd, 1024))](part, act, R, Fd, SPLIT=split, BLOCK=1024, num_warps=4)


def _reduce(y: torch.Tensor, ids_flat: torch.Tensor, slot_of: torch.Tensor, T: int, k: int, H: int,
            residual: torch.Tensor | None, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """out [T, H] <- (residual +) the sum of the down kernels' planes y [SPLIT, T * k, H] over
    planes and each token's choices (rows of dropped or slot-less choices skipped)."""
    import triton

    _, reduce = _finish_kernels()
    if out is None:
        out = torch.empty(T, H, dtype=dtype, device=y.device)
    res = residual if residual is not None else out
    if res.stride(1) != 1 or res.stride(0) != H or out.stride(1) != 1 or out.stride(0) != H:
        raise ValueError("fused_moe's residual and out must be contiguous [T, H]")
    BLOCK = min(1024, triton.next_power_of_2(H))
    reduce[(T, triton.cdiv(H, BLOCK))](y, ids_flat, slot_of, res, out, T, H, y.shape[0], K=k,
                                       HAS_RES=residual is not None, BLOCK=BLOCK, num_warps=4)
    return out


def _down_split(cfg: KernelConfig, H: int, Fd: int, used: int, d_blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits of F, F per split) so that the down programs of `used` rows or experts cover
    every SM `cfg.down_programs` times."""
    import triton

    split = max(1, min(triton.cdiv(Fd, cfg.block_fd), triton.cdiv(cfg.down_programs * _sm_count(device), used * d_blocks)))
    f_per_split = triton.cdiv(triton.cdiv(Fd, split), cfg.block_fd) * cfg.block_fd
    return triton.cdiv(Fd, f_per_split), f_per_split


def _moe_gemv4(x: torch.Tensor, ids_flat: torch.Tensor, wts: torch.Tensor, slot_of: torch.Tensor, bank: ExpertBank,
               cfg: KernelConfig, act: torch.Tensor, part: torch.Tensor, h_per_split: int, split_h: int, k: int,
               group: int) -> torch.Tensor:
    """`moe_triton`'s up and down kernels for int4 slots as matrix-vector kernels, one program
    per (token, choice) row instead of per expert: returns the down planes y [SPLIT, R, H]."""
    import triton

    up, down = _gemv_kernels()
    T, H = x.shape
    R, Fd = ids_flat.shape[0], bank.ffn
    up[(R, triton.cdiv(Fd, cfg.block_f), split_h)](x, ids_flat, slot_of, bank.w1, bank.w3, act, H, Fd, x.stride(0),
                                                   bank.slot_stride, bank.off1, bank.off3, bank.scales,
                                                   bank.scale_stride, bank.soff1, bank.soff3, h_per_split, part, R,
                                                   K=k, GROUP=group, SPLIT=split_h, BLOCK_F=cfg.block_f,
                                                   BLOCK_H=cfg.block_h, UNIT=cfg.gemv_unit, num_warps=cfg.up_warps,
                                                   num_stages=cfg.up_stages)
    if split_h > 1:             # rows of dropped choices hold garbage here: the down kernel skips them
        _silu_parts(part, act)
    d_blocks = triton.cdiv(H, cfg.block_d)
    split, f_per_split = _down_split(cfg, H, Fd, R, d_blocks, x.device)
    y = torch.empty(split, R, H, dtype=torch.float32, device=x.device)     # unwritten rows: never read
    down[(R, d_blocks, split)](act, ids_flat, wts, slot_of, bank.w2, y, R, H, Fd, bank.slot_stride, bank.off2,
                               f_per_split, bank.scales, bank.scale_stride, bank.soff2, GROUP=group,
                               BLOCK_D=cfg.block_d, BLOCK_F=cfg.block_fd, UNIT=cfg.gemv_unit, num_warps=cfg.down_warps,
                               num_stages=cfg.down_stages)
    return y
