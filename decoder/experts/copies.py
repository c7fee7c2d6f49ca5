"""Host -> GPU copies of expert payloads, and what one load costs.

`Copies` owns the copy stream and, for dense slots (int8/int4 dequantized once per load), the
dequant stream and the staging buffers:

- raw slots: the payload is copied host slot -> GPU slot on the copy stream, after the event the
  slot's last readers recorded; the expert's event is recorded after the copy, and compute waits
  on that event only (`current_stream().wait_event`), never on the whole stream.
- dense slots: the compact payload is copied into a staging buffer on the copy stream, then the
  dequant stream waits for that copy and for the slot's last readers and dequantizes straight
  into the slot; the expert's event is recorded after the dequantization. Two staging buffers
  (each the compact size, outside gpu_cache_bytes) let the copy of one expert overlap the
  dequantization of the one before; a buffer is written again only after the dequantization
  that read it (its event).

A second stream for demand loads would not let them overtake queued prefetch copies: the H200's
copy engine runs host->device copies in issue order across streams
(benchmarks/demand_overtake.py). On the CPU the same calls run synchronously (copies are
memcpy, events are None).

`LoadCosts` keeps the live EWMA seconds of bringing one expert into the GPU from each tier:
host -> GPU from the copies' start/end events (harvested once they completed), store -> host
from the fetches (the host tier and the low-precision tier report them). Cost-aware gating and
the prefetcher read them through `ExpertCache.load_cost`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from decoder.experts.gpu_slots import DenseLayout, Staging

# Priors (bytes/s) until a tier's cost has been measured once; replaced by the live EWMA.
PRIOR_BANDWIDTH = {"host_cuda": 20e9, "host_cpu": 5e9, "store": 1e9}


class Ewma:
    def __init__(self, alpha: float, prior: float) -> None:
        self.alpha, self.value, self.n = alpha, prior, 0

    def update(self, x: float) -> None:
        self.value = x if self.n == 0 else (1 - self.alpha) * self.value + self.alpha * x
        self.n += 1


class LoadCosts:
    """EWMA seconds per expert load from the host tier and from the store (callers hold the
    cache's lock)."""

    def __init__(self, alpha: float, raw_bytes: int, blob_bytes: int, cuda: bool) -> None:
        self.host = Ewma(alpha, raw_bytes / PRIOR_BANDWIDTH["host_cuda" if cuda else "host_cpu"])
        self.store = Ewma(alpha, blob_bytes / PRIOR_BANDWIDTH["store"])
        # store fetches at the low-precision tier's miss_precision: kept apart, so that a smaller
        # blob does not make the full-precision store fetch (the prefetcher's and gating's price) look cheaper
        self.store_low = Ewma(alpha, blob_bytes / PRIOR_BANDWIDTH["store"])

    def observe(self, tier: str, seconds: float) -> None:
        {"host": self.host, "store": self.store, "store_low": self.store_low}[tier].update(seconds)

    def cost(self, location: str) -> float:
        """Seconds to bring one expert into the GPU from `location` (gpu | host | store)."""
        if location == "gpu":
            return 0.0
        if location == "host":
            return self.host.value
        if location == "store":
            return self.store.value + self.host.value
        raise ValueError(f"unknown location {location!r} (expected gpu, host or store)")

    def measured(self) -> dict[str, int]:
        return {"host": self.host.n, "store": self.store.n}


class Copies:
    """The copy (and dequant) streams of one expert cache. `lock`/`cond` are the cache's: the
    pending timings and the staging buffers are shared by its loader threads."""

    def __init__(self, device: torch.device, lock: threading.RLock, cond: threading.Condition, costs: LoadCosts,
                 dense_layout: DenseLayout | None, raw_bytes: int, loaders: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._lock, self._cond, self.costs = lock, cond, costs
        self.dense_layout = dense_layout
        self.copy_stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.dequant_stream = torch.cuda.Stream(device=device) if self.cuda and dense_layout else None
        self._pending: list[tuple[Any, Any]] = []
        self._staging: list[Staging] = []
        if dense_layout is not None:
            # CUDA: two keep the copy engine and the dequantization busy (a buffer returns to the
            # pool as soon as its work is enqueued); CPU: used synchronously, one per loader thread
            n_stage = 2 if self.cuda else loaders + 1
            self._staging = [Staging(torch.empty(raw_bytes, dtype=torch.uint8, device=device))
                             for _ in range(n_stage)]
        self.staging_buffers = len(self._staging)

    def copy_raw(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        """dst (a GPU slot) <- src (a host slot), once the event `after` (the slot's last
        readers) completed. Returns the event that ends the copy (None on the CPU). No lock held."""
        if not self.cuda:
            t0 = time.perf_counter()
            dst.copy_(src)
            with self._lock:
                self.costs.observe("host", time.perf_counter() - t0)
            return None
        stream = self.copy_stream
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            return self._h2d(dst, src, stream)

    def copy_dense(self, header: Any, slot: torch.Tensor, src: torch.Tensor,
                   after: Any) -> tuple[dict[str, torch.Tensor], Any, Any]:
        """Compact payload src (a host slot) -> staging buffer -> dequantized into `slot`'s
        dense layout, once `after` completed. Returns (w1/w3/w2 views of the slot, the event
        that ends the dequantization, the event after which src is no longer read); the events
        are None on the CPU. No lock held."""
        stage = self._take_staging()
        try:
            raw = stage.buf[:header.raw_size]
            if not self.cuda:
                t0 = time.perf_counter()
                raw.copy_(src)
                dense = self.dense_layout.fill(header, raw, slot)
                with self._lock:
                    self.costs.observe("host", time.perf_counter() - t0)
                return dense, None, None
            copy_s, deq_s = self.copy_stream, self.dequant_stream
            with torch.cuda.device(self.device):
                with torch.cuda.stream(copy_s):
                    if stage.event is not None:   # the last dequantization that read this buffer
                        copy_s.wait_event(stage.event)
                    copied = self._h2d(raw, src, copy_s)
                with torch.cuda.stream(deq_s):
                    deq_s.wait_event(copied)
                    if after is not None:          # kernels still reading the slot
                        deq_s.wait_event(after)
                    dense = self.dense_layout.fill(header, raw, slot)
                    end = torch.cuda.Event()
                    end.record(deq_s)
            stage.event = end
            return dense, end, copied
        finally:
            with self._lock:
                self._staging.append(stage)
                self._cond.notify_all()

    @property
    def staging_free(self) -> int:
        """Staging buffers back in the pool (all of them once no load is in flight)."""
        return len(self._staging)

    def harvest(self) -> None:
        """Feed the completed copies' times into the host cost. Lock held."""
        if not self._pending:
            return
        keep = []
        for start, end in self._pending:
            if end.query():
                self.costs.observe("host", start.elapsed_time(end) / 1e3)
            else:
                keep.append((start, end))
        self._pending = keep

    def in_flight(self) -> int:
        """Copies issued and not yet harvested as done (0 on the CPU). Lock held."""
        return len(self._pending)

    def synchronize(self) -> None:
        for stream in (self.copy_stream, self.dequant_stream):
            if stream is not None:
                stream.synchronize()

    def _h2d(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> Any:
        """Enqueue host -> device `dst.copy_(src)` on `stream` (the current stream), timed by a
        start/end event pair for the host cost. Returns `end`."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        dst.copy_(src, non_blocking=True)
        end.record(stream)
        with self._lock:
            self._pending.append((start, end))
        return end

    def _take_staging(self) -> Staging:
        with self._lock:
            while not self._staging:
                self._cond.wait(timeout=0.05)
            return self._staging.pop()
