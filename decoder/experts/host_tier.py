"""The host tier: a pinned arena of fixed slots holding experts' raw payloads, an LRU of at most
`capacity` experts, filled from the store (or, with `fetch_workers`, by an expert_store
FetchPool: N processes receiving blobs straight into its slots). The only decoder code that
parses blobs: a blob is fetched into a slot, checked (seal and payload checksum), and its raw
payload is used where it landed; a compressed one is decoded into a second slot.

It belongs to one ExpertCache and shares its lock, its counters (lookups, hits, misses, loads
and bytes per tier) and its store-cost EWMA; the cache copies payloads from `pool` to GPU slots
and records in `slot_event` when a slot's last copy ends (a slot is reused only after it).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from decoder.experts.gpu_slots import allocate

if TYPE_CHECKING:  # pragma: no cover
    from decoder.experts.cache import ExpertCache

log = logging.getLogger("decoder.experts.cache")   # one logger for the cache and its tiers

@dataclass
class HostEntry:
    slot: int
    header: Any
    raw_offset: int                  # where the raw payload starts in the slot
    refs: int = 0                    # loads copying from it right now
    resident: bool = True            # counted in the host LRU (False: transient staging)


class HostTier:
    """Pinned arena + LRU of raw expert payloads for `cache` (see the module docstring)."""

    def __init__(self, cache: "ExpertCache", *, cache_bytes: int, slot_bytes: int, staging_slots: int,
                 pin_memory: bool, fetch_workers: int = 0, fetch_target: str | None = None,
                 fetch_options: Mapping[str, Any] | None = None) -> None:
        self.c = cache
        self.cache_bytes = int(cache_bytes)
        if self.cache_bytes < 0:
            raise ValueError("host_cache_bytes must be >= 0")
        self.slot_bytes = int(slot_bytes)
        n_model = cache.L * cache.E
        self.capacity = self.cache_bytes // self.slot_bytes  # resident experts
        if self.capacity > n_model:   # more than the model has: keep what it needs
            log.info("host_cache_bytes=%d holds %d experts; the model has %d: the host tier takes %d bytes",
                     self.cache_bytes, self.capacity, n_model, n_model * self.slot_bytes)
            self.capacity = n_model
        n_host = self.capacity + staging_slots
        self.fetch_pool = None
        if fetch_workers:
            # the arena IS a FetchPool's (expert_store/fetch_pool.py): N receiving processes write
            # blobs straight into its slots, checked; it is page-locked in place (cudaHostRegister)
            # instead of copied by pin_memory()
            from expert_store.fetch_pool import FetchPool

            self.fetch_pool = FetchPool(fetch_target or store_target(cache.source.client), cache.source.model,
                                        workers=fetch_workers, slots=n_host, slot_bytes=self.slot_bytes,
                                        **dict(fetch_options or {}))
            self.pool = self.fetch_pool.tensor()
            self.pinned = self.fetch_pool.pin() if pin_memory else False
        else:
            host = allocate((n_host, self.slot_bytes), torch.device("cpu"), "the host expert tier (host_cache_bytes)")
            try:
                self.pool = host.pin_memory() if pin_memory else host
            except RuntimeError as e:
                raise MemoryError(f"cannot page-lock {host.numel()} bytes for the host expert tier "
                                  f"(host_cache_bytes): {str(e).splitlines()[0]}") from None
            self.pinned = bool(pin_memory)
        self.free: list[int] = list(range(n_host - 1, -1, -1))
        self.slot_event: dict[int, Any] = {}
        self.entries: OrderedDict[tuple[int, int], HostEntry] = OrderedDict()

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.entries

    def resident(self) -> list[tuple[int, int]]:
        with self.c._lock:
            return [k for k, h in self.entries.items() if h.resident]

    def close(self) -> None:
        if self.fetch_pool is not None:  # stops its processes, unregisters and unlinks the arena
            self.fetch_pool.close()

    def take_slot(self) -> int:
        """A free host slot (evicting the host LRU when needed). Lock held."""
        while True:
            if self.free:
                slot = self.free.pop()
                ev = self.slot_event.pop(slot, None)
                if ev is not None:
                    ev.synchronize()  # an H2D copy may still read it
                return slot
            for key, h in self.entries.items():
                if h.refs == 0:
                    del self.entries[key]
                    self.c._counts["evictions_host"] += 1
                    self.free.append(h.slot)
                    break
            else:
                self.c._cond.wait(timeout=0.05)

    def acquire(self, layer: int, expert: int, kind: str) -> HostEntry:
        """The host entry holding (layer, expert)'s raw payload, fetched from the store if needed.
        Called WITHOUT the lock; returns with refs incremented."""
        from expert_store import format as blob_format

        key = (layer, expert)
        tier = self.c._tier if kind == "demand" else self.c._prefetch_tier
        with self.c._lock:
            tier["host"]["lookups"] += 1
            h = self.entries.get(key)
            if h is not None:
                tier["host"]["hits"] += 1
                h.refs += 1
                self.entries.move_to_end(key)
                return h
            tier["host"]["misses"] += 1
            tier["store"]["lookups"] += 1
            recv = self.take_slot()
        dec = -1
        try:
            t0 = time.perf_counter()
            view = memoryview(self.pool[recv].numpy())
            try:
                if self.fetch_pool is not None:  # received (and checked) by a fetch process
                    done = self.fetch_pool.submit(layer, expert, self.c.precision, priority=kind, slot=recv)
                    blob = view[:done.result().size]
                else:
                    blob = self.c.source.fetch(layer, expert, out=view, priority=kind)
            except BaseException:
                with self.c._lock:
                    tier["store"]["misses"] += 1
                raise
            n = len(blob)
            if n > self.slot_bytes:  # pragma: no cover - manifest sizes bound every blob
                raise ValueError(f"blob of layer {layer} expert {expert} is {n} bytes, host slot {self.slot_bytes}")
            if blob is not view and not (isinstance(blob, memoryview) and blob.obj is view.obj):
                view[:n] = blob  # a client that ignored `out`
            header, _ = blob_format.read_header(view[:n])
            if header.raw_size > self.c.slot_bytes or (header.layer, header.expert) != (layer, expert):
                raise blob_format.BlobError(
                    f"blob for layer {layer} expert {expert} holds layer {header.layer} expert {header.expert} "
                    f"with {header.raw_size} raw bytes (slot {self.c.slot_bytes})")
            if header.codec == "none":
                blob_format.decode_raw(view[:n])  # verify seal + checksum; raw is where it landed
                slot, raw_offset = recv, header.payload_offset
            else:
                with self.c._lock:
                    dec = self.take_slot()
                blob_format.decode_raw(view[:n], out=memoryview(self.pool[dec].numpy()))
                slot, raw_offset = dec, 0
            dt = time.perf_counter() - t0
        except BaseException:
            with self.c._lock:
                self.free.append(recv)
                if dec >= 0:
                    self.free.append(dec)
            raise
        with self.c._lock:
            if slot != recv:
                self.free.append(recv)
            tier["store"]["hits"] += 1
            self.c._tier["store"]["loads"] += 1
            self.c._tier["store"]["bytes"] += n
            self.c._tier["host"]["loads"] += 1
            self.c._tier["host"]["bytes"] += n
            self.c.costs.observe("store", dt)
            h = HostEntry(slot, header, raw_offset, refs=1, resident=self.capacity > 0)
            if h.resident:
                while sum(1 for x in self.entries.values() if x.resident) >= self.capacity:
                    victim = next((k for k, x in self.entries.items() if x.refs == 0), None)
                    if victim is None:
                        h.resident = False
                        break
                    old = self.entries.pop(victim)
                    self.c._counts["evictions_host"] += 1
                    self.free.append(old.slot)
                if h.resident:
                    self.entries[key] = h
            return h

    def release(self, key: tuple[int, int], h: HostEntry) -> None:
        h.refs -= 1
        if not h.resident and h.refs == 0:
            self.free.append(h.slot)

    def fill(self, keys: Sequence[tuple[int, int]], threads: int = 8, progress: bool = False) -> int:
        """Bring the (layer, expert) `keys` into the pinned host tier, fetched and decoded on up to
        `threads` threads (benchmarks: "every expert in pinned host memory" before timing); returns
        how many it loaded. None of `keys` is evicted by another: a wave runs at most half the free
        host slots' loads (a coded blob holds two slots until it is decoded), so no slot is taken
        from the LRU; only entries outside `keys` make room. Counted as prefetch lookups."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        want = list(dict.fromkeys((int(l), int(e)) for l, e in keys))
        for l, e in want:
            self.c._check(l, e)
        if len(want) > self.capacity:
            raise ValueError(f"fill_host: {len(want)} experts do not fit the host tier of {self.capacity} "
                             f"(host_cache_bytes={self.cache_bytes}, {self.slot_bytes} bytes per expert)")
        threads = max(1, int(threads))
        with self.c._lock:
            for k in want:            # most recent now: the LRU evicts entries outside `keys` first
                if k in self.entries:
                    self.entries.move_to_end(k)
            todo = [k for k in want if k not in self.entries]

        def load(key: tuple[int, int]) -> None:
            h = self.acquire(key[0], key[1], "prefetch")
            with self.c._lock:
                self.release(key, h)

        bar = tqdm(total=len(todo), desc="fill host tier", unit="expert", leave=False, disable=not progress)
        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="host-fill") as pool:
                i = 0
                while i < len(todo):
                    with self.c._lock:  # receive + decode slot per load, all from the free list
                        n = max(1, min(threads, len(self.free) // 2))
                    wave = todo[i:i + n]
                    for f in [pool.submit(load, k) for k in wave]:
                        f.result()
                        bar.update(1)
                    i += len(wave)
        finally:
            bar.close()
        return len(todo)


def store_target(client: Any) -> str:
    """The target a StoreClient was opened with (what FetchPool workers open again): a
    GrpcStoreClient's `target`, a LocalStoreClient's store directory."""
    target = getattr(client, "target", None)
    if target:
        return str(target)
    store = getattr(client, "store", None)
    if store is not None and getattr(store, "root", None) is not None:
        return str(store.root)
    raise ValueError("fetch_workers needs fetch_target: cannot tell where this client reads from")
