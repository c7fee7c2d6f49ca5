"""GPU copies of experts at a lower precision for demand misses of low-weight experts (HOBBIT):
a smaller blob crosses the link instead of the full one. The expert cache owns one when it is
built with `miss_precision` and serves such misses from it."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from decoder.experts.gpu_slots import HOST_ALIGN, DenseLayout, GpuEntry, Staging, align, raw_slot_bytes
from decoder.experts.provider import ExpertSource, ExpertWeights, expert_weights_from_views

if TYPE_CHECKING:  # pragma: no cover
    from decoder.experts.cache import ExpertCache


class LowPrecisionTier:
    """GPU copies of experts at a lower precision (e.g. int4), for demand misses of experts the
    gating marked as low-weight (HOBBIT): a smaller blob crosses the link instead of the full one.
    A small pool of fixed slots, one LRU over all layers; loads run on the caller's thread (they
    are demand loads), through one pinned staging buffer, H2D on the cache's copy stream. With
    `dense` a slot holds the expert dequantized into the compute dtype (like the cache's dense
    slots): the payload is copied into one device staging buffer and dequantized from there on
    the cache's dequant stream."""

    def __init__(self, cache: ExpertCache, source: ExpertSource, slots: int, dense: bool = False) -> None:
        from expert_store import format as blob_format

        self.cache, self.source = cache, source
        probe = bytes(source.fetch(cache.moe_layers[0], 0, priority="demand"))
        header, _ = blob_format.read_header(probe)
        self.raw_size = int(header.raw_size)
        self.dense_layout = DenseLayout.of(header, source.dtype) if dense else None
        self.slot_bytes = self.dense_layout.nbytes if dense else raw_slot_bytes(header)
        self.device_stage = (Staging(torch.empty(raw_slot_bytes(header), dtype=torch.uint8, device=cache.device))
                             if dense else None)
        if dense and cache.cuda and cache.dequant_stream is None:
            cache.dequant_stream = torch.cuda.Stream(device=cache.device)
        max_blob = max([len(probe)] + [source.blob_size(l, e) or 0 for l in cache.moe_layers for e in range(cache.E)])
        stage = align(max(max_blob, self.raw_size), HOST_ALIGN)
        if slots < cache.top_k:
            raise ValueError(f"low_slots must be >= top_k ({cache.top_k})")
        self.pool = torch.empty((slots, self.slot_bytes), dtype=torch.uint8, device=cache.device)
        host = torch.empty((2, stage), dtype=torch.uint8)
        self.stage = host.pin_memory() if cache.pinned else host
        self.stage_event: Any = None
        self.free = list(range(slots - 1, -1, -1))
        self.lru: OrderedDict[tuple[int, int], GpuEntry] = OrderedDict()
        self.handed: set[tuple[int, int]] = set()
        self.lock = threading.Lock()   # one low-precision load at a time (a single staging pair)

    def get(self, layer: int, expert: int) -> tuple[ExpertWeights, Any, bool]:
        """(weights, copy event or None, whether it had to load). Counts the lookup."""
        from expert_store import format as blob_format
        from expert_store.quant import tensors_from_raw

        c = self.cache
        key = (layer, expert)
        with c._lock:
            c._low_counts["lookups"] += 1
            ent = self.lru.get(key)
            if ent is not None:
                c._low_counts["hits"] += 1
                self.lru.move_to_end(key)
                self.handed.add(key)
                return ent.weights, ent.copy_event, False
            c._low_counts["misses"] += 1
        with self.lock:
            if self.stage_event is not None:
                self.stage_event.synchronize()   # the last H2D copy out of the staging buffers is done
            t0 = time.perf_counter()
            view = memoryview(self.stage[0].numpy())
            blob = self.source.fetch(layer, expert, out=view, priority="demand")
            n = len(blob)
            if not (isinstance(blob, memoryview) and blob.obj is view.obj):
                view[:n] = blob
            header, _ = blob_format.read_header(view[:n])
            if header.codec == "none":
                blob_format.decode_raw(view[:n])
                src = self.stage[0, header.payload_offset:header.payload_offset + header.raw_size]
            else:
                blob_format.decode_raw(view[:n], out=memoryview(self.stage[1].numpy()))
                src = self.stage[1, :header.raw_size]
            with c._lock:
                c.costs.observe("store_low", time.perf_counter() - t0)
                c._tier["store"]["loads"] += 1
                c._tier["store"]["bytes"] += n
                if self.free:
                    slot, wait_ev = self.free.pop(), None
                else:
                    victim = next((k for k in self.lru if k not in self.handed and k[0] != layer), None)
                    if victim is None:
                        victim = next((k for k in self.lru if k not in self.handed), None)
                    if victim is None:
                        raise RuntimeError("low-precision tier: every slot is in use by the current layer")
                    old = self.lru.pop(victim)
                    slot, wait_ev = old.slot, old.free_event
            ent = GpuEntry(layer, expert, slot, self.pool[slot], loading=False)
            if self.dense_layout is not None:
                ent.weights = self._load_dense(ent, header, src, wait_ev)
            else:
                dst = ent.buf[:header.raw_size]
                if c.cuda:
                    with torch.cuda.device(c.device), torch.cuda.stream(c.copy_stream):
                        if wait_ev is not None:
                            c.copy_stream.wait_event(wait_ev)
                        dst.copy_(src, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(c.copy_stream)
                    ent.copy_event = self.stage_event = ev
                else:
                    dst.copy_(src)
                ent.weights = expert_weights_from_views(header, tensors_from_raw(header, dst))
            with c._lock:
                c._low_counts["loads"] += 1
                c._low_counts["bytes"] += header.raw_size
                self.lru[key] = ent
                self.handed.add(key)
            return ent.weights, ent.copy_event, True

    def _load_dense(self, ent: GpuEntry, header: Any, src: torch.Tensor, wait_ev: Any) -> ExpertWeights:
        """Host staging -> device staging (copy stream) -> dequantized into ent's slot (dequant
        stream, after `wait_ev`: the slot's last readers). self.lock held."""
        from expert_store import format as blob_format

        c, layout, stage = self.cache, self.dense_layout, self.device_stage
        if not layout.matches(header):
            raise blob_format.BlobError(f"low-precision layer {ent.layer} expert {ent.expert}: tensor shapes differ")
        raw = stage.buf[:header.raw_size]
        if c.cuda:
            copied, done = torch.cuda.Event(), torch.cuda.Event()
            with torch.cuda.device(c.device):
                with torch.cuda.stream(c.copy_stream):
                    if stage.event is not None:   # the last dequantization that read the device staging
                        c.copy_stream.wait_event(stage.event)
                    raw.copy_(src, non_blocking=True)
                    copied.record(c.copy_stream)
                with torch.cuda.stream(c.dequant_stream):
                    c.dequant_stream.wait_event(copied)
                    if wait_ev is not None:
                        c.dequant_stream.wait_event(wait_ev)
                    dense = layout.fill(header, raw, ent.buf)
                    done.record(c.dequant_stream)
            self.stage_event = copied            # the host staging is read until `copied`
            stage.event = ent.copy_event = done
        else:
            raw.copy_(src)
            dense = layout.fill(header, raw, ent.buf)
        return ExpertWeights(dense["w1"], dense["w3"], dense["w2"], self.source.precision)

    def release(self, layer: int) -> None:
        """Called with the cache lock held when `layer` is done."""
        mine = {k for k in self.handed if k[0] == layer}
        if not mine:
            return
        if self.cache.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.cache.device))
            for k in mine:
                if k in self.lru:
                    self.lru[k].free_event = ev
        self.handed -= mine
