"""Where the MoE layers get their experts from.

The model never owns expert weights directly: every MoE layer asks an `ExpertProvider` for
(layer, expert) and computes with the returned `ExpertWeights`. Three providers exist:

- `ResidentExperts` (nn.Module): every expert as an nn.Parameter. Used for training, for the
  "everything resident" baseline and in tests.
- `StoreExperts`: fetches blobs from a `StoreClient` on demand, decodes them, keeps them in a
  plain dict (optionally an LRU bounded in bytes). The simple reference for the real cache.
- the AdapMoE GPU/host cache (decoder/experts/cache.py) implements the same interface.

Protocol the MoE block follows for one layer and one forward (any number of tokens):

    provider.prepare(layer, needed)            # hint: start loading what is missing (may be a no-op)
    for e in sorted(needed, key=not ready):    # ready experts are computed first
        w = provider.get(layer, e)             # blocks until loaded
        y_e = w(x[tokens routed to e])
    provider.release(layer, needed)            # the layer is done with them (unpin)

`ExpertSource` bundles what a provider needs to fetch and decode experts from the store, so
every provider is built the same way (`Engine.from_store` builds one and hands it over).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from decoder.kernels.fused_moe import ExpertBank
from expert_store.client import StoreClient
from expert_store.format import BlobHeader
from expert_store.manifest import Manifest
from expert_store.quant import QuantizedWeight

if TYPE_CHECKING:  # pragma: no cover
    from decoder.model.config import ModelConfig

# Where an expert currently lives, cheapest first. Cost-aware gating keys its costs on these.
LOCATIONS = ("gpu", "host", "store")


# --------------------------------------------------------------------------------------------
# One expert's weights
# --------------------------------------------------------------------------------------------
@dataclass
class QuantizedMatrix:
    """A group-wise quantized matrix as stored in an int8/int4 blob (see expert_store.quant)."""

    q: torch.Tensor          # int8 [out, in] (bits=8) or uint8 [out, in/2] (bits=4, two per byte)
    scales: torch.Tensor     # float16 [out, in/group_size]
    bits: int                # 8 | 4
    group_size: int
    shape: tuple[int, int]   # [out, in] of the dequantized matrix

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        from expert_store.quant import dequantize

        return dequantize(self.q, self.scales, self.bits, self.group_size, tuple(self.shape), dtype)

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()

    @property
    def device(self) -> torch.device:
        return self.q.device

    def to(self, device: torch.device | str) -> "QuantizedMatrix":
        return QuantizedMatrix(self.q.to(device), self.scales.to(device), self.bits, self.group_size, self.shape)


Matrix = Union[torch.Tensor, QuantizedMatrix]


def _dense(m: Matrix, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):  # QuantizedMatrix or expert_store.quant.QuantizedWeight
        return m.dequantize(dtype)
    return m if m.dtype == dtype else m.to(dtype)


def _nbytes(m: Any) -> int:
    if isinstance(m, torch.Tensor):
        return m.numel() * m.element_size()
    return m.q.numel() * m.q.element_size() + m.scales.numel() * m.scales.element_size()


class ExpertWeights:
    """One Mixtral expert: y = (SiLU(x w1^T) * (x w3^T)) w2^T.

    w1 (gate) and w3 (up) are [ffn, hidden], w2 (down) is [hidden, ffn]. Each is a dense tensor
    (any float dtype; cast to x's dtype at compute) or a `QuantizedMatrix` (dequantized to x's
    dtype at compute, so a cache may keep the raw int8/int4 bytes of a slot and view them).
    Differentiable when the matrices are (ResidentExperts hands out Parameter slices).
    """

    __slots__ = ("w1", "w3", "w2", "precision")

    def __init__(self, w1: Matrix, w3: Matrix, w2: Matrix, precision: str = "bf16") -> None:
        self.w1, self.w3, self.w2, self.precision = w1, w3, w2, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        w1 = _dense(self.w1, x.dtype)  # [ffn, hidden]
        w3 = _dense(self.w3, x.dtype)  # [ffn, hidden]
        w2 = _dense(self.w2, x.dtype)  # [hidden, ffn]
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    __call__ = forward

    def matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) as dense `dtype` tensors (int8/int4 dequantized): for an MoE block whose
        experts use another activation or biases (GPT-OSS)."""
        return _dense(self.w1, dtype), _dense(self.w3, dtype), _dense(self.w2, dtype)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(m) for m in (self.w1, self.w3, self.w2))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ExpertWeights":
        """Copy to `device`; dense matrices are also cast to `dtype` when given (quantized stay packed)."""
        def mv(m: Matrix) -> Matrix:
            if not isinstance(m, torch.Tensor):
                return m.to(device)
            return m.to(device=device, dtype=dtype or m.dtype)
        return ExpertWeights(mv(self.w1), mv(self.w3), mv(self.w2), self.precision)

    def materialize(self, dtype: torch.dtype, device: torch.device | str | None = None) -> "ExpertWeights":
        """Dense copy in `dtype` (dequantizing int8/int4 once): trades memory for per-call work."""
        def dense(m: Matrix) -> torch.Tensor:
            t = _dense(m, dtype)
            return t.to(device) if device is not None else t
        return ExpertWeights(dense(self.w1), dense(self.w3), dense(self.w2), self.precision)


def expert_weights_from_views(header: BlobHeader, views: Mapping[str, torch.Tensor | QuantizedWeight]) -> ExpertWeights:
    """Wrap `expert_store.quant.tensors_from_raw(header, raw)` output (no copies): a dense
    tensor (bf16) or a `QuantizedWeight` (int8/int4: q, scales, bits, group_size, shape) per matrix."""
    mats: dict[str, Matrix] = {}
    for name in ("w1", "w3", "w2"):
        if name not in views:
            raise ValueError(f"expert blob has no tensor {name!r}")
        v = views[name]
        mats[name] = v if isinstance(v, torch.Tensor) else \
            QuantizedMatrix(v.q, v.scales, int(v.bits), int(v.group_size), tuple(v.shape))
    return ExpertWeights(mats["w1"], mats["w3"], mats["w2"], header.precision)


def decode_expert_blob(blob: bytes | memoryview, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None) -> ExpertWeights:
    """Decode one encoded expert blob (integrity-checked by the format layer) into ExpertWeights.

    dtype=None keeps the stored layout (bf16 tensors, int8/int4 packed + fp16 scales) on `device`;
    a dtype materializes dense matrices in that dtype (dequantizing once).
    """
    from expert_store import format as blob_format
    from expert_store.quant import blob_to_tensors

    header, _ = blob_format.read_header(blob)
    views = blob_to_tensors(blob, device=device, dequant=False)  # verifies seal + payload checksum
    w = expert_weights_from_views(header, views)
    return w.materialize(dtype) if dtype is not None else w


# --------------------------------------------------------------------------------------------
# The provider interface
# --------------------------------------------------------------------------------------------
class ExpertProvider:
    """Hands out experts per (layer, expert). Subclasses override `get` (and usually the rest).

    Thread-safety: the model calls a provider from one thread; a provider may use its own
    threads (loads, prefetch) internally.
    """

    precision: str = "bf16"

    def prepare(self, layer: int, experts: Sequence[int]) -> None:
        """Demand hint: the current forward of `layer` needs `experts`; start loading the missing ones."""

    def ready(self, layer: int, expert: int) -> bool:
        """True when `get(layer, expert)` would not block."""
        return True

    def get(self, layer: int, expert: int) -> ExpertWeights:
        """The expert's weights; blocks until loaded. Valid until `release(layer, ...)`."""
        raise NotImplementedError

    def release(self, layer: int, experts: Sequence[int]) -> None:
        """The layer finished computing with `experts` (a cache may unpin/evict them now)."""

    def location(self, layer: int, expert: int) -> str:
        """Where the expert is now: one of LOCATIONS ("gpu" = ready for compute on the device)."""
        return "gpu" if self.ready(layer, expert) else "store"

    def prefetch(self, layer: int, experts: Sequence[int], scores: Sequence[float] | None = None) -> None:
        """Speculative load (lower priority than demand). Default: ignored."""

    def begin_token(self) -> None:
        """Called by the engine before each forward step (prefill counts as one step)."""

    # --- what the GPU-driven decode step (decoder/step.py) reads the experts through -----------
    def expert_bank(self, layer: int) -> "ExpertBank | None":
        """Where `layer`'s experts sit, for the fused MoE kernels (decoder/kernels/fused_moe.py);
        None when this provider's experts cannot be read that way (the step is not used)."""
        return None

    def gpu_slot(self, layer: int, expert: int) -> int:
        """The bank slot of a loaded expert (valid from `get` to `release`), -1 when it is not in
        one (e.g. a transient buffer: the step then computes that layer through `get`)."""
        return -1

    def all_resident(self) -> bool:
        """True when every expert is on the GPU in a bank slot and none will move: the whole
        decode step may be captured once with a fixed slot table."""
        return False

    def on_host(self, layer: int) -> list[int]:
        """Experts of `layer`'s current forward (prepare .. release) that the host computes
        instead of the GPU (decoder/experts/host_compute.py); the step leaves them out of the
        slot table and adds what `compute_on_host` returns."""
        return []

    def compute_on_host(self, layer: int, items: Sequence[tuple[int, int, float]], x: torch.Tensor) -> Any:
        """Start computing `items` (row of x, expert, gate weight) of `layer` on the host from
        the layer's MoE input x [B, H]; returns a host_compute.HostJob (its `result(device,
        dtype)` is the weighted sum [B, H] on the device)."""
        raise NotImplementedError(f"{type(self).__name__} computes no expert on the host")

    def stats(self) -> dict[str, Any]:
        """Counters; keys used by Engine.stats(): `tiers` {name: {hits, misses, ...}},
        `bytes_fetched`, `fetches`, `stall_s` (time get() blocked)."""
        return {}

    def reset_stats(self) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# All experts resident, as parameters (training, baseline, tests)
# --------------------------------------------------------------------------------------------
class ResidentExperts(nn.Module, ExpertProvider):
    """Every expert of every layer as nn.Parameters: w1/w3 [L][E, ffn, hidden], w2 [L][E, hidden, ffn].

    Differentiable: `get` returns views of the parameters, so a Transformer built with this
    provider trains end to end. Parameter names (under a Transformer: `experts.w1.<layer>` ...).
    """

    def __init__(self, config: "ModelConfig", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        L, E, H, Fd = config.num_hidden_layers, config.num_local_experts, config.hidden_size, config.intermediate_size
        kw = dict(device=device, dtype=dtype)
        self.config = config
        self.w1 = nn.ParameterList([nn.Parameter(torch.empty(E, Fd, H, **kw)) for _ in range(L)])
        self.w3 = nn.ParameterList([nn.Parameter(torch.empty(E, Fd, H, **kw)) for _ in range(L)])
        self.w2 = nn.ParameterList([nn.Parameter(torch.empty(E, H, Fd, **kw)) for _ in range(L)])
        self.precision = "resident"
        self._gets = 0

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, std, generator=generator)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        self._gets += 1
        return ExpertWeights(self.w1[layer][expert], self.w3[layer][expert], self.w2[layer][expert], "resident")

    def location(self, layer: int, expert: int) -> str:
        return "gpu"

    def expert_bank(self, layer: int) -> ExpertBank:
        return ExpertBank.stacked(self.w1[layer].detach(), self.w3[layer].detach(), self.w2[layer].detach())

    def gpu_slot(self, layer: int, expert: int) -> int:
        return expert

    def all_resident(self) -> bool:
        return True

    def count_hits(self, n: int) -> None:
        """Lookups the captured step served without calling `get` (all hits)."""
        self._gets += n

    def stats(self) -> dict[str, Any]:
        return {"provider": "resident", "gets": self._gets, "bytes_fetched": 0, "fetches": 0, "stall_s": 0.0,
                "tiers": {"gpu": {"hits": self._gets, "misses": 0}}}

    def reset_stats(self) -> None:
        self._gets = 0

    # HF naming, one expert at a time (legacy Mixtral layout that every transformers version loads)
    def load_hf(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy experts from an HF Mixtral state dict (per-expert w1/w2/w3 or fused gate_up/down)."""
        cfg = self.config
        Fd = cfg.intermediate_size
        with torch.no_grad():
            for l in range(cfg.num_hidden_layers):
                fused_gu = state_dict.get(f"model.layers.{l}.mlp.experts.gate_up_proj")
                fused_d = state_dict.get(f"model.layers.{l}.mlp.experts.down_proj")
                if fused_gu is not None and fused_d is not None:
                    self.w1[l].copy_(fused_gu[:, :Fd, :])
                    self.w3[l].copy_(fused_gu[:, Fd:, :])
                    self.w2[l].copy_(fused_d)
                    continue
                for e in range(cfg.num_local_experts):
                    for name, plist in (("w1", self.w1), ("w3", self.w3), ("w2", self.w2)):
                        t = None
                        for prefix in ("block_sparse_moe", "mlp"):
                            t = state_dict.get(f"model.layers.{l}.{prefix}.experts.{e}.{name}.weight")
                            if t is not None:
                                break
                        if t is None:
                            if strict:
                                raise ValueError(f"state dict lacks expert weights for layer {l} expert {e} ({name})")
                            continue
                        plist[l][e].copy_(t)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Experts under the legacy HF names model.layers.{l}.block_sparse_moe.experts.{e}.w{1,2,3}.weight."""
        out: dict[str, torch.Tensor] = {}
        for l in range(self.config.num_hidden_layers):
            for e in range(self.config.num_local_experts):
                for name, plist in (("w1", self.w1), ("w2", self.w2), ("w3", self.w3)):
                    out[f"model.layers.{l}.block_sparse_moe.experts.{e}.{name}.weight"] = \
                        plist[l][e].detach().contiguous()
        return out


# --------------------------------------------------------------------------------------------
# Fetch from the store on demand (simple reference provider)
# --------------------------------------------------------------------------------------------
@dataclass
class ExpertSource:
    """Everything needed to fetch and decode one model's experts from an expert store."""

    client: StoreClient
    model: str
    config: "ModelConfig"
    manifest: Manifest
    precision: str = "bf16"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # compute dtype of the model

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        precisions = self.manifest.precisions
        if precisions and self.precision not in precisions:
            raise ValueError(f"model {self.model!r} has no {self.precision} experts in the store "
                             f"(available: {', '.join(precisions)})")

    def blob_size(self, layer: int, expert: int) -> int | None:
        entry = self.manifest.blobs.get((layer, expert, self.precision))
        return None if entry is None else entry.size

    def fetch(self, layer: int, expert: int, out: memoryview | None = None,
              priority: str = "demand") -> bytes | memoryview:
        """The encoded blob (whole), written into `out` when given."""
        return self.client.fetch_expert(self.model, layer, expert, self.precision, out=out, priority=priority)

    def fetch_many(self, refs: Iterable[tuple[int, int]], priority: str = "demand"):
        """Iterator of ((layer, expert), blob) over one streaming call."""
        full = [(l, e, self.precision) for l, e in refs]
        for ref, blob in self.client.fetch_experts(self.model, full, priority=priority):
            yield (ref[0], ref[1]), blob

    def decode(self, blob: bytes | memoryview, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> ExpertWeights:
        return decode_expert_blob(blob, device=device or self.device, dtype=dtype)


class StoreExperts(ExpertProvider):
    """Fetch experts from the store when first needed; keep them decoded in a dict.

    cache_bytes=None keeps every fetched expert; otherwise an LRU bounded by the decoded bytes
    (experts the current layer holds are never evicted mid-layer). materialize=True stores
    experts dense in the compute dtype (int8/int4 dequantized once at load); False keeps the
    packed bytes and dequantizes per call.
    """

    def __init__(self, source: ExpertSource, cache_bytes: int | None = None, materialize: bool = True) -> None:
        self.source = source
        self.precision = source.precision
        self.cache_bytes = cache_bytes
        self.materialize = materialize
        self._cache: OrderedDict[tuple[int, int], ExpertWeights] = OrderedDict()
        self._pinned: set[tuple[int, int]] = set()
        self._bytes = 0
        self._lock = threading.Lock()
        self.reset_stats()

    def reset_stats(self) -> None:
        self._hits = self._misses = self._fetches = self._bytes_fetched = self._evictions = 0
        self._stall_s = 0.0
        self._accounted: set[tuple[int, int]] = set()  # looked up by prepare(), not counted again by get()

    def _load(self, key: tuple[int, int], blob: bytes | memoryview) -> ExpertWeights:
        w = self.source.decode(blob, dtype=self.source.dtype if self.materialize else None)
        self._fetches += 1
        self._bytes_fetched += len(blob)
        self._cache[key] = w
        self._bytes += w.nbytes
        self._evict()
        return w

    def _evict(self) -> None:
        if self.cache_bytes is None:
            return
        for key in list(self._cache):
            if self._bytes <= self.cache_bytes:
                break
            if key in self._pinned:
                continue
            w = self._cache.pop(key)
            self._bytes -= w.nbytes
            self._evictions += 1

    def prepare(self, layer: int, experts: Sequence[int]) -> None:
        with self._lock:
            keys = [(layer, e) for e in experts]
            self._pinned.update(keys)
            missing = [k for k in keys if k not in self._cache]
            self._hits += len(keys) - len(missing)
            self._misses += len(missing)
            self._accounted.update(keys)
            if not missing:
                return
            # one streaming call for all of this layer's missing experts
            t0 = time.perf_counter()
            for key, blob in self.source.fetch_many(missing):
                self._load(key, blob)
            self._stall_s += time.perf_counter() - t0

    def ready(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._cache

    def location(self, layer: int, expert: int) -> str:
        return "gpu" if (layer, expert) in self._cache else "store"

    def get(self, layer: int, expert: int) -> ExpertWeights:
        key = (layer, expert)
        with self._lock:
            counted = key in self._accounted
            self._accounted.discard(key)
            w = self._cache.get(key)
            if w is not None:
                self._hits += 0 if counted else 1
                self._cache.move_to_end(key)
                return w
            self._misses += 0 if counted else 1
            t0 = time.perf_counter()
            self._pinned.add(key)
            w = self._load(key, self.source.fetch(layer, expert))
            self._stall_s += time.perf_counter() - t0
            return w

    def release(self, layer: int, experts: Sequence[int]) -> None:
        with self._lock:
            self._pinned.difference_update((layer, e) for e in experts)
            self._evict()

    def stats(self) -> dict[str, Any]:
        return {
            "provider": "store",
            "precision": self.precision,
            "tiers": {"gpu": {"hits": self._hits, "misses": self._misses}},
            "fetches": self._fetches,
            "bytes_fetched": self._bytes_fetched,
            "evictions": self._evictions,
            "stall_s": self._stall_s,
            "resident_bytes": self._bytes,
            "resident_experts": len(self._cache),
        }

    def close(self) -> None:
        self._cache.clear()
        self._bytes = 0
