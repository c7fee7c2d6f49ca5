"""A decoder's cold start: its host tier filled from the store in the background while it serves.

A decoder that starts against a store has an empty host tier; without a fill every first use of
an expert waits for the store. `HostFill` brings the experts the host tier should hold into it on
its own threads, most wanted first (the calibration profile's popularity: each layer's most used
expert, then each layer's second, ...), at prefetch priority: a demand miss of a request being
served passes it (FetchPool and the co-located store queue demand first), so the model takes
traffic before the fill ends. With a co-located store the fill has the store publish into its
arena first (`HostTier.fill`). Progress: `stats()` (state, experts done of total, GB/s) and a
log line when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from decoder.experts.cache import ExpertCache

log = logging.getLogger("decoder.experts.cache")   # one logger for the cache and its tiers


def fill_order(layers: Sequence[int], n_experts: int, profile: Mapping[str, Any] | None,
               limit: int) -> list[tuple[int, int]]:
    """The first `limit` (layer, expert) keys, most wanted first: rank r of every layer before
    rank r + 1 of any, ranks by the profile's per-layer popularity (expert order without one)."""
    pop = (profile or {}).get("popularity")
    ranked = {}
    for layer in layers:
        row = pop[layer] if pop is not None and layer < len(pop) and len(pop[layer]) == n_experts else None
        ranked[layer] = sorted(range(n_experts), key=lambda e: -row[e]) if row else list(range(n_experts))
    keys = [(layer, ranked[layer][r]) for r in range(n_experts) for layer in layers]
    return keys[:max(0, int(limit))]


class HostFill:
    """Fills `cache`'s host tier with `keys` on a thread of its own (see the module docstring)."""

    def __init__(self, cache: "ExpertCache", keys: Sequence[tuple[int, int]], threads: int = 8,
                 progress: bool = False) -> None:
        self.cache = cache
        self.keys = list(keys)
        self.threads = max(1, int(threads))
        self.progress = progress
        self.state = "running"
        self.error: str | None = None
        self.seconds = 0.0
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="host-fill", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.cache.fill_host(self.keys, self.threads, self.progress, stop=self._stop)
            self.state = "stopped" if self._stop.is_set() else "done"
        except BaseException as e:  # noqa: BLE001 - the decoder keeps serving: misses go to the store
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.warning("host tier fill failed: %s (misses are fetched on demand)", self.error)
        finally:
            self.seconds = time.perf_counter() - self._t0
        if self.state == "done":
            st = self.cache.host.fill_stats
            log.info("host tier filled: %d experts, %.2f GB in %.1f s (%.2f GB/s)", st.get("experts", 0),
                     st.get("bytes", 0) / 1e9, self.seconds, st.get("gbps", 0.0))

    def wait(self, timeout: float | None = None) -> bool:
        """True once the fill ended (done, stopped or failed)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """No further load starts; waits for the ones in flight."""
        self._stop.set()
        self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        prog = self.cache.host.fill_progress
        running = self._thread.is_alive()
        st = self.cache.host.fill_stats if not running else {}
        return {"state": "running" if running else self.state, "experts": len(self.keys),
                "done": prog.get("done", 0), "to_fetch": prog.get("total", 0),
                "seconds": (time.perf_counter() - self._t0) if running else self.seconds,
                "gbps": st.get("gbps"), "arena_gbps": st.get("arena_gbps"), "error": self.error}
