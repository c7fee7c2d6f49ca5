"""The host tier: a pinned arena of fixed slots holding experts' raw payloads, an LRU of at most
`capacity` experts, filled from the store (or, with `fetch_workers`, by an expert_store
FetchPool: N processes receiving blobs straight into its slots). The only decoder code that
parses blobs: a blob is fetched into a slot, checked (seal and payload checksum), and its raw
payload is used where it landed; a compressed one is decoded into a second slot.

When it is full it evicts, among its least recently used entries, first one whose expert the
GPU holds (a redundant copy while it stays there), so that a partial host tier keeps what the
GPU does not; the cache writes GPU evictions back into it (demote.py).

It belongs to one ExpertCache and shares its lock, its counters (lookups, hits, misses, loads
and bytes per tier) and its store-cost EWMA; the cache copies payloads from `payload(entry)` to
GPU slots inside `load()`, which learns through `copied(entry, event)` when the copy ends (a
host slot is reused only after it).

Co-located store (`local-shm://` targets, expert_store/arena_client.py): the store's
shared-memory arena is mapped once and page-locked in place (cudaHostRegister; nothing on the
CPU), and it is part of this tier. An expert the pool does not hold is leased from the arena
(published there first when missing: the store's fetch, counted as a store load):
- a raw payload (codec none: int8/int4) is copied straight from the mapping into its GPU slot:
  no copy into the pool, no bytes object; the lease is checked after the copy finished, and a
  blob the store replaced meanwhile is copied again (the arena's seqlock, checked after a DMA);
- a coded payload (bf16 byte planes) is decoded from the mapping straight into a pool slot.
Integrity: a blob the store published for this decoder was checked as it entered the arena;
one found there already (published for an earlier or another decoder) is checked here once per
publication (epoch, slot, generation), so a scribbled arena is caught before use. `fill` asks the
store to publish the keys (a cold fill at prefetch priority: demand misses pass it) and keeps
the rate in `fill_stats`; coded blobs are then decoded into the pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from decoder.experts.gpu_slots import allocate

if TYPE_CHECKING:  # pragma: no cover
    from decoder.experts.cache import ExpertCache

log = logging.getLogger("decoder.experts.cache")   # one logger for the cache and its tiers

@dataclass
class HostEntry:
    slot: int                        # pool slot; -1: read in place from the co-located arena
    header: Any
    raw_offset: int                  # where the raw payload starts in the slot
    refs: int = 0                    # loads copying from it right now
    resident: bool = True            # counted in the host LRU (False: transient staging)
    lease: Any = None                # the arena lease it was read under (valid after the copy?)
    src: Any = None                  # slot -1: the raw payload as a tensor over the arena mapping
    prefetched: bool = False         # brought in by a store prefetch into the host tier, not used yet
    demoted: bool = False            # written back from a GPU slot (demote.py), not used since


class ArenaReplaced(Exception):
    """The arena slot an entry was read from was replaced before the copy finished."""


ARENA_ATTEMPTS = 8   # copies of one expert retried after its arena slot was replaced
PIN_S = 60.0         # a co-located arena blob this decoder copies from is pinned this long (ArenaPins)
PIN_MARGIN_S = 5.0   # a copy from a blob pinned for less than this more is checked after it ends
VICTIM_SCAN = 64     # host LRU entries looked at for one that the GPU also holds
SWAP = (-1, -1)      # _victim: the entry the GPU is loading gives its place once copied


class ArenaPins:
    """Pins on the co-located arena's blobs this decoder copies from (Ensure with pin_s), asked
    for in the background, and only while the arena has a slot for every expert of the model at
    this precision (a pin then keeps nothing out that another blob of it needs).

    Why: the arena's seqlock is checked after a copy out of a slot ended, so a loader waits for
    each copy before the expert counts as loaded, and the decode thread for the loader. The
    writer never evicts or replaces a pinned slot, so a copy issued while the slot is pinned for
    PIN_MARGIN_S more (and its seq and the arena's epoch are unchanged) is whole without that
    wait: HostTier.copied counts it as loaded at once and the compute stream orders itself after
    the copy's event. A copy from a blob without such a pin is waited for and checked
    (HostTier.copied), and its blob is pinned for the next time."""

    def __init__(self, arena: Any, model: str, precision: str, n_experts: int) -> None:
        self.arena, self.model, self.precision, self.n_experts = arena, model, precision, n_experts
        self.counts = {"pinned_copies": 0, "checked_copies": 0, "pin_requests": 0, "pin_errors": 0,
                       "batches": 0}
        self._want: set[tuple[int, int]] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._fits: tuple[float, bool] | None = None     # (when asked, the arena holds the whole model)
        self._thread = threading.Thread(target=self._loop, name="arena-pins", daemon=True)
        self._thread.start()

    def count(self, what: str) -> None:
        with self._cond:
            self.counts[what] += 1

    def want(self, key: tuple[int, int]) -> None:
        with self._cond:
            self._want.add(key)
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {**self.counts, "pinning": bool(self._fits and self._fits[1])}

    def _whole_model_fits(self) -> bool:
        now = time.monotonic()
        if self._fits is None or now - self._fits[0] > 30.0:
            fits = (now, self.arena.arena_info().slots >= self.n_experts)
            with self._cond:
                self._fits = fits
        return self._fits[1]

    def _loop(self) -> None:
        from expert_store.arena_client import MAX_REFS_PER_ENSURE

        while True:
            with self._cond:
                while not self._want and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                keys = sorted(self._want)[:MAX_REFS_PER_ENSURE]
                self._want.difference_update(keys)
            try:
                if not self._whole_model_fits():
                    continue
                refs = [(l, e, self.precision) for l, e in keys
                        if self.arena.holds(self.model, l, e, self.precision)]
                if refs:
                    self.arena.publish(self.model, refs, pin_s=PIN_S, priority="prefetch")
                    with self._cond:
                        self.counts["pin_requests"] += len(refs)
            except Exception as e:  # noqa: BLE001 - without a pin a copy is checked after it ends
                with self._cond:
                    self.counts["pin_errors"] += 1
                log.debug("pinning %d arena blobs failed: %s", len(keys), e)
            finally:
                with self._cond:
                    self.counts["batches"] += 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)


class HostTier:
    """Pinned arena + LRU of raw expert payloads for `cache` (see the module docstring)."""

    def __init__(self, cache: "ExpertCache", *, cache_bytes: int, slot_bytes: int, staging_slots: int,
                 pin_memory: bool, fetch_workers: int = 0, fetch_target: str | None = None,
                 fetch_options: Mapping[str, Any] | None = None, arena_pins: bool = True,
                 demand_parts: int = 1, fill_parts: int = 1) -> None:
        self.c = cache
        for name, k in (("fetch_demand_parts", demand_parts), ("fetch_fill_parts", fill_parts)):
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
            if k > 1 and not fetch_workers:
                raise ValueError(f"{name} stripes store fetches over fetch_workers' processes: give fetch_workers")
        self.demand_parts = demand_parts   # a demand fetch in up to this many byte ranges (FetchPool)
        self.fill_parts = fill_parts       # each fetch of a fill (fill_host) in up to this many
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
        self.pool_futures: dict[tuple[int, int], Any] = {}   # key -> a prefetch's FetchPool Future while fetched
        self.arena = _arena_client(cache.source.client)
        self._verified: dict[int, tuple[int, int]] = {}   # arena slot -> (epoch, generation) checked here
        # CUDA copies out of the arena: pinned blobs need no wait after each copy (ArenaPins)
        self.pins = (ArenaPins(self.arena, cache.source.model, cache.precision, len(cache.moe_layers) * cache.E)
                     if self.arena is not None and cache.cuda and arena_pins else None)
        self.fill_stats: dict[str, float] = {}
        self.fill_progress: dict[str, int] = {"done": 0, "total": 0}
        if self.arena is not None and fetch_workers:
            raise ValueError("fetch_workers receives from a remote store; a local-shm:// store is read in place "
                             "from its arena (leave fetch_workers at 0)")
        if self.arena is not None and pin_memory:
            from expert_store.errors import Unavailable

            try:   # the mapping, page-locked once (and again after a remap): DMA straight from it
                self.arena.pin()
            except Unavailable as e:   # the store is not up yet: page-locked when it is mapped
                log.info("the co-located arena is not mapped yet (%s): it is page-locked when it is", e)
            except RuntimeError as e:   # CUDA refused (e.g. a filesystem it cannot lock): pageable copies
                log.warning("could not page-lock the co-located arena: %s; copies from it run at the pageable "
                            "rate", e)
        if fetch_workers:
            # the arena IS a FetchPool's (expert_store/fetch_pool.py): N receiving processes write
            # blobs straight into its slots, checked; it is page-locked in place (cudaHostRegister)
            # instead of copied by pin_memory()
            from expert_store.fetch_pool import FetchPool

            self.fetch_pool = FetchPool(fetch_target or store_target(cache.source.client), cache.source.model,
                                        workers=fetch_workers, slots=n_host, slot_bytes=self.slot_bytes,
                                        **{"raw": True, **dict(fetch_options or {})})
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
        self.fetching: set[tuple[int, int]] = set()   # store fetches into the pool in flight
        self.writing: set[tuple[int, int]] = set()    # GPU evictions being written back (demote.py)

    def __contains__(self, key: tuple[int, int]) -> bool:
        """Whether (layer, expert) is in host memory: the pool, or the co-located arena."""
        if key in self.entries:
            return True
        return self.arena is not None and self.arena.holds(self.c.source.model, key[0], key[1], self.c.precision)

    def resident(self) -> list[tuple[int, int]]:
        with self.c._lock:
            return [k for k, h in self.entries.items() if h.resident]

    def close(self) -> None:
        if self.pins is not None:
            self.pins.close()
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
            key = self._victim()
            if key is not None:
                h = self.entries.pop(key)
                self._evicted(h)
                self.free.append(h.slot)
            else:
                self.c._cond.wait(timeout=0.05)

    def _victim(self, swap: bool = False) -> tuple[int, int] | None:
        """The entry to evict: among the VICTIM_SCAN least recently used ones not being copied
        from, the oldest whose expert the GPU holds (a redundant copy while it stays there: the
        host tier then keeps what the GPU does not), else the oldest. With `swap` (a GPU
        eviction written back), SWAP when the only entries the GPU holds are being copied to it
        right now: the one written back takes the place of that copy once it ends (`release`).
        Lock held."""
        fallback, busy = None, False
        for i, (key, h) in enumerate(self.entries.items()):
            if i >= VICTIM_SCAN and fallback is not None:
                break
            held = self._gpu_keeps(key)
            if h.refs:
                busy = busy or held
                continue
            if held:
                return key
            if fallback is None:
                fallback = key
        return SWAP if swap and busy else fallback

    def _gpu_keeps(self, key: tuple[int, int]) -> bool:
        """Whether the GPU holds `key` in a pool slot: a copy the host tier may give up. A
        transient buffer (a demand load past the layer's quota, e.g. a prefill using every
        expert) is dropped when its layer ends without a write-back, so it does not count.
        Lock held."""
        ent = self.c._gpu[key[0]].get(key[1])
        return ent is not None and ent.slot >= 0

    def acquire(self, layer: int, expert: int, kind: str, parts: int | None = None) -> HostEntry:
        """The host entry holding (layer, expert)'s raw payload, fetched from the store if needed.
        Called WITHOUT the lock; returns with refs incremented. kind: "demand", "prefetch" or
        "background" (a store prefetch into the host tier: ExpertCache.prefetch_host); parts:
        the byte ranges a FetchPool receives it in (default: demand_parts for a demand, else 1). A fetch
        of the same expert already in flight is waited for, not repeated, and so is a write-back
        of a GPU eviction (demote.py) still copying it here."""
        key = (layer, expert)
        background = kind == "background"   # a store prefetch into the host tier (prefetch_host)
        tier = self.c._tier if kind == "demand" else self.c._prefetch_tier
        counts = self.c._counts
        with self.c._lock:
            tier["host"]["lookups"] += 1
            waited = promoted = False
            while True:
                h = self.entries.get(key)
                if h is not None:
                    tier["host"]["hits"] += 1
                    h.refs += 1
                    self.entries.move_to_end(key)
                    if h.prefetched and not background:
                        h.prefetched = False       # a store prefetch into the host tier was used
                        counts["host_prefetch_useful"] += 1
                    if h.demoted and not background:
                        h.demoted = False          # a GPU eviction written back saved a store fetch
                        counts["demoted_used"] += 1
                    return h
                if key in self.writing:   # a GPU eviction on its way back: soon here, not from the store
                    self.c._cond.wait(timeout=0.05)
                    continue
                if self.arena is not None or key not in self.fetching:
                    break
                # its store fetch is in flight (a host-tier prefetch): wait for it, not a second fetch
                if not waited:
                    waited = True
                    counts["host_prefetch_waited"] += 1
                if kind == "demand" and not promoted and key in self.pool_futures:
                    # queued in the FetchPool behind other prefetches (a striped fill's parts): ahead now
                    promoted = True
                    if self.fetch_pool.promote(self.pool_futures[key]):
                        counts["host_fetch_promoted"] += 1
                self.c._cond.wait(timeout=0.05)
            if self.arena is None:
                tier["host"]["misses"] += 1
                tier["store"]["lookups"] += 1
                self.fetching.add(key)
                try:
                    recv = self.take_slot()
                except BaseException:
                    self._fetched(key)
                    raise
        if self.arena is not None:
            return self._from_arena(layer, expert, "prefetch" if background else kind, tier)
        try:
            return self._fetch(key, recv, kind, tier, parts)
        finally:
            with self.c._lock:
                self._fetched(key)

    def _fetched(self, key: tuple[int, int]) -> None:
        """The store fetch of `key` into the pool ended (admitted or failed). Lock held."""
        self.fetching.discard(key)
        self.c._cond.notify_all()

    def _fetch(self, key: tuple[int, int], recv: int, kind: str, tier: dict, parts: int | None = None) -> HostEntry:
        """Fetch `key` from the store into pool slot `recv`, check it and admit it (see acquire).
        kind "background": the lowest priority (FetchPool: below its prefetches, bounded in
        flight; the store's own wire priority: prefetch). Called WITHOUT the lock."""
        from expert_store import format as blob_format

        layer, expert = key
        background = kind == "background"
        dec = -1
        try:
            t0 = time.perf_counter()
            view = memoryview(self.pool[recv].numpy())
            try:
                if self.fetch_pool is not None:  # received (and checked) by a fetch process
                    done = self.fetch_pool.submit(layer, expert, self.c.precision, priority=kind, slot=recv,
                                                  parts=parts or (self.demand_parts if kind == "demand" else 1))
                    promotable = kind != "demand"   # a demand load of the same expert may promote it (acquire)
                    if promotable:
                        with self.c._lock:
                            self.pool_futures[key] = done
                    try:
                        blob = view[:done.result().size]
                    finally:
                        if promotable:
                            with self.c._lock:
                                self.pool_futures.pop(key, None)
                else:
                    blob = self.c.source.fetch(layer, expert, out=view,
                                               priority="prefetch" if background else kind)
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
                if self.fetch_pool is None:   # (a fetch process checked it in the arena already)
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
            if background:
                counts = self.c._counts
                counts["host_prefetch_loads"] += 1
                counts["host_prefetch_bytes"] += n
            return self._admit(key, HostEntry(slot, header, raw_offset, refs=1, resident=self.capacity > 0,
                                              prefetched=background))

    def _from_arena(self, layer: int, expert: int, kind: str, tier: dict) -> HostEntry:
        """(layer, expert) leased from the co-located arena (published there first when
        missing): read in place when raw, decoded into a pool slot when coded. Called WITHOUT
        the lock; returns with refs incremented (see the module docstring)."""
        from expert_store import format as blob_format

        c, arena = self.c, self.arena
        for _ in range(ARENA_ATTEMPTS):
            t0 = time.perf_counter()
            lease, published = arena.lease(c.source.model, layer, expert, c.precision, priority=kind)
            view = arena.view(lease)
            if view is None:
                continue   # mapped again meanwhile
            dec = -1
            try:
                header, _ = blob_format.read_header(view)
                if header.raw_size > c.slot_bytes or (header.layer, header.expert) != (layer, expert):
                    raise blob_format.BlobError(
                        f"blob for layer {layer} expert {expert} holds layer {header.layer} expert "
                        f"{header.expert} with {header.raw_size} raw bytes (slot {c.slot_bytes})")
                name = (lease.epoch, lease.generation)
                if header.codec == "none":
                    if not published and self._verified.get(lease.slot) != name:
                        blob_format.decode_raw(view)   # seal + payload checksum, once per publication
                    start = header.payload_offset
                    src = arena.payload(lease, start, start + header.raw_size)
                    if src is None:
                        continue
                else:
                    with c._lock:
                        dec = self.take_slot()
                    blob_format.decode_raw(view, out=memoryview(self.pool[dec].numpy()))
                    src = None
            except blob_format.BlobError:
                with c._lock:
                    if dec >= 0:
                        self.free.append(dec)
                if not arena.valid(lease):   # replaced while it was checked: read it again
                    continue
                raise
            finally:
                view.release()
            if not arena.valid(lease):        # replaced while it was decoded
                if dec >= 0:
                    with c._lock:
                        self.free.append(dec)
                continue
            dt = time.perf_counter() - t0
            self._verified[lease.slot] = name
            with c._lock:
                if published:   # the store fetched it: a host miss, a store load
                    tier["host"]["misses"] += 1
                    tier["store"]["lookups"] += 1
                    tier["store"]["hits"] += 1
                    c._tier["store"]["loads"] += 1
                    c._tier["store"]["bytes"] += lease.size
                    c.costs.observe("store", dt)
                else:           # in host memory already (the arena)
                    tier["host"]["hits"] += 1
                if src is not None:
                    return HostEntry(-1, header, 0, refs=1, resident=False, lease=lease, src=src)
                c._tier["host"]["loads"] += 1
                c._tier["host"]["bytes"] += lease.size
                return self._admit((layer, expert), HostEntry(dec, header, 0, refs=1, resident=self.capacity > 0))
        raise ArenaReplaced(f"layer {layer} expert {expert} was replaced in the co-located arena "
                            f"{ARENA_ATTEMPTS} times while being read: the arena is too small for the working set")

    def _admit(self, key: tuple[int, int], h: HostEntry, swap: bool = False) -> HostEntry:
        """Count a new entry in the host LRU (evicting unreferenced ones), or keep it transient
        when every resident entry is in use, or when another copy of `key` is in the LRU already
        (a GPU eviction written back while the same expert was fetched): that one stays, and
        this one's slot is freed when its last copy ends. Lock held."""
        if h.resident and self.entries.get(key, h) is not h:
            h.resident = False
        if h.resident:
            while len(self.entries) >= self.capacity:
                victim = self._victim(swap)
                if victim is SWAP:     # past the capacity until the copy to the GPU ends
                    break
                if victim is None:
                    h.resident = False
                    break
                old = self.entries.pop(victim)
                self._evicted(old)
                self.free.append(old.slot)
            if h.resident:
                self.entries[key] = h
        return h

    def _evicted(self, h: HostEntry) -> None:
        """Count an entry leaving the host LRU. Lock held."""
        self.c._counts["evictions_host"] += 1
        if h.prefetched:
            self.c._counts["host_prefetch_unused_evicted"] += 1

    def payload(self, h: HostEntry) -> torch.Tensor:
        """The raw payload an entry holds, as a host tensor to copy to the GPU."""
        if h.src is not None:
            return h.src
        return self.pool[h.slot, h.raw_offset:h.raw_offset + h.header.raw_size]

    def copied(self, h: HostEntry, event: Any) -> None:
        """The copy out of `h` was issued; `event` (None: it already ended) marks its end. A pool
        slot is reused only after it; an arena entry is checked once the copy ended
        (ArenaReplaced: the store replaced the blob meanwhile and the copy must be redone)."""
        if h.lease is None:
            if event is not None:
                with self.c._lock:
                    self.slot_event[h.slot] = event
            return
        if event is not None and self.pins is not None:
            if self.arena.pinned_past(h.lease, PIN_MARGIN_S):   # whole without waiting (ArenaPins)
                self.pins.count("pinned_copies")
                return
            self.pins.want((h.header.layer, h.header.expert))
        if event is not None:
            event.synchronize()
        if not self.arena.valid(h.lease):
            raise ArenaReplaced(f"layer {h.header.layer} expert {h.header.expert}: its arena slot was replaced "
                                f"during the copy")
        if self.pins is not None:
            self.pins.count("checked_copies")

    def load(self, layer: int, expert: int, kind: str, copy: Callable[[HostEntry], None]) -> None:
        """acquire -> copy(entry) (which issues the copy to the GPU and calls copied()) ->
        release; a copy from an arena slot the store replaced meanwhile is redone from the
        blob's new place. Called WITHOUT the lock."""
        for attempt in range(ARENA_ATTEMPTS):
            h = self.acquire(layer, expert, kind)
            try:
                copy(h)
                return
            except ArenaReplaced:
                if attempt == ARENA_ATTEMPTS - 1:
                    raise
            finally:
                with self.c._lock:
                    self.release((layer, expert), h)

    def release(self, key: tuple[int, int], h: HostEntry) -> None:
        """A copy out of `h` ended. A transient entry's slot is freed; an entry the GPU now holds
        leaves a tier that a write-back filled past its capacity (the swap of `_victim`). Lock held."""
        h.refs -= 1
        if h.refs:
            return
        if not h.resident:
            if h.slot >= 0:
                self.free.append(h.slot)
        elif len(self.entries) > self.capacity and self.entries.get(key) is h and self._gpu_keeps(key):
            del self.entries[key]
            self._evicted(h)
            self.free.append(h.slot)

    def fill(self, keys: Sequence[tuple[int, int]], threads: int = 8, progress: bool = False,
             stop: threading.Event | None = None) -> int:
        """Bring the (layer, expert) `keys` into the host tier, fetched and decoded on up to
        `threads` threads, each starting the next load as soon as its last one ended (benchmarks:
        "every expert in pinned host memory" before timing; a decoder's cold start: in the
        background at prefetch priority, demand loads pass it); returns how many it loaded. None
        of `keys` is evicted by another: a load starts only while the free host slots cover two
        per load in flight (a coded blob holds two slots until it is decoded), so no slot is taken
        from the LRU; only entries outside `keys` make room. Counted as prefetch lookups. With a
        co-located store the store first publishes them into its arena (`publish`). `stop` set:
        no further load starts. The fill's bytes, seconds and GB/s are in `fill_stats` (the
        arena's publish: `arena_*`); `fill_progress` counts the loads done as they end."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        from tqdm import tqdm

        want = list(dict.fromkeys((int(l), int(e)) for l, e in keys))
        for l, e in want:
            self.c._check(l, e)
        t0 = time.perf_counter()
        self.fill_stats = {}
        in_place = False   # raw payloads read in place from the arena: nothing is held in the pool
        if self.arena is not None and want:
            self.publish(want, threads, progress)
            in_place = self.reads_in_place(want[0])
        if len(want) > self.capacity and not in_place:
            raise ValueError(f"fill_host: {len(want)} experts do not fit the host tier of {self.capacity} "
                             f"(host_cache_bytes={self.cache_bytes}, {self.slot_bytes} bytes per expert)")
        threads = max(1, int(threads))
        if self.fetch_pool is not None:   # each receiving process takes one request at a time: keep all busy
            threads = max(threads, self.fetch_pool.workers_wanted)
        with self.c._lock:
            for k in want:            # most recent now: the LRU evicts entries outside `keys` first
                if k in self.entries:
                    self.entries.move_to_end(k)
            todo = [k for k in want if k not in self.entries]
        sizes = {k: self.c.source.blob_size(*k) or 0 for k in todo}

        def load(key: tuple[int, int]) -> None:
            h = self.acquire(key[0], key[1], "prefetch", parts=self.fill_parts)
            with self.c._lock:
                self.release(key, h)

        self.fill_progress = {"done": 0, "total": len(todo)}
        bar = tqdm(total=len(todo), desc="fill host tier", unit="expert", leave=False, disable=not progress)
        done, nbytes = 0, 0
        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="host-fill") as pool:
                i, running = 0, {}    # future -> its key, in flight
                while i < len(todo) or running:
                    while i < len(todo) and len(running) < threads and not (stop is not None and stop.is_set()):
                        with self.c._lock:   # a receive and a decode slot per load, from the free list
                            room = len(self.free) - len(running) >= 2 or not running
                        if not room:
                            break
                        running[pool.submit(load, todo[i])] = todo[i]
                        i += 1
                    if not running:
                        break   # stopped
                    for f in wait(running, return_when=FIRST_COMPLETED).done:
                        key = running.pop(f)
                        f.result()
                        done += 1
                        nbytes += sizes[key]
                        self.fill_progress["done"] = done
                        bar.update(1)
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        self.fill_stats.update(experts=done, bytes=nbytes, seconds=seconds,
                               gbps=nbytes / seconds / 1e9 if seconds > 0 else 0.0)
        return done

    def reads_in_place(self, key: tuple[int, int]) -> bool:
        """Whether the co-located arena holds (layer, expert) as a raw payload, which the GPU copy
        reads where it lies (no host pool slot), rather than coded (decoded into the pool).
        Published first when missing; False without a co-located store."""
        if self.arena is None:
            return False
        from expert_store import format as blob_format

        for _ in range(ARENA_ATTEMPTS):
            lease, _ = self.arena.lease(self.c.source.model, *key, self.c.precision, priority="prefetch")
            view = self.arena.view(lease)
            if view is None:
                continue
            try:
                codec = blob_format.read_header(view)[0].codec
            except blob_format.BlobError:
                codec = None
            finally:
                view.release()
            if self.arena.valid(lease) and codec is not None:
                return codec == "none"
        raise ArenaReplaced(f"layer {key[0]} expert {key[1]} kept being replaced in the co-located arena")

    def publish(self, keys: Sequence[tuple[int, int]], threads: int = 8, progress: bool = False) -> dict[str, float]:
        """Have the co-located store publish `keys` into its arena at prefetch priority (a cold
        fill: demand misses pass it), batches in flight on up to `threads` threads. Returns the
        rate into the arena (arena_bytes, arena_seconds, arena_gbps), also kept in fill_stats."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        if self.arena is None:
            raise ValueError("publish needs a co-located store (a local-shm:// target)")
        keys = list(dict.fromkeys((int(l), int(e)) for l, e in keys))
        info = self.arena.arena_info()
        if len(keys) > info.slots:
            raise ValueError(f"{len(keys)} experts do not fit the co-located arena of {info.slots} slots "
                             f"(its --arena-bytes)")
        model, precision = self.c.source.model, self.c.precision
        batch = max(1, min(16, -(-len(keys) // max(1, threads))))
        batches = [keys[i:i + batch] for i in range(0, len(keys), batch)]
        t0 = time.perf_counter()
        bar = tqdm(total=len(keys), desc="fill co-located arena", unit="expert", leave=False, disable=not progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(threads, len(batches))),
                                    thread_name_prefix="arena-fill") as pool:
                futures = [pool.submit(self.arena.publish, model, [(l, e, precision) for l, e in b])
                           for b in batches]
                for f, b in zip(futures, batches):
                    f.result()
                    bar.update(len(b))
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        nbytes = self.arena.arena_info().bytes_published - info.bytes_published   # what entered the arena
        out = dict(arena_bytes=nbytes, arena_seconds=seconds, arena_gbps=nbytes / seconds / 1e9 if seconds > 0 else 0.0)
        self.fill_stats.update(out)
        return out


def _arena_client(client: Any) -> Any:
    """The client when it reads a co-located store's arena (local-shm://), else None."""
    from expert_store.arena_client import ArenaStoreClient

    return client if isinstance(client, ArenaStoreClient) else None


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
