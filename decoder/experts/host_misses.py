"""Which of a layer's GPU misses the host computes, and those calls (for ExpertCache).

With `miss_compute` on, a miss whose expert is in the host tier, with no load of it in flight
and at most `cpu_max_tokens` tokens routed to it, may be computed on the host's cores from the
host tier's bytes instead of copied to the GPU (host_compute.py has the kernels, the workers
and MissRule, the per-miss cost rule). `HostMisses` is the cache's side of it: the routed token
counts the decode step announces (`expect`), the choice per layer (`plan`: MissRule on the
measured copy and host costs and both queues), the layer's share sent to the host once
(`compute`) or one call at a time (`call`, the eager path), and packing experts for the host's
kernels from their host slots (on first use, in the background, or all at once: `pack`). It
shares the cache's lock and counters.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from decoder.experts.host_compute import HostJob
from decoder.experts.host_tier import ArenaReplaced, HostEntry

if TYPE_CHECKING:  # pragma: no cover
    from decoder.experts.cache import ExpertCache


class HostMisses:
    """The misses `cache`'s host computes (see the module docstring)."""

    def __init__(self, cache: "ExpertCache") -> None:
        self.c = cache
        self._expect: dict[int, dict[int, int]] = {}   # layer -> {expert: tokens} of its coming forward
        self._on_host: dict[int, set[int]] = {}         # layer -> experts its current forward computes on the host
        self._bufs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}   # (layer, B) -> (x, out)

    # --- the cache's forward of one layer (lock held unless noted) ---------------------------
    def expect(self, layer: int, counts: Mapping[int, int]) -> None:
        self._expect[layer] = dict(counts)

    def on_host(self, layer: int) -> list[int]:
        return sorted(self._on_host.get(layer, ()))

    def computes(self, layer: int, expert: int) -> bool:
        return expert in self._on_host.get(layer, ())

    def release(self, layer: int) -> None:
        self._on_host.pop(layer, None)

    def plan(self, layer: int, needed: Sequence[int]) -> set[int]:
        """Which of `layer`'s misses the host computes (MissRule on the measured costs). Lock held."""
        c = self.c
        counts = self._expect.pop(layer, None)
        if counts is None:
            return set()
        gpu, tasks, host = c._gpu[layer], c._tasks, c.host.entries

        def queued_prefetch(e: int) -> bool:
            t = tasks.get((layer, e))
            return t is not None and t.kind == "prefetch" and t.state == "queued"

        # a load already running stays a copy; a prefetch still queued may give way to the host
        misses = [e for e in needed if e not in gpu and ((layer, e) not in tasks or queued_prefetch(e))
                  and not c._use_low(layer, e)]
        cands = [e for e in misses if (layer, e) in host and 0 < counts.get(e, 0) <= c.cpu_max_tokens]
        for e in [e for e in cands if not self.ready(layer, e)]:
            cands.remove(e)            # copied this time; packed in the background for the next
            c.host_experts.request_pack((layer, e), lambda e=e: self._pack_one(layer, e))
        if not cands:
            return set()
        c.copies.harvest()
        copy_s = c.costs.cost("host")
        # the copy link is busy with copies in flight, loads queued or running, and this layer's
        # misses the host cannot take
        busy = c.copies.in_flight() + sum(1 for t in tasks.values() if t.state != "done"
                                          and (t.kind == "demand" or t.state == "running"))
        busy += len(misses) - len(cands)
        hx = c.host_experts
        chosen = set(c.miss_rule.assign(cands, copy_s, busy * copy_s, hx.cost.value, hx.backlog(), layer=layer))
        for e in chosen:
            if queued_prefetch(e):
                c._finish(tasks[(layer, e)], dropped=True)
                c._counts["prefetch_cancelled"] += 1
        if chosen:
            self._on_host[layer] = chosen
        return chosen

    def ready(self, layer: int, expert: int) -> bool:
        """The host can compute (layer, expert) without packing it first: packed already, or a
        bf16 payload its kernels read in place (16-byte aligned in its host slot). Lock held."""
        c, key = self.c, (layer, expert)
        if c.host_experts.packed(key) is not None:
            return True
        h = c.host.entries.get(key)
        return h is not None and h.header.precision == "bf16" and c.host.payload(h).data_ptr() % 16 == 0

    # --- the calls (no lock held) ---------------------------------------------------------------
    def compute(self, layer: int, items: Sequence[tuple[int, int, float]], x: torch.Tensor) -> HostJob:
        """Start the host's share of `layer`: `items` (row of x, expert, gate weight), `x` the
        layer's MoE input [B, H] on the device (ready: the step read the layer before). x goes to
        the host once; the workers compute one expert each and w * expert(x[row]) per item is
        summed, in expert order, into a float32 [B, H] sum."""
        c = self.c
        B, H = x.shape
        hx = c.host_experts
        bufs = self._bufs.get((layer, B))
        if bufs is None or bufs[0].dtype != x.dtype:
            pin = c.pinned
            bufs = self._bufs[(layer, B)] = (torch.empty(B, H, dtype=x.dtype, pin_memory=pin),
                                             torch.empty(B, H, dtype=torch.float32, pin_memory=pin))
        xh, out = bufs
        xh.copy_(x)                                   # one device -> host copy of the layer's input
        groups: dict[int, tuple[list[int], list[float]]] = {}
        for row, e, w in items:
            rs, ws = groups.setdefault(int(e), ([], []))
            rs.append(int(row))
            ws.append(float(w))
        # one job per expert over the workers; the sum is taken in expert order whatever their number
        fut = hx.submit_layer(groups, xh, out, lambda e, xe: self.call(layer, e, xe, queued=True))
        return HostJob(out, fut, on_wait=self._add_stall)

    def _add_stall(self, seconds: float) -> None:
        with self.c._lock:
            self.c._add_stall(seconds)

    def call(self, layer: int, expert: int, x: torch.Tensor, queued: bool = False) -> torch.Tensor:
        """expert(x) on the host: x [T, H] on any device -> [T, H] on x's device. From the worker
        (`queued`) it runs there; from another thread it is queued to the worker and waited for.
        The expert is packed from its host slot on first use (held while a bf16 expert, read in
        place, computes); a packed int8/int4 expert no longer needs the slot."""
        c = self.c
        hx = c.host_experts
        if not queued:
            xc = x.to("cpu")
            t0 = time.perf_counter()
            fut = hx.submit(lambda: self.call(layer, expert, xc, queued=True), calls=1)
            try:
                y = fut.result()
            finally:
                hx.done_call()
                self._add_stall(time.perf_counter() - t0)
            return y.to(x.device)
        key = (layer, expert)
        ex = hx.packed(key)
        if ex is not None:
            y = hx.run_call(ex, x)
        else:
            out: list[torch.Tensor] = []

            def compute(h: HostEntry) -> None:
                out[:] = [hx.run_call(hx.expert(key, h.header, c.host.payload(h)), x)]
                self._read_done(key, h)

            c.host.load(layer, expert, "demand", compute)
            y = out[0]
        with c._lock:
            c._counts["cpu_tokens"] += int(x.shape[0])
        return y

    def _pack_one(self, layer: int, expert: int) -> None:
        """Pack (layer, expert) for the host's kernels from its host slot."""
        c, key = self.c, (layer, expert)

        def pack(h: HostEntry) -> None:
            c.host_experts.expert(key, h.header, c.host.payload(h))
            self._read_done(key, h)

        c.host.load(layer, expert, "prefetch", pack)

    def _read_done(self, key: tuple[int, int], h: HostEntry) -> None:
        """The host's kernels finished reading h's payload: an arena slot the store replaced
        meanwhile drops what was packed from it, and HostTier.load reads the expert again."""
        try:
            self.c.host.copied(h, None)
        except ArenaReplaced:
            self.c.host_experts.forget(key)
            raise

    def pack(self, keys: Sequence[tuple[int, int]]) -> int:
        """Pack `keys` (in the host tier) now, on this thread, while the packed budget lasts;
        returns how many it packed."""
        c = self.c
        hx, n = c.host_experts, 0
        for l, e in keys:
            with c._lock:
                if (l, e) not in c.host.entries or self.ready(l, e):
                    continue
            before = hx.packed_bytes
            self._pack_one(l, e)
            n += 1
            grown = hx.packed_bytes - before
            if grown <= 0 or hx.packed_bytes + grown > hx.pack_bytes:
                break                  # not kept (bf16 in place) or the next would evict one
        return n
