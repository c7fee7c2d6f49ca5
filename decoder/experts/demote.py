"""GPU evictions written back to the host tier: the GPU and host tiers as one exclusive cache.

When the host tier holds part of the model and a store lies behind it, an expert the GPU evicts
that the host tier does not hold would next come from the store, over gRPC at ~1 GB/s instead
of the link's ~50. `Demoter` keeps it in host memory instead:

- on CUDA the evicted slot's raw payload is first copied on the device into a staging
  buffer, on the copy stream, just before the H2D copy that overwrites the slot (so the miss
  that evicted it waits for a device-to-device copy at HBM speed, not a
  device->host one); a thread then copies the buffer into a host slot on its own stream and
  admits the entry to the host LRU once that copy ended, so nothing half-copied is ever seen;
  up to four buffers in at most 512 MiB of device memory outside gpu_cache_bytes (one for a
  bf16 Mixtral expert, four for an int4 one); when all are busy the loader waits for one
  (counted): a write-back lost would cost a store fetch later;
- on the CPU the slot is copied into the host slot on the loader thread.

The host tier makes room by evicting first the entries whose expert the GPU holds
(`HostTier._victim`). Raw slots only (a dense slot's dequantized weights are not the payload),
and only payloads at the cache's precision. Counters: `demotions` (written back),
`demotions_waited` (a loader waited for a staging buffer), `demoted_used` (a later GPU load
found it there).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from decoder.experts.host_tier import HostEntry

if TYPE_CHECKING:  # pragma: no cover
    from decoder.experts.cache import ExpertCache

log = logging.getLogger("decoder.experts.cache")   # one logger for the cache and its tiers

STAGING_BUFFERS = 4                  # at most, and at most STAGING_BYTES of device memory in all
STAGING_BYTES = 512 << 20            # (outside gpu_cache_bytes): one for a bf16 Mixtral expert


class Demoter:
    """Writes GPU-evicted experts back into `cache`'s host tier (see the module docstring)."""

    def __init__(self, cache: "ExpertCache") -> None:
        self.c = cache
        self.raw_size = cache.raw_size
        self._staging: list[torch.Tensor] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if cache.cuda:
            n = max(1, min(STAGING_BUFFERS, STAGING_BYTES // max(1, self.raw_size)))
            self._staging = [torch.empty(self.raw_size, dtype=torch.uint8, device=cache.device)
                             for _ in range(n)]
            self._stream = torch.cuda.Stream(device=cache.device)
            self._thread = threading.Thread(target=self._loop, name="demoter", daemon=True)
            self._thread.start()
        self._n_staging = len(self._staging)

    def wants(self, header: Any, key: tuple[int, int]) -> bool:
        """Whether an evicted occupant with this payload header is worth writing back: a raw
        payload at the cache's precision that the host tier does not hold. Lock held."""
        return (header is not None and header.precision == self.c.precision
                and int(header.raw_size) == self.raw_size and key not in self.c.host.entries)

    def write_back(self, victim: tuple[int, int, Any], slot_buf: torch.Tensor) -> None:
        """Keep the payload in `slot_buf` (the evicted occupant `victim` = (layer, expert,
        header)) before the slot is overwritten. Called by the loader that took the slot, before
        its H2D copy, WITHOUT the lock."""
        layer, expert, header = victim
        key = (layer, expert)
        src = slot_buf[:self.raw_size]
        host = self.c.host
        if not self.c.cuda:
            with self.c._lock:
                if not self.wants(header, key):
                    return
                hslot = host.take_slot()
                host.writing.add(key)
            try:
                host.pool[hslot, :self.raw_size].copy_(src)
            except BaseException:
                with self.c._lock:
                    host.free.append(hslot)
                    self._written(key)
                raise
            self._admit(key, header, hslot)
            return
        with self.c._lock:
            if not self.wants(header, key):
                return
            if not self._staging:   # every buffer's D2H in flight: wait for one (one D2H copy) rather than lose it
                self.c._counts["demotions_waited"] += 1
                while not self._staging:
                    self.c._cond.wait(timeout=0.05)
                if not self.wants(header, key):
                    return
            buf = self._staging.pop()
            host.writing.add(key)
        stream = self.c.copies.copy_stream   # the slot's next H2D copy is queued after this one
        with torch.cuda.device(self.c.device), torch.cuda.stream(stream):
            buf.copy_(src, non_blocking=True)
            staged = torch.cuda.Event()
            staged.record(stream)
        self._queue.put((key, header, buf, staged))

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every write-back issued so far was admitted or dropped (tests, close)."""
        deadline = time.monotonic() + timeout
        with self.c._lock:
            while len(self._staging) < self._n_staging:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.c._cond.wait(timeout=min(left, 0.05))
        return True

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, header, buf, staged = item
            hslot = -1
            try:
                with self.c._lock:
                    if self.wants(header, key):
                        hslot = self.c.host.take_slot()
                if hslot >= 0:
                    with torch.cuda.device(self.c.device), torch.cuda.stream(self._stream):
                        self._stream.wait_event(staged)
                        self.c.host.pool[hslot, :self.raw_size].copy_(buf, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(self._stream)
                    done.synchronize()
                    self._admit(key, header, hslot)
                else:
                    staged.synchronize()   # the buffer is read until then
            except BaseException as e:  # noqa: BLE001 - a lost write-back only costs a later fetch
                log.warning("write-back of layer %d expert %d to the host tier failed: %s", key[0], key[1], e)
                if hslot >= 0:
                    with self.c._lock:
                        self.c.host.free.append(hslot)
            finally:
                with self.c._lock:
                    self._staging.append(buf)
                    self._written(key)

    def _written(self, key: tuple[int, int]) -> None:
        """The write-back of `key` ended (admitted, dropped or failed): a load waiting for it
        goes on (HostTier.acquire). Lock held."""
        self.c.host.writing.discard(key)
        self.c._cond.notify_all()

    def _admit(self, key: tuple[int, int], header: Any, hslot: int) -> None:
        """The copy into `hslot` ended: the entry becomes visible (unless a store fetch admitted
        the expert meanwhile: HostTier._admit keeps that one, and the slot is freed here)."""
        with self.c._lock:
            host = self.c.host
            if not self.c.cuda:
                self._written(key)
            h = host._admit(key, HostEntry(hslot, header, 0, refs=0, resident=host.capacity > 0, demoted=True),
                            swap=True)
            if not h.resident:
                host.free.append(hslot)
                return
            self.c._counts["demotions"] += 1
            self.c._cond.notify_all()
