"""What a GPU expert slot holds and how many a layer gets.

A slot is `slot_bytes` of one preallocated uint8 pool on the device. It holds an expert either
raw (the blob's payload as it crossed the link: bf16 matrices, or int8/int4 values and fp16
scales) or dense (w1, w3, w2 dequantized once into the compute dtype, `DenseLayout`). Layers get
per-layer quotas of slots from the cache plan (AdapMoE's DP, decoder/cache_plan.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from decoder.experts.provider import ExpertWeights
from decoder.model.config import ModelConfig
from expert_store.format import BlobHeader

log = logging.getLogger(__name__)

GPU_ALIGN = 256
HOST_ALIGN = 4096


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def host_slot_bytes(header: Any, max_blob: int, receives_raw: bool = False) -> int:
    """A host tier slot: the largest blob (or the raw payload a coded blob is decoded into);
    `receives_raw` (a FetchPool that decodes coded bf16 blobs into its slots): the raw blob,
    with a page of slack since other experts' headers differ by a few bytes."""
    from expert_store import format as blob_format

    if receives_raw and header.codec != "none":
        max_blob = max(max_blob, blob_format.raw_blob_size(header) + HOST_ALIGN)
    return align(max(max_blob, int(header.raw_size)), HOST_ALIGN)


@dataclass(frozen=True)
class DenseLayout:
    """Where a dense slot keeps each matrix of one expert, dequantized into `dtype`:
    (name, byte offset, [out, in]) for w1, w3, w2 in blob order, each GPU_ALIGN-aligned."""

    dtype: torch.dtype
    tensors: tuple[tuple[str, int, tuple[int, int]], ...]
    nbytes: int                      # bytes a slot needs

    @classmethod
    def of(cls, header: BlobHeader, dtype: torch.dtype) -> "DenseLayout":
        item = torch.empty((), dtype=dtype).element_size()
        tensors, off = [], 0
        for t in header.tensors:
            shape = (int(t.shape[0]), int(t.shape[1]))
            tensors.append((t.name, off, shape))
            off = align(off + shape[0] * shape[1] * item, GPU_ALIGN)
        return cls(dtype, tuple(tensors), off)

    def matches(self, header: BlobHeader) -> bool:
        return len(header.tensors) == len(self.tensors) and all(
            t.name == name and (int(t.shape[0]), int(t.shape[1])) == shape
            for t, (name, _, shape) in zip(header.tensors, self.tensors))

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dense matrices inside `buf` (a uint8 slot), no copies."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return {name: buf[off:off + shape[0] * shape[1] * item].view(self.dtype).view(shape)
                for name, off, shape in self.tensors}

    def fill(self, header: BlobHeader, raw: torch.Tensor, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dequantize the raw payload `raw` (uint8, same device) into `buf`'s views; returns them.
        Runs on the current stream."""
        from expert_store.quant import tensors_from_raw

        dense = self.views(buf)
        for name, v in tensors_from_raw(header, raw).items():
            if isinstance(v, torch.Tensor):
                dense[name].copy_(v)
            else:
                v.dequantize(out=dense[name])
        return dense


def dense_slot_bytes(header: BlobHeader, dtype: torch.dtype) -> int:
    """Bytes of one dense GPU slot for experts shaped like `header`'s, dequantized into `dtype`
    (what `ExpertCache(dense_slots=True).slot_bytes` is; budgets: gpu_cache_bytes = slots x this)."""
    return DenseLayout.of(header, dtype).nbytes


def raw_slot_bytes(header: BlobHeader) -> int:
    """Bytes of one raw GPU slot (`ExpertCache(dense_slots=False).slot_bytes`)."""
    return align(int(header.raw_size), GPU_ALIGN)


def gpu_slot_bytes(header: BlobHeader, dtype: torch.dtype, device: torch.device | str,
                   dense_slots: bool | None = None) -> int:
    """`ExpertCache.slot_bytes` for experts shaped like `header`'s (an expert blob header at the
    cache's precision), compute `dtype`, `device` and the `dense_slots` option, without building
    a cache: what a gpu_cache_bytes budget of N experts is N times."""
    dense = dense_slots_for(dense_slots, header.precision, torch.device(device).type == "cuda")
    return dense_slot_bytes(header, dtype) if dense else raw_slot_bytes(header)


@dataclass
class Staging:
    """A device buffer the compact payload lands in before it is dequantized into a dense slot."""

    buf: torch.Tensor                # uint8 [raw slot bytes] on the device
    event: Any = None                # recorded after the last dequantization that read it (CUDA)


@dataclass
class GpuEntry:
    layer: int
    expert: int
    slot: int                        # pool slot, -1 = transient buffer outside the pool
    buf: torch.Tensor                # uint8 [slot_bytes] on the device
    loading: bool = True
    weights: ExpertWeights | None = None
    copy_event: Any = None           # torch.cuda.Event recorded after the H2D copy (CUDA)
    free_event: Any = None           # recorded on the compute stream when the layer released it
    step: int = -1                   # last token step that used or prefetched it
    prefetched: bool = False         # loaded speculatively, not used yet
    prev_free_event: Any = None      # the evicted occupant's free_event: copy waits on it
    header: Any = None               # the blob header of a raw slot's payload (what a demotion needs)
    demote: Any = None               # the evicted occupant (layer, expert, header) to write back first


def dense_slots_for(option: bool | None, precision: str, cuda: bool) -> bool:
    """Whether slots at `precision` hold dequantized experts: `option`, by default on for
    int8/int4 on CUDA; bf16 payloads are dense already (their slots hold them as they are)."""
    if precision == "bf16":
        return False
    return cuda if option is None else bool(option)


@dataclass(frozen=True)
class _MoeLayers:
    """The sizes plan_quotas needs, for the MoE layers of a model with dense ones."""

    config: ModelConfig
    num_hidden_layers: int

    @property
    def num_local_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def num_experts_per_tok(self) -> int:
        return self.config.num_experts_per_tok


def plan_quotas(config: ModelConfig | _MoeLayers, slot_bytes: int, gpu_cache_bytes: int | None, scratch_slots: int,
                plan: str = "uniform", profile: Mapping[str, Any] | None = None) -> list[int]:
    """GPU slots per layer for a byte budget: AdapMoE's DP (`plan="uniform"`, uniform expert
    choice) or the measured-popularity DP (`plan="popularity"`), with prefetch accuracy and
    single-expert ratio from the calibration profile (0 when there is none)."""
    L_all, E = config.num_hidden_layers, config.num_local_experts
    moe = list(getattr(config, "moe_layers", range(L_all)))
    if len(moe) < L_all:
        # dense layers (no routed experts) get no slots; the plan is over the MoE layers
        def pick(v: Any) -> Any:
            return [v[l] for l in moe] if isinstance(v, (list, tuple)) and len(v) == L_all else v
        prof = {k: pick(v) for k, v in (profile or {}).items()}
        sub = _MoeLayers(config, len(moe))
        q = plan_quotas(sub, slot_bytes, gpu_cache_bytes, scratch_slots, plan, prof)
        out = [0] * L_all
        for l, s in zip(moe, q):
            out[l] = s
        return out
    from decoder.cache_plan import plan_slots, plan_slots_popularity

    L = L_all
    if gpu_cache_bytes is None:
        return [E] * L
    total = int(gpu_cache_bytes) // slot_bytes
    if total >= L * E:
        if total > L * E:
            log.info("gpu_cache_bytes=%d holds %d experts; the model has %d: every expert gets a slot",
                     gpu_cache_bytes, total, L * E)
        return [E] * L
    total -= scratch_slots
    if total < L:
        need = (L + scratch_slots) * slot_bytes
        raise ValueError(f"gpu_cache_bytes={gpu_cache_bytes} is too small: one slot per layer plus "
                         f"{scratch_slots} scratch slots needs {need} bytes ({slot_bytes} per expert)")
    prof = profile or {}
    acc = prof.get("prefetch_accuracy") or 0.0
    r1 = prof.get("single_expert_ratio") or 0.0
    if plan == "popularity" and prof.get("popularity"):
        return plan_slots_popularity(prof["popularity"], acc, r1, total, top_k=getattr(config, "num_experts_per_tok", 2))
    if plan not in ("uniform", "popularity"):
        raise ValueError(f"unknown cache plan {plan!r} (uniform | popularity)")
    return plan_slots(acc, r1, total, E, num_layers=L, top_k=getattr(config, "num_experts_per_tok", 2))


EVICTIONS = ("lru", "lfru")


class EvictionPolicy:
    """Which loaded expert of a layer gives its slot up, and whether a prefetch may take one.

    Every demand use of (layer, expert) at token step t adds to its combined recency-frequency
    value (CRF, as LRFU): crf = 1 + crf_before * d^(t - t_before), d = 2^-decay per step.
    - "lru": the least recently used candidate goes (the order the cache keeps).
    - "lfru": the candidate with the smallest CRF now goes (ties: least recently used first), so
      an expert used every other token outlives one used once just now. decay -> inf is LRU,
      0 is LFU.
    Admission (`admission=True`): a prefetch whose predicted use p (the probability that the
    token uses it: prediction weight x measured precision) would evict a victim takes the slot
    only when p exceeds the victim's expected reuse, its decayed use rate (`reuse`); otherwise
    it is refused. A demand load always takes a slot.
    """

    def __init__(self, kind: str = "lru", decay: float = 0.5, admission: bool = False) -> None:
        if kind not in EVICTIONS:
            raise ValueError(f"unknown eviction {kind!r} (expected one of {EVICTIONS})")
        if not decay >= 0:
            raise ValueError("decay must be >= 0")
        self.kind, self.decay, self.admission = kind, float(decay), bool(admission)
        self.d = 2.0 ** -self.decay
        self._crf: dict[tuple[int, int], tuple[float, int]] = {}     # key -> (crf at step, step)
        # plain LRU needs no use history: `use` is then free on the lookup path
        self._tracks = kind != "lru" or self.admission

    def use(self, key: tuple[int, int], step: int) -> None:
        """A demand use of `key` at token `step` (several uses in one step count once)."""
        if not self._tracks:
            return
        crf, at = self._crf.get(key, (0.0, step))
        if at == step and crf > 0:
            return
        self._crf[key] = (1.0 + crf * self.d ** (step - at), step)

    def crf(self, key: tuple[int, int], step: int) -> float:
        crf, at = self._crf.get(key, (0.0, step))
        return crf * self.d ** max(0, step - at)

    def reuse(self, key: tuple[int, int], step: int) -> float:
        """Expected uses per token step from now, for a key not used at `step` yet: a steady rate r
        leaves crf = r (d + d^2 + ...) = r d / (1 - d) one step after its last use."""
        if self.d >= 1:
            return self.crf(key, step) / max(1, step)
        return self.crf(key, step) * (1.0 - self.d) / self.d

    def victim(self, candidates: Iterable[tuple[int, int]], step: int) -> tuple[int, int] | None:
        """The candidate to evict; `candidates` in LRU order (least recent first). LRU takes the
        first without looking further."""
        if self.kind == "lru":
            return next(iter(candidates), None)
        best = min(enumerate(candidates), key=lambda ic: (self.crf(ic[1], step), ic[0]), default=None)
        return None if best is None else best[1]

    def admit(self, predicted_use: float | None, victim: tuple[int, int], step: int) -> bool:
        """May a prefetch with `predicted_use` (None: unknown) evict `victim`?"""
        if not self.admission or predicted_use is None:
            return True
        return predicted_use > self.reuse(victim, step)


def allocate(shape: tuple[int, int], device: torch.device, what: str) -> torch.Tensor:
    """A uint8 buffer for `what`; MemoryError naming it (and the bytes) when it does not fit."""
    try:
        return torch.empty(shape, dtype=torch.uint8, device=device)
    except (RuntimeError, MemoryError) as e:   # torch.OutOfMemoryError is a RuntimeError
        n = shape[0] * shape[1]
        raise MemoryError(f"cannot allocate {n} bytes ({n / 2**30:.1f} GiB) on {device} for {what}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
