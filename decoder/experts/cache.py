"""The AdapMoE expert cache: a GPU tier of preallocated slots over a pinned host tier over the store.

What a slot holds, its size, the per-layer quotas and the eviction policy are in gpu_slots.py;
the pinned host tier (the only decoder code that parses blobs) in host_tier.py; the copy and
dequant streams, staging buffers and the live load costs in copies.py; the demand-first load
queue and its threads in loader.py; the low-precision tier for low-weight misses (HOBBIT) in
low_precision.py; GPU evictions written back to a partial host tier in demote.py. This module
composes them: lookups, slot allocation and eviction, and the statistics.

    store ──fetch_expert(out=host slot)──▶ host tier (pinned LRU) ──copy stream──▶ GPU slot ──▶ matmul

GPU tier: one preallocated uint8 pool `[slots, slot_bytes]` on the compute device (no allocator
churn). Layer l may keep `quota[l]` experts (from the DP plan, decoder/cache_plan.py); which one
gives its slot up is the eviction policy's choice (`eviction="lru"`, or `"lfru"`: recency and
frequency; with `admission=True` a prefetch evicts only an expert less likely to be reused than
it is to be used: gpu_slots.EvictionPolicy). A few scratch slots (top_k by default) absorb
demand loads of a layer whose own slots are all pinned; at `release` the layer is trimmed back
to its quota. Experts are used in
place: the ExpertWeights of a slot are views of its bytes. `gpu_cache_bytes` counts the bytes of
these slots (slot_bytes each).

A slot holds an expert in one of two forms:
- raw (bf16 stores; int8/int4 with `dense_slots=False`): the blob's raw payload as it crossed the
  link, viewed by expert_store.quant.tensors_from_raw; int8/int4 matrices are dequantized by
  ExpertWeights.forward on every call.
- dense (`dense_slots`, default on for int8/int4 on CUDA): w1, w3, w2 dequantized ONCE at load
  into the compute dtype (source.dtype), so a slot is the dense expert's size (4x an int4 payload
  in bf16) and forward is three plain matmuls. The link still carries the compact payload
  (through a staging buffer and the dequant stream: copies.py).

Host tier: one pinned arena (pin_memory only when CUDA is available) of fixed-size slots, an
LRU of at most `host_cache_bytes // slot` experts. The store writes the encoded blob straight
into a host slot (`fetch_expert(out=...)`); an uncompressed blob's raw payload is used where it
landed, a compressed one is decoded into a second slot (the first goes back to the free list).
With `fetch_workers=N` (default 0: off) the host arena is an expert_store FetchPool: N processes,
each with its own gRPC channel, receive blobs straight into its slots (past the ~1 GB/s one
Python process receives), and it is page-locked in place with cudaHostRegister. They also
decode coded bf16 blobs into their slots (`FetchPool(raw=True)`), checked there once.
`fetch_demand_parts=k` (default 1: off) stripes each demand miss's store fetch over up to k of
them (`FetchPool.submit(parts=k)`): one process moves a blob at a fraction of what they move
together, and a demand miss is what a token waits for. `fetch_fill_parts=k` does the same for
the fetches of a fill (fill_host): the pool then brings the fill's blobs in one after another at
its whole rate, most wanted first, so a first token that needs one of them waits for it alone.

A host tier that holds part of the model (in front of a store) keeps what the GPU does not:
it evicts the experts the GPU holds first, and an expert the GPU evicts that it does not hold
is written back to it (`demote_evictions`, default on there with raw slots: demote.py), so the
two tiers together hold up to their sum of distinct experts and the store is asked only for
experts in neither.

A co-located store's arena (local-shm://) is read in place; on CUDA a copy out of a blob the
arena keeps pinned counts as loaded as soon as it is issued, without waiting for it to end
before the arena's seqlock check (`arena_pins`, default on: host_tier.ArenaPins pins the blobs
this decoder copies while the arena holds the whole model).

Copies (copies.py): one copy stream, one event per expert; compute waits on that event only.
Before a slot is overwritten the copy waits on the event recorded when the layer released it, so
in-flight kernels never see their weights change.

Loads (loader.py): demand first, prefetches by predicted score when no demand is queued; a `get`
that finds its load still queued runs it on the caller's thread at once. A prefetch never
evicts an expert the current token needs: not the experts pinned by the current layer
(prepare .. release), nor any expert touched during the current token.

Misses computed on the host (`miss_compute`, host_compute.py; the cache's side in
host_misses.py): "copy" (default) copies every miss; "cpu" computes every miss it can on the
host's cores straight from the host tier's bytes;
"auto" decides per miss by measured cost (one copy, one CPU call, the work queued on each side:
host_compute.MissRule). A miss can go to the host when its expert is in the host tier, no load
of it is in flight, and the layer's routing (told by host_compute.MissTokens before `prepare`)
gives it at most `cpu_max_tokens` tokens. Such an expert takes no GPU slot and moves no bytes
into the GPU tier; `get` hands out a callable that computes it on the host (the eager MoE
block), and the decode step sends the layer's hidden state to the host once (`compute_on_host`)
and adds the weighted sum the host returns, while the GPU works on the rest.

Store prefetches into the host tier (`prefetch_host`, for a host tier in front of a store): the
prefetcher's predictions of experts in neither tier start a store fetch into the host tier, far
enough ahead to hide the store (its store lookahead, prefetch.py). `host_prefetch` threads run
them (host_prefetch.py; the bound on them in flight; default half the fetch processes, at least
one, when the host tier keeps some of the experts but not all, and is not a co-located arena),
best score first, below every other load (a FetchPool sends them as "background" requests,
bounded, behind its demand and prefetches). A load
of an expert whose fetch is in flight waits for it rather than fetching it again. Counted:
host_prefetch_requests / loads / bytes / useful (a later load found it in the host tier) /
unused_evicted / waited / dropped / errors.

Low-precision misses (`miss_precision`, HOBBIT; the gating's `miss_precision_threshold` names the
low-weight experts): with `low_precision_misses="store"` only an expert whose full-precision copy
is not in the host tier is fetched at miss_precision (a smaller blob over the wire); one in the
host tier is copied at full precision, which is cheap. `low_precision_store_misses` counts the
misses served at miss_precision whose full copy was only in the store.

Statistics (demand path): per tier lookups = hits + misses, bytes moved into each tier (the
compact payload over the link, also for dense slots), loads, stall time in `get` (and waiting
for the host's share of a layer), late prefetches, misses computed on the host (`cpu_misses`,
`host_compute`), and the live EWMA cost (seconds) of loading one expert into the GPU from each
tier (`load_cost`), which cost-aware gating reads.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch

from decoder.experts.gpu_slots import (DenseLayout, EvictionPolicy, GpuEntry,
                                      allocate, dense_slots_for, host_slot_bytes, plan_quotas, raw_slot_bytes)
from decoder.experts.copies import Copies, LoadCosts
from decoder.experts.cold_start import HostFill, fill_order
from decoder.experts.demote import Demoter
from decoder.experts.host_misses import HostMisses
from decoder.experts.host_prefetch import HostPrefetcher
from decoder.experts.host_compute import HostExperts, HostJob, MissRule, OnHost
from decoder.experts.host_tier import HostEntry, HostTier
from decoder.experts.loader import LoadQueue, LoaderThreads, LoadTask
from decoder.experts.low_precision import LowPrecisionTier
from decoder.experts.provider import ExpertProvider, ExpertSource, ExpertWeights, expert_weights_from_views
from decoder.kernels.fused_moe import ExpertBank

log = logging.getLogger(__name__)

TIERS = ("gpu", "host", "store")
MISS_RATE_ALPHA = 0.05                 # weight of one demand lookup in a layer's miss rate

class ExpertCache(ExpertProvider):
    """GPU slots + pinned host LRU + store, behind the ExpertProvider interface."""

    def __init__(self, source: ExpertSource, *, gpu_slots: Sequence[int] | None = None,
                 gpu_cache_bytes: int | None = None, host_cache_bytes: int | None = 0,
                 plan: str = "uniform", profile: Mapping[str, Any] | None = None,
                 scratch_slots: int | None = None, workers: int = 1, ewma_alpha: float = 0.3,
                 pin_memory: bool | None = None, miss_precision: str | None = None,
                 low_slots: int | None = None, fetch_workers: int = 0, fetch_target: str | None = None,
                 fetch_demand_parts: int = 1, fetch_fill_parts: int = 1,
                 fetch_options: Mapping[str, Any] | None = None, dense_slots: bool | None = None,
                 eviction: str = "lru", eviction_decay: float = 0.5, admission: bool = False,
                 miss_compute: str = "copy", cpu_threads: int | None = None, cpu_pack_bytes: int | None = None,
                 cpu_workers: int = 1,
                 cpu_max_tokens: int = 4, host_prefetch: int | None = None, low_precision_misses: str = "all",
                 demote_evictions: bool | None = None, arena_pins: bool = True) -> None:
        cfg = source.config
        self.source = source
        self.config = cfg
        self.precision = source.precision
        self.device = torch.device(source.device)
        self.cuda = self.device.type == "cuda"
        self.L, self.E, self.top_k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)

        # --- sizes: probe one blob for the raw payload size; the manifest gives blob sizes ---
        # layers with routed experts (a dense layer, as Qwen's decoder_sparse_step makes, has none)
        self.moe_layers = list(getattr(cfg, "moe_layers", range(self.L)))
        probe = bytes(source.fetch(self.moe_layers[0], 0, priority="demand"))
        from expert_store import format as blob_format
        header, _ = blob_format.read_header(probe)
        self.raw_size = int(header.raw_size)     # compact payload: what crosses the link
        # dense slots: int8/int4 dequantized once per load into the compute dtype (see the module doc)
        self.dense_slots = dense_slots_for(dense_slots, self.precision, self.cuda)
        self.dense_layout = DenseLayout.of(header, source.dtype) if self.dense_slots else None
        self.slot_bytes = self.dense_layout.nbytes if self.dense_layout else raw_slot_bytes(header)
        max_blob = len(probe)
        for l in self.moe_layers:
            for e in range(self.E):
                sz = source.blob_size(l, e)
                if sz is not None:
                    max_blob = max(max_blob, sz)
        # a FetchPool's processes write coded bf16 blobs into their slots decoded (codec none)
        self.host_slot_bytes = host_slot_bytes(header, max_blob, receives_raw=bool(fetch_workers))

        # --- GPU tier: quotas + scratch, one pool --------------------------------------------
        if scratch_slots is None:
            scratch_slots = self.top_k
        if gpu_slots is None:
            gpu_slots = plan_quotas(cfg, self.slot_bytes, gpu_cache_bytes, scratch_slots, plan, profile)
        gpu_slots = [int(s) for s in gpu_slots]
        moe = set(self.moe_layers)
        if len(gpu_slots) != self.L or any(not (1 <= s <= self.E if l in moe else s == 0)
                                           for l, s in enumerate(gpu_slots)):
            raise ValueError(f"gpu_slots must give 1..{self.E} slots for each of the {len(moe)} MoE layers "
                             f"(0 for a dense layer) of {self.L}, got {gpu_slots}")
        self.quota = gpu_slots
        self.plan = plan  # how the quotas were planned (when gpu_slots was not given)
        self.scratch_slots = 0 if all(gpu_slots[l] == self.E for l in moe) else int(scratch_slots)
        n_pool = sum(gpu_slots) + self.scratch_slots
        self.gpu_pool = allocate((n_pool, self.slot_bytes), self.device, "the GPU expert slots (gpu_cache_bytes)")
        self._gpu_free: list[int] = list(range(n_pool - 1, -1, -1))
        self._gpu: list[OrderedDict[int, GpuEntry]] = [OrderedDict() for _ in range(self.L)]
        self._gpu_slot_events: dict[int, Any] = {}  # free slot -> event its last readers recorded
        self._bank = self._make_bank(header)
        # which loaded expert gives its slot up, and whether a prefetch may take one (gpu_slots.py)
        self.policy = EvictionPolicy(eviction, eviction_decay, admission)
        self._miss_rate = [0.0] * self.L     # per layer: EWMA of demand misses per lookup
        self._all_loaded = False             # all_resident() once it held
        self._full_quota = all(self.quota[l] == self.E for l in self.moe_layers)
        self._raw_offsets = _offsets(header)

        # --- host tier: pinned arena of fixed slots ------------------------------------------
        self.workers = max(1, int(workers))
        self.fetch_workers = int(fetch_workers or 0)
        if self.fetch_workers < 0:
            raise ValueError("fetch_workers must be >= 0")
        if self.fetch_workers:  # one loader thread per fetch in flight, so N processes are kept busy
            self.workers = max(self.workers, self.fetch_workers)
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.host = HostTier(self, cache_bytes=int(host_cache_bytes or 0), slot_bytes=self.host_slot_bytes,
                             staging_slots=2 * (self.workers + 1),    # receive/decode staging per loader
                             pin_memory=pin_memory, fetch_workers=self.fetch_workers, fetch_target=fetch_target,
                             fetch_options=fetch_options, arena_pins=arena_pins, demand_parts=fetch_demand_parts,
                             fill_parts=fetch_fill_parts)
        self.host_cache_bytes, self.host_capacity = self.host.cache_bytes, self.host.capacity
        self.host_pool, self.pinned = self.host.pool, self.host.pinned

        # --- copies: copy stream (+ dequant stream and staging buffers for dense slots) ------------
        self.costs = LoadCosts(ewma_alpha, self.raw_size, max_blob, self.cuda)
        self.copies = Copies(self.device, self._lock, self._cond, self.costs, self.dense_layout,
                             raw_slot_bytes(header), self.workers)
        self.copy_stream, self.dequant_stream = self.copies.copy_stream, self.copies.dequant_stream
        self.staging_buffers = self.copies.staging_buffers
        self._compute_stream = torch.cuda.current_stream(self.device) if self.cuda else None

        # --- GPU evictions written back to a partial host tier (demote.py) ------------------------
        if demote_evictions is None:   # on when a store lies behind a host tier holding part of the model
            demote_evictions = (0 < self.host_capacity < len(self.moe_layers) * self.E
                                and self.host.arena is None and self.dense_layout is None)
        elif demote_evictions and self.dense_layout is not None:
            raise ValueError("demote_evictions needs raw GPU slots: dense slots hold dequantized weights, "
                             "not the payload (dense_slots=False)")
        self.demoter = Demoter(self) if demote_evictions else None
        self.profile = profile                            # the calibration profile (fill order)
        self._host_fill: HostFill | None = None           # the cold start's fill (start_host_fill)

        # --- loader -----------------------------------------------------------------------------
        self._queue = LoadQueue(self._cond)
        self._tasks = self._queue.tasks       # (layer, expert) -> its load in flight
        self._pinned_keys: set[tuple[int, int]] = set()
        self._looked_up: set[tuple[int, int]] = set()
        self._handed_out: dict[int, set[int]] = {}
        self._transient = 0                   # entries in buffers outside the pool (slot -1)
        self.step = 0
        self._last_layer = -1
        # --- optional low-precision copies for demand misses of low-weight experts (HOBBIT) ---
        self.miss_precision = miss_precision
        self._allow_low: set[tuple[int, int]] = set()
        self._low: LowPrecisionTier | None = None
        self._stall_total_s = 0.0  # monotonic stall time (stall_seconds); stats' stall_s resets
        if miss_precision is not None:
            if miss_precision == self.precision:
                raise ValueError(f"miss_precision must differ from the cache precision ({self.precision})")
            low_source = dataclasses.replace(source, precision=miss_precision)  # checks the store has it
            self._low = LowPrecisionTier(self, low_source, int(low_slots or max(self.L, 2 * self.top_k)),
                                          dense_slots_for(dense_slots, miss_precision, self.cuda))
        # --- misses computed on the host's cores (host_compute.py) ----------------------------
        self.miss_rule = MissRule(miss_compute, workers=cpu_workers)
        if miss_compute != "copy" and (cfg.expert_act != "silu" or cfg.expert_bias):
            if miss_compute == "cpu":
                raise ValueError(f"miss_compute='cpu' computes SiLU-GLU experts without biases; "
                                 f"{cfg.family}'s experts are {cfg.expert_act}{' with biases' if cfg.expert_bias else ''}")
            log.info("miss_compute=auto: %s's experts are not plain SiLU-GLU: every miss is copied", cfg.family)
            self.miss_rule = MissRule("copy")
        self.miss_compute = self.miss_rule.mode
        self.cpu_max_tokens = int(cpu_max_tokens)
        self.host_experts: HostExperts | None = None
        if self.miss_compute != "copy":
            # packed copies may take twice the host tier (an int4 expert repacked as per-row int8
            # for the faster kernel keeps twice its bytes); `cpu_workers` experts run at once
            self.host_experts = HostExperts(pack_bytes=2 * self.host_cache_bytes if cpu_pack_bytes is None
                                            else int(cpu_pack_bytes), threads=cpu_threads, alpha=ewma_alpha,
                                            workers=cpu_workers)
        self._host_misses = HostMisses(self)            # which misses the host computes, and the calls
        if low_precision_misses not in ("all", "store"):
            raise ValueError(f"low_precision_misses must be 'all' or 'store', got {low_precision_misses!r}")
        self.low_precision_misses = low_precision_misses
        # --- store prefetches into the host tier (prefetch_host): bounded, below every other load ---
        if host_prefetch is None:
            # on when the host tier keeps some experts but not all of them, and a store (not a
            # co-located arena, whose experts are in host memory) lies behind it
            partial = 0 < self.host_capacity < len(self.moe_layers) * self.E
            host_prefetch = max(1, self.fetch_workers // 2) if partial and self.host.arena is None else 0
        self.host_prefetch = max(0, int(host_prefetch))
        self.reset_stats()
        self._loaders = LoaderThreads(self._queue, self._lock, self._cond, self._run, self.workers)
        self._host_prefetcher = HostPrefetcher(self, self.host_prefetch)

    # =========================================================================================
    # statistics
    # =========================================================================================
    def reset_stats(self) -> None:
        with self._lock:
            self._tier = {t: {"lookups": 0, "hits": 0, "misses": 0, "bytes": 0, "loads": 0} for t in TIERS}
            self._prefetch_tier = {t: {"lookups": 0, "hits": 0, "misses": 0} for t in TIERS}
            self._counts = dict(stall_s=0.0, steps=0, demand_loads=0, prefetch_requests=0, prefetch_loads=0,
                           prefetch_useful=0, prefetch_late=0, prefetch_dropped_no_slot=0, prefetch_refused=0,
                           prefetch_cancelled=0, prefetch_unused_evicted=0, prefetch_errors=0,
                           evictions_gpu=0, evictions_host=0, scratch_loads=0, transient_loads=0,
                           inline_loads=0, errors=0, cpu_misses=0, cpu_tokens=0,
                           # store prefetches into the host tier (prefetch_host): asked, fetched, used
                           # (a GPU load found it there), evicted unused, a load that waited for one in
                           # flight, dropped (stale or past the queue bound), failed
                           host_prefetch_requests=0, host_prefetch_loads=0, host_prefetch_bytes=0,
                           host_prefetch_useful=0, host_prefetch_unused_evicted=0, host_prefetch_waited=0,
                           # a demand load that waited for a queued FetchPool fetch and moved it ahead
                           host_fetch_promoted=0,
                           host_prefetch_dropped=0, host_prefetch_errors=0,
                           # demand misses served at miss_precision over the wire (low_precision_misses)
                           low_precision_store_misses=0,
                           # GPU evictions written back to the host tier, waits for a staging
                           # buffer, and found there by a later GPU load (demote.py)
                           demotions=0, demotions_waited=0, demoted_used=0)
            # demand lookups served by the low-precision tier (lookups = hits + misses)
            self._low_counts = {"lookups": 0, "hits": 0, "misses": 0, "bytes": 0, "loads": 0}
            if getattr(self, "host_experts", None) is not None:
                self.host_experts.reset_stats()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self.copies.harvest()
            tiers = {t: dict(v) for t, v in self._tier.items()}
            if self._low is not None:
                tiers["gpu-" + self.miss_precision] = dict(self._low_counts)
            for v in tiers.values():
                v["hit_rate"] = (v["hits"] / v["lookups"]) if v["lookups"] else 0.0
            steps = max(1, self._counts["steps"])
            c = dict(self._counts)
            return {
                "provider": "adapmoe-cache",
                "precision": self.precision,
                "device": str(self.device),
                "pinned_host": self.pinned,
                "eviction": self.policy.kind,
                "tiers": tiers,
                "prefetch_tiers": {t: dict(v) for t, v in self._prefetch_tier.items()},
                "fetches": self._tier["store"]["loads"],
                "bytes_fetched": self._tier["store"]["bytes"],
                "bytes_per_token": {t: self._tier[t]["bytes"] / steps for t in TIERS},
                "stall_s": c.pop("stall_s"),
                "stall_s_per_token": self._counts["stall_s"] / steps,
                "load_cost_s": {t: self.load_cost(t) for t in TIERS},
                "load_cost_measured": self.costs.measured(),
                "slot_bytes": self.slot_bytes,
                "dense_slots": self.dense_slots,
                "raw_bytes": self.raw_size,
                "staging_buffers": self.staging_buffers,
                "host_slot_bytes": self.host_slot_bytes,
                "gpu_quota": list(self.quota),
                "scratch_slots": self.scratch_slots,
                "gpu_resident": sum(1 for d in self._gpu for en in d.values() if not en.loading),
                "host_capacity": self.host_capacity,
                "host_resident": sum(1 for h in self.host.entries.values() if h.resident),
                "host_fill": self._host_fill.stats() if self._host_fill is not None else None,
                # the receiving processes of a FetchPool host tier (fetch_workers): requests done, queued
                "fetch_pool": self.host.fetch_pool.stats() if self.host.fetch_pool is not None else None,
                # copies out of a co-located arena: counted loaded at once (pinned) or after a check
                "arena_copies": self.host.pins.stats() if self.host.pins is not None else None,
                "miss_compute": self.miss_compute,
                "host_prefetch_threads": self.host_prefetch,
                "low_precision_misses": self.low_precision_misses if self._low is not None else None,
                "host_compute": ({**self.host_experts.stats(), "miss_rule": self.miss_rule.stats()}
                                 if self.host_experts is not None else None),
                **c,
            }

    def _add_stall(self, seconds: float) -> None:
        """Count `seconds` the compute thread spent blocked in get() waiting for a load. Lock held."""
        self._counts["stall_s"] += seconds
        self._stall_total_s += seconds

    def stall_seconds(self) -> float:
        """Total seconds get() has blocked waiting for expert loads since the cache was built
        (monotonic: reset_stats does not reset it). The prefetcher takes per-layer deltas of it
        to measure a layer's compute time without the stalls. Read without the lock (one float)."""
        return self._stall_total_s

    def store_fetch_cost(self) -> float:
        """Live EWMA seconds of one store fetch into the host tier (the prefetcher's store lookahead)."""
        with self._lock:
            return self.costs.store.value

    def load_cost(self, location: str) -> float:
        """Live EWMA seconds to bring one expert into the GPU tier from `location`."""
        if location == "gpu":
            return 0.0
        with self._lock:
            self.copies.harvest()
            return self.costs.cost(location)

    # =========================================================================================
    # ExpertProvider interface
    # =========================================================================================
    def begin_token(self) -> None:
        with self._lock:
            self.step += 1
            self._counts["steps"] += 1
            self._last_layer = -1
            # prefetches queued for the previous token's layers are stale now
            self._counts["prefetch_cancelled"] += self._queue.drop_queued_prefetches()
            self._host_prefetcher.drop_stale(self.step)
            self.copies.harvest()

    def location(self, layer: int, expert: int) -> str:
        # no lock: one dict membership test each (atomic); a load racing it is seen a moment later
        if expert in self._gpu[layer]:
            return "gpu"              # resident, or its H2D copy already issued
        if (layer, expert) in self.host:   # the pool, or a co-located store's arena
            return "host"
        return "store"

    def ready(self, layer: int, expert: int) -> bool:
        ent = self._gpu[layer].get(expert)   # no lock, as in location()
        if ent is None or ent.loading:
            return False
        ev = ent.copy_event
        if ev is None:
            return True
        if ev.query():
            ent.copy_event = None     # done: get() need not make the compute stream wait on it
            return True
        return False

    # --- the GPU-driven decode step (decoder/step.py) -----------------------------------------
    def expert_bank(self, layer: int) -> ExpertBank | None:
        """The GPU pool as a bank for the fused MoE kernels: every slot holds w1, w3, w2 at the
        same offsets: dense slots or raw bf16 payloads in the compute dtype, or raw int8/int4
        payloads the kernels dequantize in place. None when the layout does not allow it (bf16
        slots under another compute dtype, mixed quantization settings)."""
        return self._bank

    def _make_bank(self, header: Any) -> ExpertBank | None:
        if self.dense_layout is not None:
            dtype = self.dense_layout.dtype
            offsets = {name: off for name, off, _ in self.dense_layout.tensors}
        elif self.precision == "bf16" and all(t.quant is None for t in header.tensors):
            dtype = torch.bfloat16
            offsets = {t.name: int(t.offset) for t in header.tensors}
        elif all(t.quant is not None for t in header.tensors):
            return self._quantized_bank(header)
        else:
            return None
        shapes = {t.name: (int(t.shape[0]), int(t.shape[1])) for t in header.tensors}
        Fd, H = self.config.intermediate_size, self.config.hidden_size
        if (dtype != self.source.dtype or set(offsets) != {"w1", "w3", "w2"}
                or shapes != {"w1": (Fd, H), "w3": (Fd, H), "w2": (H, Fd)}):
            return None
        return ExpertBank.pool(self.gpu_pool, dtype, offsets, Fd, H)

    def _quantized_bank(self, header: Any) -> ExpertBank | None:
        """Raw int8/int4 slots read in place by the kernels (one bits / group size for all)."""
        quants = {(int(t.quant.bits), int(t.quant.group_size)) for t in header.tensors}
        shapes = {t.name: (int(t.shape[0]), int(t.shape[1])) for t in header.tensors}
        Fd, H = self.config.intermediate_size, self.config.hidden_size
        if len(quants) != 1 or shapes != {"w1": (Fd, H), "w3": (Fd, H), "w2": (H, Fd)}:
            return None
        (bits, group), = quants
        try:
            return ExpertBank.quantized_pool(self.gpu_pool, bits, group, {t.name: int(t.offset) for t in header.tensors},
                                             {t.name: int(t.quant.scales_offset) for t in header.tensors}, Fd, H)
        except ValueError:
            return None

    def gpu_slot(self, layer: int, expert: int) -> int:
        ent = self._gpu[layer].get(expert)    # no lock: called between get() and release()
        return ent.slot if ent is not None and not ent.loading else -1

    def miss_rate(self, layer: int) -> float:
        """Recent demand misses per lookup of `layer` (EWMA over about 20 lookups)."""
        return self._miss_rate[layer]

    def all_resident(self) -> bool:
        """Every expert of every layer is loaded into a pool slot (quota E everywhere, so none is
        evicted again); their copies may still be in flight (the step synchronises once). Asked
        every decode step: O(1) unless every quota is full and the loads are still coming in,
        and once true it stays true (nothing is evicted at full quotas)."""
        if self._all_loaded:
            return True
        if self._bank is None or not self._full_quota:
            return False
        with self._lock:
            self._all_loaded = all(len(self._gpu[l]) == self.E
                                   and all(not en.loading and en.slot >= 0 for en in self._gpu[l].values())
                                   for l in self.moe_layers)
        return self._all_loaded

    def count_hits(self, n: int) -> None:
        """GPU lookups the captured step served without calling prepare/get (all hits)."""
        with self._lock:
            g = self._tier["gpu"]
            g["lookups"] += n
            g["hits"] += n

    def _check(self, layer: int, expert: int) -> None:
        if not (0 <= layer < self.L and 0 <= expert < self.E) or self.quota[layer] == 0:
            raise ValueError(f"no expert ({layer}, {expert}): the model has {self.L} layers of {self.E} experts"
                             f" (MoE layers {self.moe_layers})")

    def prepare(self, layer: int, experts: Sequence[int]) -> None:
        needed = sorted({int(e) for e in experts})
        for e in needed:
            self._check(layer, e)
        with self._lock:
            if layer <= self._last_layer:   # the engine did not call begin_token: a new step anyway
                self.step += 1
                self._counts["steps"] += 1
            self._last_layer = layer
            self._pinned_keys.update([(layer, e) for e in needed])
            if self._tasks:
                # queued prefetches for this layer that the routing did not pick are useless now
                for (l, e), task in list(self._tasks.items()):
                    if l == layer and task.kind == "prefetch" and task.state == "queued" and e not in needed:
                        self._finish(task, dropped=True)
                        self._counts["prefetch_cancelled"] += 1
            low = self._low is not None
            on_host = self._host_misses.plan(layer, needed) if self.host_experts is not None else ()
            for e in needed:
                if low and self._use_low(layer, e):
                    continue          # get() serves it from the low-precision tier
                if e in on_host:
                    self._lookup_on_host(layer, e)
                    continue
                self._lookup(layer, e)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        self._check(layer, expert)
        key = (layer, expert)
        t0 = None                     # set when the expert is not there: the stall starts
        with self._lock:
            if self._host_misses.computes(layer, expert):
                return OnHost(lambda x, layer=layer, expert=expert: self._host_misses.call(layer, expert, x))
            low = self._low is not None and self._use_low(layer, expert)
            if not low:
                if key not in self._looked_up:
                    self._lookup(layer, expert)
                lru = self._gpu[layer]
                while True:
                    ent = lru.get(expert)
                    if ent is not None and not ent.loading:
                        # recency was set by the lookup (hits in lookup order, then misses as
                        # they were loaded): the same order whichever load finished first
                        ent.step = self.step
                        handed = self._handed_out.get(layer)
                        if handed is None:
                            handed = self._handed_out[layer] = set()
                        handed.add(expert)
                        w = ent.weights
                        ev = ent.copy_event
                        break
                    if t0 is None:
                        t0 = time.perf_counter()
                    task = self._tasks.get(key)
                    if task is None:
                        task = self._enqueue(key, "demand")
                    if task.state == "queued":
                        # still waiting behind the loader: run it here, now
                        task.state = "running"
                        self._counts["inline_loads"] += 1
                        self._lock.release()
                        try:
                            self._run(task)
                        finally:
                            self._lock.acquire()
                    else:
                        self._cond.wait(timeout=0.05)
                    if task.state == "done" and task.error is not None and self._tasks.get(key) is task:
                        del self._tasks[key]
                    if task.state == "done" and task.error is not None:
                        raise task.error
        if low:
            t0 = time.perf_counter()
            w, ev, waited = self._low.get(layer, expert)
            if not waited:
                t0 = None
            elif key not in self.host:
                with self._lock:   # its full-precision copy was only in the store: a smaller blob crossed the wire
                    self._counts["low_precision_store_misses"] += 1
        if ev is not None:
            stream = torch.cuda.current_stream(self.device)
            self._compute_stream = stream
            stream.wait_event(ev)
        if t0 is not None:
            with self._lock:
                self._add_stall(time.perf_counter() - t0)
        assert w is not None
        return w

    def release(self, layer: int, experts: Sequence[int]) -> None:
        with self._lock:
            self._host_misses.release(layer)
            handed = self._handed_out.pop(layer, None)
            pinned, looked, allow_low = self._pinned_keys, self._looked_up, self._allow_low
            for e in experts:
                key = (layer, e)
                pinned.discard(key)
                looked.discard(key)
                if allow_low:
                    allow_low.discard(key)
            if self._low is not None:
                self._low.release(layer)
            if self.cuda and handed:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                lru = self._gpu[layer]
                for e in handed:
                    ent = lru.get(e)
                    if ent is not None:
                        ent.free_event = ev
            self._trim_layer(layer)

    def prefetch(self, layer: int, experts: Sequence[int], scores: Sequence[float] | None = None,
                 uses: Sequence[float] | None = None) -> None:
        """Speculative loads, ordered by `scores`; `uses`: each one's predicted probability of
        being used by this token (the admission test against a victim's reuse, when on)."""
        experts = [int(e) for e in experts]
        for e in experts:
            self._check(layer, e)
        with self._lock:
            lru, g = self._gpu[layer], self._prefetch_tier["gpu"]
            self._counts["prefetch_requests"] += len(experts)
            g["lookups"] += len(experts)
            for i, e in enumerate(experts):
                ent = lru.get(e)
                if ent is not None:
                    g["hits"] += 1
                    ent.step = self.step  # wanted by this token: protect it from other prefetches
                    continue
                g["misses"] += 1
                key = (layer, e)
                if key in self._tasks:
                    continue
                score = float(scores[i]) if scores is not None else 0.0
                task = self._enqueue(key, "prefetch", score=score)
                task.use = None if uses is None or uses[i] is None else float(uses[i])

    # --- store prefetches into the host tier (host_prefetch.py) ---------------------------------
    def prefetch_host(self, layer: int, experts: Sequence[int], scores: Sequence[float] | None = None) -> int:
        """Predicted misses of the host tier: a store fetch into the host tier (not the GPU) for
        each expert that is neither on the GPU, nor in the host tier, nor on its way, at the
        lowest priority of all loads (HostPrefetcher). Returns how many were queued (0 when the
        cache has no host-tier prefetch)."""
        if not self.host_prefetch:
            return 0
        experts = [int(e) for e in experts]
        for e in experts:
            self._check(layer, e)
        return self._host_prefetcher.ask(layer, experts, scores)

    def host_prefetch_pending(self) -> int:
        """Host-tier prefetches queued or in flight (tests, benchmarks)."""
        with self._lock:
            return self._host_prefetcher.pending()

    def wait_host_prefetch(self, timeout: float = 30.0) -> bool:
        """Block until no host-tier prefetch is queued or in flight (tests, benchmarks)."""
        return self._host_prefetcher.wait(timeout)

    def allow_low_precision(self, layer: int, experts: Sequence[int]) -> None:
        """Gating hint for the coming forward of `layer`: these experts carry little weight, so a
        demand miss may be served at `miss_precision` instead (HOBBIT). Experts already on the GPU
        at full precision (or on their way) are used as they are."""
        if self._low is None:
            return
        store_only = self.low_precision_misses == "store"
        with self._lock:
            for e in experts:
                e = int(e)
                self._check(layer, e)
                if e not in self._gpu[layer] and (layer, e) not in self._tasks:
                    if store_only and (layer, e) in self.host:
                        continue      # a full-precision copy from the host tier is cheap: take it
                    self._allow_low.add((layer, e))

    def _use_low(self, layer: int, expert: int) -> bool:
        return (self._low is not None and (layer, expert) in self._allow_low
                and expert not in self._gpu[layer] and (layer, expert) not in self._tasks)

    # --- misses computed on the host (host_misses.py, host_compute.py) ------------------------
    def expect_tokens(self, layer: int, counts: Mapping[int, int]) -> None:
        """The coming forward of `layer` routes counts[e] tokens to expert e (host_compute.MissTokens
        tells it before `prepare`): a miss with few tokens may be computed on the host."""
        if self.host_experts is not None:
            self._host_misses.expect(layer, counts)

    def on_host(self, layer: int) -> list[int]:
        """The experts of `layer`'s current forward that the host computes (prepare .. release)."""
        return self._host_misses.on_host(layer)

    def compute_on_host(self, layer: int, items: Sequence[tuple[int, int, float]], x: torch.Tensor) -> HostJob:
        """Start the host's share of `layer` (HostMisses.compute): `items` (row of x, expert, gate
        weight), `x` the layer's MoE input [B, H] on the device."""
        if self.host_experts is None:
            raise RuntimeError("compute_on_host: this cache has miss_compute='copy'")
        return self._host_misses.compute(layer, items, x)

    def pack_host(self, keys: Sequence[tuple[int, int]]) -> int:
        """Pack `keys` (in the host tier) for the host's kernels now, on this thread, while the
        packed budget lasts (benchmarks: before timing, as fill_host fills the host tier);
        returns how many it packed. A no-op without miss_compute."""
        return self._host_misses.pack(keys) if self.host_experts is not None else 0

    def _lookup_on_host(self, layer: int, expert: int) -> None:
        """Count one demand lookup of (layer, expert) that misses the GPU and is computed on the host."""
        key = (layer, expert)
        self._looked_up.add(key)
        self.policy.use(key, self.step)
        g = self._tier["gpu"]
        g["lookups"] += 1
        g["misses"] += 1
        self._miss_rate[layer] += MISS_RATE_ALPHA * (1.0 - self._miss_rate[layer])
        self._counts["cpu_misses"] += 1

    def close(self) -> None:
        if self._host_fill is not None:
            self._host_fill.stop()
        if self.host_experts is not None:
            self.host_experts.close()
        self._host_prefetcher.close()
        self._loaders.close()
        if self.demoter is not None:
            self.demoter.close()
        self.copies.synchronize()
        self.host.close()

    # =========================================================================================
    # internals (call with the lock held unless noted)
    # =========================================================================================
    def _lookup(self, layer: int, expert: int) -> None:
        """Count one demand lookup of (layer, expert) and start its load when missing."""
        key = (layer, expert)
        self._looked_up.add(key)
        self.policy.use(key, self.step)
        g = self._tier["gpu"]
        g["lookups"] += 1
        ent = self._gpu[layer].get(expert)
        hit = ent is not None and not ent.loading
        self._miss_rate[layer] += MISS_RATE_ALPHA * ((0.0 if hit else 1.0) - self._miss_rate[layer])
        if hit:
            g["hits"] += 1
            if ent.prefetched:
                ent.prefetched = False
                self._counts["prefetch_useful"] += 1
            ent.step = self.step
            self._gpu[layer].move_to_end(expert)
            return
        g["misses"] += 1
        if ent is not None and ent.prefetched:
            # a prefetch is bringing it in right now: late, but it saves part of the wait
            ent.prefetched = False
            self._counts["prefetch_late"] += 1
        task = self._tasks.get(key)
        if task is not None and task.state == "done":   # a failed demand load nobody collected
            del self._tasks[key]
            task = None
        if task is not None:
            if task.kind == "prefetch":
                self._queue.promote(task)
            return
        self._enqueue(key, "demand")

    def _enqueue(self, key: tuple[int, int], kind: str, score: float = 0.0) -> LoadTask:
        return self._queue.enqueue(key, kind, score, self.step)

    def _finish(self, task: LoadTask, error: BaseException | None = None, dropped: bool = False) -> None:
        self._queue.finish(task, error, dropped)

    # --- one load: store -> host -> GPU -------------------------------------------------------
    def _run(self, task: LoadTask) -> None:
        """Bring task.key into its layer's GPU slots. Called WITHOUT the lock."""
        layer, expert = task.key
        with self._lock:
            if expert in self._gpu[layer]:
                self._finish(task)
                return
            ent = self._alloc_gpu(layer, expert, task.kind, task.use)
            if ent is None:
                self._counts["prefetch_dropped_no_slot"] += 1
                self._finish(task, dropped=True)
                return
            ent.prefetched = task.kind == "prefetch"
            ent.step = self.step
            if task.kind == "demand":
                self._counts["demand_loads"] += 1
            else:
                self._counts["prefetch_loads"] += 1
        try:
            self.host.load(layer, expert, task.kind, lambda hentry: self._copy_to_gpu(ent, hentry))
        except BaseException as exc:
            with self._lock:
                if self._gpu[layer].get(expert) is ent:
                    del self._gpu[layer][expert]
                self._free_gpu_slot(ent)
                self._counts["errors"] += 1
                if task.kind == "prefetch":
                    self._counts["prefetch_errors"] += 1
                    log.warning("prefetch of layer %d expert %d failed: %s", layer, expert, exc)
                self._finish(task, error=exc)
            return
        with self._lock:
            ent.loading = False
            g = self._tier["gpu"]
            g["loads"] += 1
            g["bytes"] += self.raw_size
            self._finish(task)

    def _alloc_gpu(self, layer: int, expert: int, kind: str, use: float | None = None) -> GpuEntry | None:
        lru = self._gpu[layer]
        in_pool = sum(1 for en in lru.values() if en.slot >= 0)
        slot, prev_ev, demote = -1, None, None
        if in_pool < self.quota[layer]:
            slot = self._gpu_free.pop()
            prev_ev = self._gpu_slot_events.pop(slot, None)
        else:
            candidates = ((layer, e) for e, en in lru.items()   # least recently used first
                          if not (en.loading or en.slot < 0 or (layer, e) in self._pinned_keys
                                  or (kind == "prefetch" and en.step == self.step)))  # the token wants it
            key = self.policy.victim(candidates, self.step)
            victim = lru[key[1]] if key is not None else None
            if victim is not None and kind == "prefetch" and not self.policy.admit(use, key, self.step):
                self._counts["prefetch_refused"] += 1
                return None
            if victim is not None:
                del lru[victim.expert]
                if self.demoter is not None and self.demoter.wants(victim.header, key):
                    demote = (layer, victim.expert, victim.header)
                self._counts["evictions_gpu"] += 1
                if victim.prefetched:
                    self._counts["prefetch_unused_evicted"] += 1
                slot, prev_ev = victim.slot, victim.free_event
            elif kind == "prefetch":
                return None
            elif self._gpu_free and self._over_quota() < self.scratch_slots:
                slot = self._gpu_free.pop()
                prev_ev = self._gpu_slot_events.pop(slot, None)
                self._counts["scratch_loads"] += 1
            else:
                self._counts["transient_loads"] += 1
        if slot >= 0:
            buf = self.gpu_pool[slot]
        else:
            self._transient += 1
            buf = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
            if self.cuda:
                # the allocator may hand out memory that kernels on the compute stream still read:
                # the copy stream waits for the compute stream's work so far before writing it
                prev_ev = torch.cuda.Event()
                prev_ev.record(self._compute_stream)
        ent = GpuEntry(layer, expert, slot, buf, prev_free_event=prev_ev, demote=demote)
        lru[expert] = ent
        return ent

    def _over_quota(self) -> int:
        return sum(max(0, sum(1 for en in d.values() if en.slot >= 0) - self.quota[l])
                   for l, d in enumerate(self._gpu))

    def _free_gpu_slot(self, ent: GpuEntry) -> None:
        """Give back the slot of an entry whose load failed (already out of its layer's LRU)."""
        if ent.slot >= 0:
            if ent.prev_free_event is not None:
                self._gpu_slot_events[ent.slot] = ent.prev_free_event
            self._gpu_free.append(ent.slot)
            ent.slot = -2             # neither a pool slot nor a counted transient buffer
        elif ent.slot == -1:
            self._transient -= 1
            ent.slot = -2

    def _trim_layer(self, layer: int) -> None:
        """Drop transient entries and trim the layer back to its quota (unpinned, loaded experts,
        chosen by the eviction policy)."""
        lru = self._gpu[layer]
        if not self._transient and len(lru) <= self.quota[layer]:
            return                    # nothing outside the pool, nothing over the quota
        for e, en in list(lru.items()):
            if en.slot < 0 and not en.loading and (layer, e) not in self._pinned_keys:
                del lru[e]
                self._transient -= 1
        excess = sum(1 for en in lru.values() if en.slot >= 0) - self.quota[layer]
        while excess > 0:
            candidates = ((layer, e) for e, en in lru.items()
                          if not (en.loading or en.slot < 0 or (layer, e) in self._pinned_keys))
            key = self.policy.victim(candidates, self.step)
            if key is None:
                break
            en = lru.pop(key[1])
            self._counts["evictions_gpu"] += 1
            if en.prefetched:
                self._counts["prefetch_unused_evicted"] += 1
            # the slot's next writer must wait until the kernels that read it are done
            self._gpu_free.append(en.slot)
            if en.free_event is not None:
                self._gpu_slot_events[en.slot] = en.free_event
            excess -= 1

    # --- host tier ------------------------------------------------------------------------------
    # --- H2D ------------------------------------------------------------------------------------
    def _copy_to_gpu(self, ent: GpuEntry, h: HostEntry) -> None:
        """Copy the raw payload host slot -> GPU slot and build the weight views. No lock held."""
        from expert_store.quant import tensors_from_raw

        src = self.host.payload(h)
        if self.dense_layout is not None:
            self._load_dense(ent, h, src)
            return
        if self._bank is not None and _offsets(h.header) != self._raw_offsets:
            from expert_store import format as blob_format

            raise blob_format.BlobError(f"layer {ent.layer} expert {ent.expert}: tensor offsets "
                                        f"{_offsets(h.header)} differ from the first expert's")
        if ent.demote is not None:   # the evicted occupant goes to the host tier before the slot is written
            victim, ent.demote = ent.demote, None
            self.demoter.write_back(victim, ent.buf)
        end = self.copies.copy_raw(ent.buf[:h.header.raw_size], src, ent.prev_free_event)
        ent.header = h.header
        if end is not None:
            ent.copy_event = end
        self.host.copied(h, end)  # the host slot is read until `end` (an arena lease is checked after it)
        views = tensors_from_raw(h.header, ent.buf[:h.header.raw_size])
        ent.weights = expert_weights_from_views(h.header, views)

    def _load_dense(self, ent: GpuEntry, h: HostEntry, src: torch.Tensor) -> None:
        """Compact payload host slot -> staging buffer (copy stream) -> dequantized into the dense
        slot (dequant stream); the expert's event is recorded after the dequantization. No lock held."""
        from expert_store import format as blob_format

        header, layout = h.header, self.dense_layout
        if not layout.matches(header):
            raise blob_format.BlobError(f"layer {ent.layer} expert {ent.expert}: tensors "
                                        f"{[(t.name, t.shape) for t in header.tensors]} differ from the first expert's")
        dense, end, copied = self.copies.copy_dense(header, ent.buf, src, ent.prev_free_event)
        if end is not None:
            ent.copy_event = end
        self.host.copied(h, copied)  # the host slot is read until `copied`
        ent.weights = ExpertWeights(dense["w1"], dense["w3"], dense["w2"], self.precision)

    # --- introspection for tests and the prefetcher --------------------------------------------
    def resident(self, layer: int) -> list[int]:
        """Experts of `layer` on the GPU (loaded), least recently used first."""
        with self._lock:
            return [e for e, en in self._gpu[layer].items() if not en.loading]

    def host_resident(self) -> list[tuple[int, int]]:
        return self.host.resident()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until no load is queued or running (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.05))
        return True

    def fill_host(self, keys: Sequence[tuple[int, int]], threads: int = 8, progress: bool = False,
                  stop: threading.Event | None = None) -> int:
        """Bring `keys` into the pinned host tier on up to `threads` threads (HostTier.fill)."""
        return self.host.fill(keys, threads, progress, stop)

    def start_host_fill(self, threads: int = 8, keys: Sequence[tuple[int, int]] | None = None,
                        progress: bool = False) -> HostFill | None:
        """A decoder's cold start (cold_start.py): fill the host tier in the background with
        `keys`, by default the experts it holds most wanted first (the calibration profile's
        popularity; with a co-located arena every expert the arena holds). None when there is
        no host tier to fill."""
        if self.host_capacity <= 0:
            return None
        if keys is None:
            limit = self.host_capacity
            if self.host.arena is not None:
                limit = max(limit, self.host.arena.arena_info().slots)
            keys = fill_order(self.moe_layers, self.E, self.profile, limit)
        if self._host_fill is not None:
            self._host_fill.stop()
        self._host_fill = HostFill(self, keys, threads, progress)
        return self._host_fill

    def fill_host_beside_gpu(self, order: Sequence[tuple[int, int]], threads: int = 8,
                             progress: bool = False) -> list[tuple[int, int]]:
        """Fill the host tier with the experts of `order` (most wanted first) that the GPU does
        not hold, up to its capacity: once the GPU holds its share (after a warm-up), a partial
        host tier then keeps the next ones, and with the write-back of GPU evictions the two
        tiers hold up to their sum of distinct experts. Returns the keys it filled."""
        with self._lock:
            keys = [(int(l), int(e)) for l, e in order if int(e) not in self._gpu[int(l)]]
        keys = list(dict.fromkeys(keys))[:self.host_capacity]
        self.host.fill(keys, threads, progress)
        return keys

# ---------------------------------------------------------------------------------------------
def _offsets(header: Any) -> dict[str, tuple[int, int]]:
    """Byte offsets of each tensor of an expert blob's raw payload (values, scales or -1)."""
    return {t.name: (int(t.offset), int(t.quant.scales_offset) if t.quant is not None else -1)
            for t in header.tensors}


def build_provider(source: ExpertSource, gpu_cache_bytes: int | None = None, host_cache_bytes: int | None = None,
                   **options: Any) -> ExpertCache:
    """What Engine.from_store calls when cache budgets are given. The calibration profile in the
    store's manifest (profile.json) feeds the slot plan unless `profile` is passed."""
    if "profile" not in options:
        options["profile"] = source.manifest.profile
    return ExpertCache(source, gpu_cache_bytes=gpu_cache_bytes, host_cache_bytes=host_cache_bytes or 0, **options)
