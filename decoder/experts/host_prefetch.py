"""Store fetches into the host tier for its predicted misses (ExpertCache.prefetch_host).

When the host tier holds part of the model and a store lies behind it, an expert the
prefetcher predicts that is neither on the GPU nor in the host tier would come from the store
when it is needed, at gRPC speed. `HostPrefetcher` fetches it into the host tier ahead of time
(not into the GPU: that is the GPU prefetch's decision), with the lowest priority of all loads:
`threads` threads (the bound on such fetches in flight) take the best-scored request first;
through a FetchPool they go as "background" requests, behind its demand and prefetch ones. The
queue keeps the best QUEUE_PER_THREAD x threads x E requests; a request is stale after the token
that follows the one that asked (`drop_stale`). It shares the cache's lock, condition and
counters: host_prefetch_requests / dropped / errors here, loads / bytes / useful / unused_evicted
/ waited in the host tier.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from decoder.experts.cache import ExpertCache

log = logging.getLogger("decoder.experts.cache")   # one logger for the cache and its tiers

QUEUE_PER_THREAD = 4      # queued host-tier prefetches kept, per thread, x experts per layer


class HostPrefetcher:
    """`threads` threads fetching predicted host-tier misses of `cache` (see the module docstring)."""

    def __init__(self, cache: "ExpertCache", threads: int) -> None:
        self.c = cache
        self.threads = max(0, int(threads))
        self._queue: dict[tuple[int, int], tuple[float, int]] = {}   # key -> (score, step it was asked at)
        self._active: set[tuple[int, int]] = set()                   # taken by a thread
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"host-prefetch-{i}", daemon=True)
                         for i in range(self.threads)]
        for t in self._threads:
            t.start()

    def _wanted(self, key: tuple[int, int]) -> bool:
        """Neither on the GPU, nor in the host tier, nor on its way there. Lock held."""
        c, (layer, e) = self.c, key
        return not (e in c._gpu[layer] or key in c._tasks or key in c.host.entries or key in c.host.fetching)

    def ask(self, layer: int, experts: Sequence[int], scores: Sequence[float] | None = None) -> int:
        """Queue these predicted host-tier misses; returns how many are new. Lock NOT held."""
        c = self.c
        n = 0
        with c._lock:
            for i, e in enumerate(experts):
                key = (layer, int(e))
                if not self._wanted(key) or key in self._active:
                    continue
                score = float(scores[i]) if scores is not None else 0.0
                old = self._queue.get(key)
                if old is None:
                    c._counts["host_prefetch_requests"] += 1
                    n += 1
                self._queue[key] = (max(score, old[0]) if old else score, c.step)
            bound = QUEUE_PER_THREAD * self.threads * c.E
            if len(self._queue) > bound:
                for key in sorted(self._queue, key=lambda k: self._queue[k][0])[:len(self._queue) - bound]:
                    del self._queue[key]
                    c._counts["host_prefetch_dropped"] += 1
            if n:
                c._cond.notify_all()
        return n

    def drop_stale(self, step: int) -> None:
        """A new token began: drop what was asked before the previous token (what the last token
        asked may be for this one: the prefetcher looks into the next token). Lock held."""
        for key in [k for k, (_, st) in self._queue.items() if st < step - 1]:
            del self._queue[key]
            self.c._counts["host_prefetch_dropped"] += 1

    def pending(self) -> int:
        """Queued or in flight. Lock held."""
        return len(self._queue) + len(self._active)

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until nothing is queued or in flight. Lock NOT held."""
        c = self.c
        deadline = time.monotonic() + timeout
        with c._lock:
            while self._queue or self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                c._cond.wait(timeout=min(left, 0.05))
        return True

    def _loop(self) -> None:
        c = self.c
        while True:
            with c._lock:
                key = None
                while key is None:
                    if self._closed:
                        return
                    if self._queue:
                        key = max(self._queue, key=lambda k: self._queue[k][0])
                        del self._queue[key]
                        if not self._wanted(key):
                            key = None          # on its way or there since it was asked for
                            continue
                        self._active.add(key)
                    else:
                        c._cond.wait()
            try:
                h = c.host.acquire(key[0], key[1], "background")
                with c._lock:
                    c.host.release(key, h)
            except Exception as exc:  # noqa: BLE001 - a failed prefetch costs only its demand load later
                with c._lock:
                    c._counts["host_prefetch_errors"] += 1
                log.warning("host-tier prefetch of layer %d expert %d failed: %s", key[0], key[1], exc)
            finally:
                with c._lock:
                    self._active.discard(key)
                    c._cond.notify_all()

    def close(self) -> None:
        with self.c._lock:
            self._closed = True
            self._queue.clear()
            self.c._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5.0)
