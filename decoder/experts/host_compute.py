"""A missed expert computed on the host's cores, from the bytes the host tier holds.

When a token's expert is not in a GPU slot, copying it costs its whole payload over the link
(raw bytes at ~55 GB/s on an H200 host), while computing it for one token on the host reads the
same bytes from DRAM once (~60-96 GB/s on 16 cores) and moves only the hidden state and the
result (a few KB) across the link (llama.cpp's --n-cpu-moe, Fiddler, HybriMoE, KTransformers).
Doing both at once, for different misses, beats either. This module holds the host side:

- `HostExpert`: one expert in the form torch's CPU kernels read, built once from the host
  tier's raw payload (`expert_store.quant.tensors_from_raw` views), in one of these paths:
    int4pack: `_convert_weight_to_int4pack_for_cpu` once, then `_weight_int4pack_mm_for_cpu`
          (group scales with zero point 0: exactly the store's (q - 8) * scale); needs a group
          size of 32/64/128/256 dividing the input and an output size divisible by 16;
    int8pack: `_weight_int8pack_mm` (weight-only int8 with one scale per output row) once per
          quantization group, the values repacked group-major [G, N, gs] once: the store's
          int8 is group-wise, the kernel per-channel; partial sums added in float32;
    int8row: an int4 or int8 expert requantized once to per-row int8 for one
          `_weight_int8pack_mm` call per matrix (twice int4's bytes; the added error is bounded
          in `requantize_rows`: at most 1/254 of a row's largest weight, under 1/36 of an int4
          step): torch's int8 CPU kernel reads bytes several times faster than its int4
          kernel at one token, so on a host where it wins it beats reading half the bytes;
    dequant: dequantize + F.linear per call (also what a shape the kernels refuse takes);
    bf16: the host slot's bytes used in place by F.linear (nothing repacked or kept).
  "native" (the default) is the stored precision's own kernel (int4pack, int8pack) where it
  takes the shape, else dequant: exact against the store's dequantization. `kernel` says
  which path a matrix took. Numerics follow the GPU path's expert
  (decoder/experts/provider.py ExpertWeights.forward): y = (SiLU(x w1^T) * (x w3^T)) w2^T in
  x's dtype; the int kernels apply the scale after the integer dot product instead of
  rounding each dequantized weight to x's dtype first.
- `HostExperts`: the packed experts (an LRU bounded by `pack_bytes`, counting what each path
  keeps: int8row twice int4's bytes), `workers` worker threads taking jobs from one queue (each
  on threads // workers intra-op threads: torch's thread count is per calling thread in its
  OpenMP build; one worker by default, several run a layer's experts side by side through
  `submit_layer`), the path per precision (given, or the fastest of the candidates timed on
  the first expert of a kind: `calibration`), a packer thread that packs experts asked for
  ahead of use (packing an int4 Mixtral expert takes far longer than computing it, so a miss
  goes to the host only once its expert is packed), the EWMA seconds of one expert call
  (`cost`) and the expert calls queued (`backlog`).
- `MissRule`: per layer, which misses the host computes: list scheduling onto the copy link
  and the CPU's worker queues, each miss to the host only if it finishes there earlier than
  over the link by more than the hits a copy buys (the layer's measured reuse rate x one
  copy: a miss computed on the host leaves its expert off the GPU).
- `HostJob`: the host-computed experts of one layer for the decode step: their weighted sum
  [B, H] float32 in (pinned) host memory, brought to the device and added when done.
- `MissTokens`: an MoE observer telling the cache how many tokens each expert of a layer gets
  (it hears the routing before the block asks for experts) and the rule which experts a
  decode step uses (its reuse rate); a miss with more tokens than `max_tokens` (a prefill) is
  always copied: the CPU's batch-1 advantage is gone there.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from decoder.experts.copies import Ewma
from decoder.routing import MoEObserver

log = logging.getLogger(__name__)

MISS_COMPUTE = ("copy", "cpu", "auto")
INT4_GROUPS = (32, 64, 128, 256)    # group sizes _weight_int4pack_mm_for_cpu takes


def set_thread_count(n: int) -> None:
    """This thread's torch intra-op thread count, n. torch (OpenMP build) keeps it per thread
    (omp_set_num_threads), but a thread's first get_num_threads or parallel op first sets it
    to the value some thread last passed to set_num_threads (ATen's lazy per-thread init), so
    that first runs here, before the count is set."""
    torch.get_num_threads()
    torch.set_num_threads(int(n))


def cpu_kernels() -> dict[str, bool]:
    """Which of torch's weight-only CPU kernels this torch has."""
    def has(name: str) -> bool:
        try:
            getattr(torch.ops.aten, name)
            return True
        except (AttributeError, RuntimeError):
            return False
    return {"int8": has("_weight_int8pack_mm"),
            "int4": has("_weight_int4pack_mm_for_cpu") and has("_convert_weight_to_int4pack_for_cpu")}


# --------------------------------------------------------------------------------------------
# one matrix in a CPU kernel's form
# --------------------------------------------------------------------------------------------
class _Dense:
    """A dense matrix [N, K] (the host slot's bf16 bytes in place); cast to x's dtype per call
    when it differs, as the GPU path does."""

    kernel = "linear"

    def __init__(self, w: torch.Tensor, owned: bool = False) -> None:
        self.w = w
        self.nbytes = w.numel() * w.element_size() if owned else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w if self.w.dtype == x.dtype else self.w.to(x.dtype)
        return F.linear(x, w)


class _Dequant:
    """A quantized matrix the kernels do not take: dequantized to x's dtype per call (the
    packed bytes copied once, so nothing refers to the host slot afterwards)."""

    kernel = "dequant"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int, group: int, shape: tuple[int, int]) -> None:
        self.q, self.scales = q.clone(), scales.clone()
        self.bits, self.group, self.shape = bits, group, shape
        self.nbytes = self.q.numel() * self.q.element_size() + self.scales.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from expert_store.quant import dequantize

        return F.linear(x, dequantize(self.q, self.scales, self.bits, self.group, self.shape, x.dtype))


class _Int8:
    """Group-wise int8 [N, K] as G group-major blocks [G, N, gs] for `_weight_int8pack_mm`
    (per-row scales): y = sum_g x_g Q_g^T * s_g, the partial sums added in float32."""

    kernel = "int8pack"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group: int) -> None:
        N, K = q.shape
        self.G, self.gs, self.N = K // group, group, N
        self.q = q.view(N, self.G, group).transpose(0, 1).contiguous()     # [G, N, gs] int8
        self.scales16 = scales.t().contiguous()                             # [G, N] fp16
        self._scales: dict[torch.dtype, torch.Tensor] = {}
        self.nbytes = self.q.numel() + self.scales16.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self._scales.get(x.dtype)
        if s is None:
            s = self._scales[x.dtype] = self.scales16.to(x.dtype)          # the kernel wants x's dtype
        T = x.shape[0]
        if self.G == 1:
            return torch._weight_int8pack_mm(x.contiguous(), self.q[0], s[0])
        xg = x.view(T, self.G, self.gs).transpose(0, 1).contiguous()        # [G, T, gs]
        acc = torch.zeros(T, self.N, dtype=torch.float32)
        for g in range(self.G):
            acc.add_(torch._weight_int8pack_mm(xg[g], self.q[g], s[g]))
        return acc.to(x.dtype)


class _Int4:
    """Group-wise int4 [N, K] in `_weight_int4pack_mm_for_cpu`'s packed layout; scale and zero
    point (0) per group and output row: (q - 8) * scale, the store's dequantization."""

    kernel = "int4pack"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group: int, K: int) -> None:
        self.packed = int4pack_for_cpu(q, K)
        self.scales16 = scales.t().contiguous()                             # [G, N] fp16
        self.group = group
        self._sz: dict[torch.dtype, torch.Tensor] = {}
        self.nbytes = self.packed.numel() * self.packed.element_size() + self.scales16.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sz = self._sz.get(x.dtype)
        if sz is None:
            s = self.scales16.to(x.dtype)
            sz = self._sz[x.dtype] = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()   # [G, N, 2]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group, sz)


def int4pack_for_cpu(q: torch.Tensor, K: int) -> torch.Tensor:
    """The store's int4 values (uint8 [N, K/2], even column in the low nibble, offset 8) in
    `_weight_int4pack_mm_for_cpu`'s layout: what `_convert_weight_to_int4pack_for_cpu` makes of
    them unpacked to int32 [N, K]. That layout depends on the CPU torch runs on; where it is the
    AVX-512 one (blocks of 64 rows; per block and column, 32 bytes holding rows j and j + 32 in
    the low and high nibble: `_bytes_layout_matches`) and N is a multiple of 64 it is built
    here with byte operations, several times faster than the op's int32 detour; otherwise the op."""
    N = q.shape[0]
    if N % 64 or K % 2 or not _bytes_layout_matches():
        return _int4pack_op(q, K)
    return _int4pack_bytes(q, K)


def _int4pack_op(q: torch.Tensor, K: int) -> torch.Tensor:
    N = q.shape[0]
    vals = torch.stack([(q & 0xF).to(torch.int32), (q >> 4).to(torch.int32)], dim=-1).view(N, -1)[:, :K]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals.contiguous(), 1)


def _int4pack_bytes(q: torch.Tensor, K: int) -> torch.Tensor:
    N = q.shape[0]
    qb = q.view(N // 64, 2, 32, K // 2)
    a, b = qb[:, 0], qb[:, 1]                                        # rows j, j + 32 of each block
    out = torch.empty(N // 64, K // 2, 2, 32, dtype=torch.uint8)    # [block, column pair, even|odd, j]
    out[:, :, 0, :] = ((a & 0x0F) | (b << 4)).transpose(1, 2)        # even columns: the low nibbles
    out[:, :, 1, :] = ((a >> 4) | (b & 0xF0)).transpose(1, 2)        # odd columns: the high nibbles
    return out.view(N, K // 2)


@functools.lru_cache(maxsize=1)
def _bytes_layout_matches() -> bool:
    """Whether torch's int4 CPU layout on this machine is the one `_int4pack_bytes` builds
    (checked once on a random 128 x 128 matrix against the op itself)."""
    q = torch.randint(0, 256, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.equal(_int4pack_bytes(q, 128), _int4pack_op(q, 128))


class _Int8Row:
    """A group-wise int4/int8 matrix [N, K] requantized once to per-row int8 for
    `_weight_int8pack_mm` (int8 [N, K] and one scale per output row): twice int4's bytes, but
    torch's int8 CPU kernel reads them several times faster per byte than its int4 kernel reads
    int4 at one token (`requantize_rows` states the error this adds)."""

    kernel = "int8row"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int, group: int, shape: tuple[int, int]) -> None:
        self.q, self.scales = requantize_rows(q, scales, bits, group, shape)
        self._s: dict[torch.dtype, torch.Tensor] = {}
        self.nbytes = self.q.numel() + self.scales.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self._s.get(x.dtype)
        if s is None:
            s = self._s[x.dtype] = self.scales.to(x.dtype)     # exact: the scales are bf16 values
        return torch._weight_int8pack_mm(x.contiguous(), self.q, s)


def requantize_rows(q: torch.Tensor, scales: torch.Tensor, bits: int, group: int, shape: tuple[int, int],
                    block: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The store's group-wise matrix (its own dequantization W, exact in float32) as per-row
    int8: (Q int8 [N, K], s float32 [N]) with s[n] = max_k |W[n, k]| / 127 rounded up to a
    bfloat16 value (so bf16 and fp32 activations see the same scale) and Q = W x (1 / s)
    rounded to the nearest integer (|Q| <= 127: no clamp).

    Bound, per element: |Q[n, k] s[n] - W[n, k]| <= s[n] / 2 * (1 + 2**-14) (half a step, plus
    the two float32 roundings of W x (1 / s), under 127 x 2**-23 of a step), where
    s[n] <= max_k |W[n, k]| / 127 * (1 + 2**-7): at most 1/254 (+0.8%) of the row's largest
    magnitude. For int4 (|q - 8| <= 7) that is at most 7/254 (+0.8%) of the row's largest group
    scale, under 1/36 of one int4 step; for int8 (|q| <= 127) half the row's largest group scale
    (the requantization adds up to one group step where a row's group scales differ). Rows
    dequantized `block` at a time in float32 (a cache-sized working set)."""
    from expert_store.quant import dequantize

    N, K = (int(d) for d in shape)
    out = torch.empty(N, K, dtype=torch.int8)
    s = torch.empty(N, dtype=torch.float32)
    for r0 in range(0, N, block):
        r1 = min(N, r0 + block)
        w = dequantize(q[r0:r1], scales[r0:r1], bits, group, (r1 - r0, K), torch.float32)
        sc = _bf16_ceil(torch.linalg.vector_norm(w, float("inf"), dim=1) / 127)
        sc = torch.where(sc > 0, sc, torch.ones_like(sc))            # an all-zero row: any scale
        out[r0:r1] = w.mul_((1 / sc)[:, None]).round_()               # |.| <= 127 (+ rounding): no clamp
        s[r0:r1] = sc
    return out, s


def _bf16_ceil(v: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 values rounded up to the nearest bfloat16 value (as float32)."""
    bits = v.contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & -0x10000).view(torch.float32)


# the paths a quantized expert can take ("native": the store's own precision's kernel when it
# takes the shape, else dequant); HostExperts times CANDIDATES per precision and keeps the fastest
PATHS = ("native", "int4pack", "int8pack", "int8row", "dequant")
CANDIDATES = {"int4": ("int4pack", "int8row", "dequant"), "int8": ("int8pack", "int8row", "dequant")}


def _matrix(view: Any, kernels: dict[str, bool], owned: bool, path: str = "native") -> Any:
    """One matrix of a host-tier payload (a bf16 tensor or an expert_store QuantizedWeight) in
    the form `path` names; a path this torch or shape cannot take falls back to "native" (the
    precision's own kernel where it takes the shape, else dequant). `owned`: the payload is a
    copy of its own."""
    if isinstance(view, torch.Tensor):
        return _Dense(view, owned)
    q, scales, bits, group = view.q, view.scales, int(view.bits), int(view.group_size)
    N, K = (int(d) for d in view.shape)
    if path == "dequant":
        return _Dequant(q, scales, bits, group, (N, K))
    if path == "int8row" and kernels["int8"]:
        return _Int8Row(q, scales, bits, group, (N, K))
    if bits == 8 and kernels["int8"] and K % group == 0:
        return _Int8(q, scales, group)
    if bits == 4 and kernels["int4"] and group in INT4_GROUPS and K % group == 0 and N % 16 == 0:
        return _Int4(q, scales, group, K)
    return _Dequant(q, scales, bits, group, (N, K))


class HostExpert:
    """One expert's w1, w3, w2 in CPU-kernel form; `forward(x [T, H]) -> [T, H]` in x's dtype on
    the CPU. `nbytes`: memory it owns (0 for bf16, which reads the host slot in place: valid
    only while the slot holds it); `kernel`: the path of its matrices ("int4pack", ...)."""

    __slots__ = ("w1", "w3", "w2", "nbytes", "kernel")

    def __init__(self, w1: Any, w3: Any, w2: Any) -> None:
        self.w1, self.w3, self.w2 = w1, w3, w2
        self.nbytes = w1.nbytes + w3.nbytes + w2.nbytes
        self.kernel = "/".join(sorted({w1.kernel, w3.kernel, w2.kernel}))

    @classmethod
    def from_raw(cls, header: Any, raw: torch.Tensor, kernels: dict[str, bool] | None = None,
                 path: str = "native") -> "HostExpert":
        """From an expert blob's header and its raw payload (a CPU uint8 tensor), each quantized
        matrix in the form `path` names (PATHS; bf16 is read in place whatever the path). A
        payload that does not start 16-byte aligned (an uncompressed blob read where it landed,
        after its header) is copied first: typed views need aligned bytes; the copy is then owned."""
        from expert_store.quant import tensors_from_raw

        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        kernels = cpu_kernels() if kernels is None else kernels
        owned = raw.data_ptr() % 16 != 0
        if owned:
            raw = raw.clone()
        views = tensors_from_raw(header, raw)
        return cls(*(_matrix(views[n], kernels, owned, path) for n in ("w1", "w3", "w2")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    __call__ = forward


def time_call(ex: HostExpert, x: torch.Tensor, reps: int = 3) -> float:
    """Seconds of ex(x): the best of `reps` calls after one untimed call."""
    ex(x)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        ex(x)
        best = min(best, time.perf_counter() - t0)
    return best


def candidate_paths(precision: str, kernels: dict[str, bool]) -> tuple[str, ...]:
    """The paths worth timing for an expert stored at `precision` with this torch's kernels."""
    need = {"int4pack": "int4", "int8pack": "int8", "int8row": "int8"}
    return tuple(p for p in CANDIDATES.get(precision, ()) if p not in need or kernels[need[p]])


# --------------------------------------------------------------------------------------------
# the pool: packed experts, the workers, measured cost
# --------------------------------------------------------------------------------------------
class HostExperts:
    """Packed experts (LRU, at most `pack_bytes` owned bytes), `workers` threads running jobs
    from one queue, the EWMA seconds of one expert call and the calls queued.

    `threads`: torch intra-op threads in all (None: the creating thread's, torch's default of
    the host's cores); each worker sets threads // workers for itself. In torch's OpenMP build
    `torch.set_num_threads` is per calling thread (ATen's set_num_threads calls
    omp_set_num_threads, whose nthreads ICV belongs to the calling thread, and get_num_threads
    reads omp_get_max_threads), so `workers` teams of that size run side by side; it also
    stores a process-wide value that a thread takes on its first parallel region or
    get_num_threads, so every thread here initializes its own first (`set_thread_count`).
    With one worker (the default) jobs run in submission order over all the threads; with
    more, a layer's experts run at once when submitted one job each (`submit_layer`).

    The kernel path per precision (`paths`, e.g. {"int4": "int8row"}) is given or measured:
    the first expert of a precision and payload size with at least `calib_min_bytes` is built
    in each candidate form (`candidate_paths`) and timed (`timer(expert, x)` seconds, x one
    token of `calib_dtype`, on a thread with one worker's threads); the fastest is kept for
    every expert of that kind. Below `calib_min_bytes`, or with calibrate=False, the path is
    "native" (the stored precision's kernel: exact against the store's dequantization), as
    it is for bf16. The cost starts at `prior_s` (default 0: unmeasured, so the first misses a
    rule weighs go to the host and measure it)."""

    def __init__(self, pack_bytes: int = 4 << 30, threads: int | None = None, alpha: float = 0.3,
                 prior_s: float = 0.0, workers: int = 1, paths: dict[str, str] | None = None,
                 calibrate: bool = True, calib_min_bytes: int = 1 << 20, calib_dtype: torch.dtype = torch.bfloat16,
                 timer: Callable[[HostExpert, torch.Tensor], float] | None = None) -> None:
        self.pack_bytes = int(pack_bytes)
        self.threads = int(threads) if threads else torch.get_num_threads()
        self.workers = max(1, int(workers))
        self.worker_threads = max(1, self.threads // self.workers)
        self.kernels = cpu_kernels()
        self.paths: dict[str, str] = dict(paths or {})
        for prec, path in self.paths.items():
            if path not in PATHS:
                raise ValueError(f"paths[{prec!r}] must be one of {PATHS}, got {path!r}")
        self.calibrate, self.calib_min_bytes, self.calib_dtype = bool(calibrate), int(calib_min_bytes), calib_dtype
        self.timer = timer or time_call
        self.calibration: dict[str, dict[str, Any]] = {}    # "precision/raw bytes" -> {path: seconds, "chosen": path}
        self._chosen: dict[tuple[str, int], str] = {}
        self._calib_lock = threading.Lock()
        self._packed: OrderedDict[Any, HostExpert] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.cost = Ewma(alpha, prior_s)     # seconds of one expert call (any token count <= max_tokens)
        self.queued = 0                       # expert calls submitted and not finished
        self.calls = self.tokens = self.packs = 0
        self.seconds = 0.0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._loop, name=f"host-experts-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._workers:
            t.start()
        self._packs: queue.SimpleQueue = queue.SimpleQueue()
        self._pack_pending: set[Any] = set()
        self._too_big = False                 # an expert's pack exceeded pack_bytes: pack nothing ahead
        self._packer = threading.Thread(target=self._pack_loop, name="host-experts-pack", daemon=True)
        self._packer.start()

    # --- packed experts --------------------------------------------------------------------
    def expert(self, key: Any, header: Any, raw: torch.Tensor) -> HostExpert:
        """The packed expert `key`, packed from (header, raw) on first use (in the path chosen
        for its kind, `path_for`) and kept while the budget allows; a bf16 expert read in
        place (views of `raw`: the caller holds the host slot while computing) owns nothing
        and is not kept."""
        with self._lock:
            ex = self._packed.get(key)
            if ex is not None:
                self._packed.move_to_end(key)
                return ex
        path, ex = self._path_for(header, raw)
        if ex is None:
            ex = HostExpert.from_raw(header, raw, self.kernels, path)
        with self._lock:
            self.packs += 1
            self._too_big = self._too_big or ex.nbytes > self.pack_bytes
            if ex.nbytes and ex.nbytes <= self.pack_bytes:
                old = self._packed.pop(key, None)          # packed meanwhile by another thread
                if old is not None:
                    self._bytes -= old.nbytes
                self._packed[key] = ex
                self._bytes += ex.nbytes
                while self._bytes > self.pack_bytes:
                    _, old = self._packed.popitem(last=False)
                    self._bytes -= old.nbytes
        return ex

    def path_for(self, header: Any, raw: torch.Tensor) -> str:
        """The path experts like (header, raw) take here (calibrating on this one if its kind
        has not been timed yet)."""
        return self._path_for(header, raw)[0]

    def _path_for(self, header: Any, raw: torch.Tensor) -> tuple[str, HostExpert | None]:
        """(path, the expert built while calibrating on it, or None)."""
        prec = str(header.precision)
        if prec in self.paths:
            return self.paths[prec], None
        cands = candidate_paths(prec, self.kernels)
        if not self.calibrate or len(cands) < 2 or int(header.raw_size) < self.calib_min_bytes:
            return "native", None
        kind = (prec, int(header.raw_size))
        with self._calib_lock:
            path = self._chosen.get(kind)
            if path is not None:
                return path, None
            path, ex, times = self._calibrate(header, raw, cands)
            self._chosen[kind] = path
            self.calibration[f"{prec}/{int(header.raw_size)}"] = {**times, "chosen": path}
            log.info("host experts, %s: %s (seconds per call: %s)", prec, path, times)
            return path, ex

    def _calibrate(self, header: Any, raw: torch.Tensor, cands: Sequence[str]) -> tuple[str, HostExpert, dict[str, float]]:
        """Build the expert in every candidate path and time one call of each on a thread with
        one worker's threads; the fastest (ties: the earlier candidate) and its expert."""
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                set_thread_count(self.worker_threads)
                with torch.inference_mode():
                    H = next(int(t.shape[1]) for t in header.tensors if t.name == "w1")
                    x = torch.randn(1, H, generator=torch.Generator().manual_seed(0)).to(self.calib_dtype)
                    built, times = {}, {}
                    for p in cands:
                        ex = built[p] = HostExpert.from_raw(header, raw, self.kernels, p)
                        times[p] = float(self.timer(ex, x))
                    best = min(cands, key=lambda p: (times[p], cands.index(p)))
                    result.update(path=best, ex=built[best], times=times)
            except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread
                result["error"] = exc

        t = threading.Thread(target=run, name="host-experts-calibrate", daemon=True)
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result["path"], result["ex"], result["times"]

    def packed(self, key: Any) -> HostExpert | None:
        """The kept packed expert `key` (None: not packed, or bf16, which is never kept)."""
        with self._lock:
            ex = self._packed.get(key)
            if ex is not None:
                self._packed.move_to_end(key)
            return ex

    @property
    def packed_bytes(self) -> int:
        return self._bytes

    def forget(self, key: Any) -> None:
        """Drop the packed expert `key` (its source bytes were replaced)."""
        with self._lock:
            ex = self._packed.pop(key, None)
            if ex is not None:
                self._bytes -= ex.nbytes

    def request_pack(self, key: Any, pack: Callable[[], Any]) -> None:
        """Have the packer thread run pack() (which packs `key` through `expert`) unless `key`
        is packed or already asked for, or a pack has been too big to keep (packing ahead
        would only be thrown away)."""
        with self._lock:
            if key in self._packed or key in self._pack_pending or self._too_big:
                return
            self._pack_pending.add(key)
        self._packs.put((key, pack))

    # --- jobs ------------------------------------------------------------------------------------
    def submit(self, fn: Callable[[], Any], calls: int = 1) -> Future:
        """Run fn() on a worker (the first free one, in submission order); `calls`: expert calls
        it makes (the backlog counts them until fn calls `done_call` for each)."""
        fut: Future = Future()
        with self._lock:
            self.queued += calls
        self._jobs.put((fn, fut))
        return fut

    def submit_layer(self, groups: dict[int, tuple[Sequence[int], Sequence[float]]], x: torch.Tensor,
                     out: torch.Tensor, call: Callable[[int, torch.Tensor], torch.Tensor]) -> Future:
        """One layer's host experts, spread over the workers: out [B, H] (float32) becomes
        sum over e in groups of w * call(e, x[rows]) for groups[e] = (rows, weights); one job
        per expert (each counted as one call: the backlog drops as each finishes) and the sum
        taken, in expert order, by whichever finishes last, so `out` holds the same bits for any
        worker count. The future is done once `out` is written (its exception: the first an
        expert call raised, after all have finished)."""
        order = sorted(groups)
        done: Future = Future()
        if not order:
            out.zero_()
            done.set_result(None)
            return done
        ys: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []
        left = [len(order)]
        lock = threading.Lock()

        def one(e: int) -> None:
            rs, ws = groups[e]
            rows = torch.tensor(list(rs), dtype=torch.long)
            try:
                y = call(e, x[rows])
                ys[e] = y.float() * torch.tensor(list(ws), dtype=torch.float32)[:, None]
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                errors.append(exc)
            finally:
                self.done_call()
                with lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    _finish_layer(done, errors, out, order, groups, ys)

        for e in order:
            self.submit(lambda e=e: one(e), calls=1)
        return done

    def run_call(self, ex: HostExpert, x: torch.Tensor) -> torch.Tensor:
        """One expert call on the calling thread (the worker), timed into `cost`."""
        t0 = time.perf_counter()
        y = ex(x)
        dt = time.perf_counter() - t0
        with self._lock:
            self.cost.update(dt)
            self.calls += 1
            self.tokens += int(x.shape[0])
            self.seconds += dt
        return y

    def done_call(self) -> None:
        with self._lock:
            self.queued = max(0, self.queued - 1)

    def backlog(self) -> float:
        """Seconds of expert calls queued on the workers in all (queued x cost; with several
        workers they drain in about backlog / workers: MissRule divides)."""
        with self._lock:
            return self.queued * self.cost.value

    def reset_stats(self) -> None:
        """Zero the call counters (the cost EWMA is kept: it is a measurement, not a count)."""
        with self._lock:
            self.calls = self.tokens = self.packs = 0
            self.seconds = 0.0

    def close(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
        self._packs.put(None)
        for t in self._workers:
            t.join(timeout=5.0)
        self._packer.join(timeout=5.0)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": self.calls, "tokens": self.tokens, "seconds": self.seconds,
                    "cost_s": self.cost.value, "measured": self.cost.n, "packs": self.packs,
                    "packed_experts": len(self._packed), "packed_bytes": self._bytes, "kernels": dict(self.kernels),
                    "workers": self.workers, "threads_per_worker": self.worker_threads,
                    "paths": {**{f"{k[0]}/{k[1]}": v for k, v in self._chosen.items()}, **self.paths},
                    "calibration": {k: dict(v) for k, v in self.calibration.items()}}

    def _loop(self) -> None:
        set_thread_count(self.worker_threads)     # this thread's OpenMP team (see the class doc)
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                with torch.inference_mode():      # grad mode is per thread: the step's is off
                    fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                fut.set_exception(exc)

    def _pack_loop(self) -> None:
        set_thread_count(self.threads)
        while True:
            item = self._packs.get()
            if item is None:
                return
            key, pack = item
            try:
                with torch.inference_mode():
                    pack()
            except Exception as exc:  # noqa: BLE001 - the miss is copied instead
                log.warning("packing expert %s for the host failed: %s", key, exc)
            finally:
                with self._lock:
                    self._pack_pending.discard(key)


def _finish_layer(done: Future, errors: list[BaseException], out: torch.Tensor, order: Sequence[int],
                  groups: dict[int, tuple[Sequence[int], Sequence[float]]], ys: dict[int, torch.Tensor]) -> None:
    """submit_layer's last step: the weighted outputs summed into `out` in expert order."""
    if errors:
        done.set_exception(errors[0])
        return
    try:
        out.zero_()
        for k in order:
            out.index_add_(0, torch.tensor(list(groups[k][0]), dtype=torch.long), ys[k])
    except BaseException as exc:  # noqa: BLE001 - handed to the waiter
        done.set_exception(exc)
        return
    done.set_result(None)


# --------------------------------------------------------------------------------------------
# which misses the host computes
# --------------------------------------------------------------------------------------------
class MissRule:
    """Per layer, which misses the host computes ("auto"), all it can ("cpu") or none ("copy").

    "auto" is list scheduling onto the copy link and `workers` CPU queues: the link is free
    after `copy_backlog` seconds, each copy `copy_s`; the CPU's `cpu_backlog` seconds of queued
    calls are spread over its workers (each free after cpu_backlog / workers), each call
    `cpu_s`. Misses are taken in order; each goes to the host only when the earliest-free
    worker would finish it more than `reuse x copy_s` before the link would: a copy leaves the
    expert in a GPU slot, where a later token's use of it is a hit, while a miss computed on
    the host stays a miss next time. `reuse` is the layer's measured rate at which an expert a
    token uses is used again by the next token (`observe`, which MissTokens feeds from the
    routing): the hit a copy buys one token later, a lower bound on the hits over the copy's
    stay in its slot. Equal times go to the link. With `credit_reuse=False` the credit is 0
    (the fastest finish wins)."""

    def __init__(self, mode: str, workers: int = 1, credit_reuse: bool = True, alpha: float = 0.1) -> None:
        if mode not in MISS_COMPUTE:
            raise ValueError(f"miss_compute must be one of {MISS_COMPUTE}, got {mode!r}")
        self.mode = mode
        self.workers = max(1, int(workers))
        self.credit_reuse = bool(credit_reuse)
        self.alpha = float(alpha)
        self._reuse: dict[int, Ewma] = {}
        self._last: dict[int, set[int]] = {}
        self._layer: int | None = None       # the layer observed last: the one whose misses come next

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        """The experts `layer` uses at this token (one decode step; every row's choices): the
        share of the previous token's experts used again goes into the layer's reuse rate."""
        now = {int(e) for e in experts if int(e) >= 0}
        prev = self._last.get(layer)
        if prev:
            r = self._reuse.get(layer)
            if r is None:
                r = self._reuse[layer] = Ewma(self.alpha, 0.0)
            r.update(len(prev & now) / len(prev))
        self._last[layer] = now
        self._layer = layer

    def reuse(self, layer: int | None = None) -> float:
        """The measured reuse rate of `layer` (default: the layer observed last); 0 unmeasured."""
        layer = self._layer if layer is None else layer
        r = self._reuse.get(layer) if layer is not None else None
        return r.value if r is not None and r.n else 0.0

    def assign(self, misses: Sequence[int], copy_s: float, copy_backlog: float, cpu_s: float,
               cpu_backlog: float, *, workers: int | None = None, reuse: float | None = None,
               layer: int | None = None) -> list[int]:
        """The misses (expert ids, in the order they are served) the host computes. `workers`
        (default self.workers) CPU queues; `reuse` (default the measured rate of `layer`, or of
        the layer observed last; 0 with credit_reuse off) prices the later hits of a copy."""
        if self.mode == "copy":
            return []
        if self.mode == "cpu":
            return list(misses)
        w = self.workers if workers is None else max(1, int(workers))
        if reuse is None:
            reuse = self.reuse(layer) if self.credit_reuse else 0.0
        credit = max(0.0, float(reuse)) * copy_s
        copy_free, out = copy_backlog, []
        cpu_free = [cpu_backlog / w] * w
        for e in misses:
            i = min(range(w), key=cpu_free.__getitem__)
            if cpu_free[i] + cpu_s + credit < copy_free + copy_s:
                cpu_free[i] += cpu_s
                out.append(e)
            else:
                copy_free += copy_s
        return out

    def stats(self) -> dict[str, Any]:
        return {"workers": self.workers, "credit_reuse": self.credit_reuse,
                "reuse": {l: round(r.value, 4) for l, r in sorted(self._reuse.items()) if r.n}}


# --------------------------------------------------------------------------------------------
# the step's side: one layer's host experts, summed
# --------------------------------------------------------------------------------------------
class HostJob:
    """The host-computed experts of one layer: the worker adds each expert's weighted output
    into `out` ([B, H] float32, pinned when the device is CUDA). `result(device, dtype)` waits
    and returns the sum on the device (enqueued after the compute stream's work so far);
    `on_wait(seconds)` hears how long the caller waited for the host (a stall, like waiting
    for a copy)."""

    def __init__(self, out: torch.Tensor, future: Future, on_wait: Callable[[float], None] | None = None) -> None:
        self.out, self.future, self.on_wait = out, future, on_wait

    def result(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if not self.future.done():
            t0 = time.perf_counter()
            self.future.result()
            if self.on_wait is not None:
                self.on_wait(time.perf_counter() - t0)
        self.future.result()                  # raises what the job raised
        return self.out.to(device, non_blocking=True).to(dtype)


class OnHost:
    """What the cache's `get` hands out for an expert the host computes: called with x [T, H]
    on any device it computes the expert on the host (waiting for it) and returns y on x's
    device, as ExpertWeights would (the eager MoE block and the step's per-expert path call it)."""

    precision = "host"

    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._compute = compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compute(x)

    __call__ = forward


class MissTokens(MoEObserver):
    """Tells `cache.expect_tokens(layer, {expert: tokens})` what the layer's routing gives each
    expert, before the MoE block (or the decode step) asks for them, and the cache's MissRule
    which experts a decode step (at most `max_rows` rows) uses, for its reuse rate."""

    def __init__(self, cache: Any, max_rows: int = 8) -> None:
        self.cache = cache
        self.max_rows = int(max_rows)

    def on_routing_host(self, layer: int, rows: list[list[int]]) -> None:
        counts: dict[int, int] = {}
        for row in rows:
            for e in row:
                if e >= 0:
                    counts[e] = counts.get(e, 0) + 1
        rule = getattr(self.cache, "miss_rule", None)
        if isinstance(rule, MissRule) and len(rows) <= self.max_rows:
            rule.observe(layer, list(counts))       # decode steps only: a prefill is no next token
        self.cache.expect_tokens(layer, counts)
