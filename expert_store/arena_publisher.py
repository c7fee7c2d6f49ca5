"""The co-located store's logic: a read-through tier that publishes blobs into the arena.

    upstream = StoreClient.open("grpc://store-0.store:50051,store-1.store:50051")   # or a dir
    pub = ArenaPublisher(upstream, ArenaWriter.open("/dev/shm/adapmoe.arena", 8 << 30, slot_bytes))
    locs = pub.ensure("mixtral", [(3, 5, "int4"), (3, 6, "int4")], priority="demand", pin_s=0)

The fleet keeps one source of truth (the upstream: the shared store replicas, or a store
directory with its Redis / NVMe tiers); this process only keeps copies, in the shared-memory
arena (expert_store/shm_arena.py) that the decoder maps. `ensure` answers where each ref sits,
fetching what is missing straight into a free (or evicted) slot:

- a ref the arena holds is a hit: its LRU stamp moves, nothing is copied;
- a ref being published by another call is waited for (one upstream fetch per blob);
- a missing ref takes the least recently used unpinned slot that no ref of the same call
  holds; none left -> ResourceExhausted (RESOURCE_EXHAUSTED), nothing fetched;
- a fetched blob is checked once, as it enters: its length and xxh3-128 against the manifest
  and its header's ref (DataLoss otherwise; the slot stays empty);
- with `raw=True` (`expert-store colocate --publish raw`) a bf16 blob is published with its
  byte planes joined (codec none, a new seal; format.transcode_raw): the planes are joined once
  here rather than by the decoder on every host-tier miss, and the decoder copies the payload
  from the arena to the GPU as it lies. The slots must then hold the raw blob (`raw_slot_bytes`);
  one that does not fit is published as stored. Its record's xxh3 is of what the slot holds.

`pin_s` keeps the call's refs from eviction for that many seconds (a lease: a decoder that
dies leaks nothing), e.g. a cold fill's working set. `ReadThroughStore` gives the same arena
the ModelStore face that `ExpertStoreServicer` serves, so the control port is a whole store too
(manifest, dense file, and blobs over gRPC for a client that cannot map the arena).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import xxhash

from expert_store import format as blob_format
from expert_store.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted, StoreError, Unavailable
from expert_store.client import StoreClient
from expert_store.manifest import Manifest
from expert_store.shm_arena import ArenaReader, ArenaWriter, Location, SLOT_ALIGN, blob_key
from expert_store.store import VerifyResult
from expert_store.tiers.base import BlobReader, BufferReader

log = logging.getLogger("expert_store.arena")

Ref = tuple[int, int, str]
MANIFEST_TTL_S = 30.0   # a re-packed model is seen within this long


def slot_bytes_for(manifests: Sequence[Manifest], precisions: Sequence[str] | None = None) -> int:
    """The slot size that holds every blob of these manifests, or only those at `precisions`
    (an int4 decoder need not pay bf16-sized slots), rounded up to 4 KiB."""
    largest = max((entry[0] for m in manifests for (_, _, p), entry in m.blobs.items()
                   if precisions is None or p in precisions), default=0)
    if largest <= 0:
        raise InvalidArgument(f"the models list no expert blobs{f' at {list(precisions)}' if precisions else ''}: "
                              f"cannot size the arena's slots")
    return -(-largest // SLOT_ALIGN) * SLOT_ALIGN


def raw_slot_bytes(upstream: StoreClient, manifests: Sequence[Manifest], precisions: Sequence[str] | None = None) -> int:
    """slot_bytes_for, large enough for bf16 blobs published raw (codec none): one blob's
    header per model tells the raw payload's size (a model's experts share their shapes)."""
    slot = slot_bytes_for(manifests, precisions)
    for m in manifests:
        refs = sorted(r for r in m.blobs if r[2] == "bf16" and (precisions is None or "bf16" in precisions))
        if refs:
            header, _ = blob_format.read_header(upstream.fetch_expert(m.model, *refs[0]))
            slot = max(slot, -(-blob_format.raw_blob_size(header) // SLOT_ALIGN) * SLOT_ALIGN)
    return slot


class _Fill:
    """One blob being published: later callers wait on it instead of fetching it again."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class ArenaPublisher:
    """Read-through tier over `upstream` that publishes into `writer` (see the module docstring)."""

    def __init__(self, upstream: StoreClient, writer: ArenaWriter, *, fetch_threads: int = 4,
                 max_refs: int = 256, raw: bool = False) -> None:
        self.upstream = upstream
        self.writer = writer
        self.raw = bool(raw)   # publish coded blobs with codec none (format.transcode_raw)
        self._scratch = threading.local()   # raw: a receive buffer per fetch thread
        # raw: whether a (model, precision)'s last blob came coded, so the next is received beside
        # its slot (to be transcoded into it) or straight into it (codec none: published as read)
        self._coded: dict[tuple[str, str], bool] = {}
        self.max_refs = int(max_refs)
        self._lock = threading.Lock()
        self._fills: dict[int, _Fill] = {}
        self._manifests: dict[str, tuple[float, Manifest]] = {}
        # demand and prefetch fetches on threads of their own: a cold fill (thousands of
        # prefetch refs) never queues a decoder's demand miss behind it
        threads = max(1, int(fetch_threads))
        self._pools = {"demand": ThreadPoolExecutor(max_workers=threads, thread_name_prefix="arena-demand"),
                       "prefetch": ThreadPoolExecutor(max_workers=threads, thread_name_prefix="arena-prefetch")}
        self._reader = ArenaReader(writer.path)   # ReadThroughStore copies out with the seqlock too
        self.counts = {"hits": 0, "misses": 0, "waits": 0, "data_loss": 0, "bytes_published": 0,
                       "fill_seconds": 0.0}

    # ---- manifests ---------------------------------------------------------------------------
    def manifest(self, model: str) -> Manifest:
        """The upstream's manifest (cached for MANIFEST_TTL_S)."""
        now = time.monotonic()
        with self._lock:
            hit = self._manifests.get(model)
        if hit is not None and now - hit[0] < MANIFEST_TTL_S:
            return hit[1]
        m = self.upstream.manifest(model)
        with self._lock:
            self._manifests[model] = (now, m)
        return m

    def check_ref(self, model: str, layer: int, expert: int, precision: str) -> tuple[int, str]:
        """(size, xxh3) of a ref the model lists; NotFound / InvalidArgument otherwise."""
        try:
            blob_format.expert_key(model, layer, expert, precision)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        entry = self.manifest(model).blobs.get((layer, expert, precision))
        if entry is None:
            raise NotFound(f"model {model} has no blob L{layer} E{expert} {precision}")
        if entry[0] > self.writer.slot_bytes:
            raise ResourceExhausted(f"blob L{layer} E{expert} {precision} of {model} is {entry[0]} bytes; "
                                    f"the arena's slots hold {self.writer.slot_bytes} (size it for this model)")
        return entry

    # ---- ensure ------------------------------------------------------------------------------
    def ensure(self, model: str, refs: Sequence[Ref], priority: str = "demand", pin_s: float = 0.0,
               timeout_s: float | None = None) -> list[Location]:
        """Every ref in the arena; their locations in request order (see the module docstring)."""
        if not refs:
            raise InvalidArgument("name at least one blob")
        if len(refs) > self.max_refs:
            raise ResourceExhausted(f"{len(refs)} refs in one call; at most {self.max_refs}")
        if pin_s < 0:
            raise InvalidArgument("pin_s must be >= 0")
        if priority not in self._pools:
            raise InvalidArgument(f"priority must be one of {sorted(self._pools)}, got {priority!r}")
        refs = [(int(l), int(e), str(p)) for l, e, p in refs]
        wanted = list(dict.fromkeys(refs))
        entries = {ref: self.check_ref(model, *ref) for ref in wanted}
        if len(wanted) > self.writer.slots:
            raise ResourceExhausted(f"{len(wanted)} blobs do not fit an arena of {self.writer.slots} slots")
        now = time.monotonic_ns()
        pin_until = now + int(pin_s * 1e9) if pin_s > 0 else 0
        mine: list[tuple[Ref, int, _Fill]] = []
        waits: list[_Fill] = []
        with self._lock:
            held: set[int] = set()
            try:
                for ref in wanted:
                    key = blob_key(model, *ref)
                    slot = self.writer.lookup(key)
                    if slot is not None:
                        self.counts["hits"] += 1
                        self.writer.touch(slot, now, pin_until)
                        held.add(slot)
                        continue
                    fill = self._fills.get(key)
                    if fill is not None:
                        self.counts["waits"] += 1
                        waits.append(fill)
                        continue
                    slot = self.writer.victim(now, held)
                    if slot is None:
                        raise ResourceExhausted(
                            f"the arena is full: its {self.writer.slots} slots are pinned or in use by this "
                            f"request and publishes in flight ({len(wanted)} blobs asked)")
                    self.writer.begin(slot)
                    fill = _Fill()
                    self._fills[key] = fill
                    mine.append((ref, slot, fill))
                    held.add(slot)
                    self.counts["misses"] += 1
            except BaseException:
                for ref, slot, fill in mine:   # nothing fetched yet: give the slots back
                    self._finish(model, ref, slot, fill, error=Unavailable("cancelled"))
                raise
        pool = self._pools["demand" if priority == "demand" else "prefetch"]
        futures = [pool.submit(self._publish, model, ref, slot, fill, entries[ref], priority, pin_until)
                   for ref, slot, fill in mine]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        first_error: BaseException | None = None
        for fill in [f for _, _, f in mine] + waits:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not fill.done.wait(left):
                raise Unavailable(f"publishing {len(mine) + len(waits)} blobs took longer than the deadline")
            if fill.error is not None and first_error is None:
                first_error = fill.error
        for f in futures:
            f.result()
        if first_error is not None:
            raise first_error
        out = []
        with self._lock:
            for ref in refs:
                slot = self.writer.lookup(blob_key(model, *ref))
                if slot is None:   # evicted again by a concurrent call: the reader asks once more
                    raise Unavailable(f"L{ref[0]} E{ref[1]} {ref[2]} was evicted before it could be answered "
                                      f"(the arena is thrashing: raise its budget)")
                self.writer.touch(slot, time.monotonic_ns(), pin_until)
                out.append(self.writer.location(slot))
        return out

    def _publish(self, model: str, ref: Ref, slot: int, fill: _Fill, entry: tuple[int, str], priority: str,
                 pin_until: int) -> None:
        """Fetch one blob straight into its slot, check it once, publish it (or leave the slot empty)."""
        error: BaseException | None = None
        t0 = time.perf_counter()
        length, digest = 0, b""
        try:
            slot_view = self.writer.m.slot_view(slot)
            # raw: a coded blob is received beside the slot, then written into it with its planes
            # joined; one stored with codec none goes straight into the slot, as every int blob does
            raw = self.raw and ref[2] == "bf16"
            view = self._receive_buffer() if raw and self._coded.get((model, ref[2]), True) else slot_view
            try:
                got = self.upstream.fetch_expert(model, *ref, out=view, priority=priority)
                length = len(got)
                if length > len(view):
                    raise DataLoss(f"{model} L{ref[0]} E{ref[1]} {ref[2]}: {length} bytes do not fit a slot")
                if not (isinstance(got, memoryview) and got.obj is view.obj):
                    view[:length] = got   # a client that returned its own buffer
                blob = view[:length]
                size, xxh3 = entry
                if length != size:
                    raise DataLoss(f"{model} L{ref[0]} E{ref[1]} {ref[2]}: the upstream sent {length} bytes, "
                                   f"the manifest lists {size}")
                digest = xxhash.xxh3_128_digest(blob)
                if xxh3 and digest.hex() != xxh3:
                    raise DataLoss(f"{model} L{ref[0]} E{ref[1]} {ref[2]}: xxh3 {digest.hex()} != the manifest's "
                                   f"{xxh3} (corrupted upstream copy)")
                header, _ = blob_format.read_header(blob)
                if (header.model, header.layer, header.expert, header.precision) != (model, *ref):
                    raise DataLoss(f"{model} L{ref[0]} E{ref[1]} {ref[2]}: the blob's header names {header.model} "
                                   f"L{header.layer} E{header.expert} {header.precision}")
                if not xxh3:   # no manifest hash to hold it to: the blob's own seal
                    blob_format.check_blob(blob)
                if raw:
                    coded = self._coded[(model, ref[2])] = header.codec != "none"
                    if coded and view is slot_view:   # guessed wrong: move it beside the slot first
                        view = self._receive_buffer()
                        view[:length] = blob
                        blob.release()
                        blob = view[:length]
                if view is not slot_view:
                    length = self._write_raw(blob, header, slot_view, length)
                    digest = xxhash.xxh3_128_digest(slot_view[:length])
                blob.release()
            finally:
                slot_view.release()   # (the receive buffer is this thread's, reused)
        except blob_format.BlobError as e:
            error = DataLoss(f"{model} L{ref[0]} E{ref[1]} {ref[2]}: integrity check failed: {e}")
        except BaseException as e:  # noqa: BLE001 - handed to every waiter
            error = e
        if isinstance(error, DataLoss):
            self.counts["data_loss"] += 1
            log.error("not published: %s", error)
        with self._lock:
            if error is None:
                self.counts["bytes_published"] += length
                self.counts["fill_seconds"] += time.perf_counter() - t0
            self._finish(model, ref, slot, fill, error=error, length=length, digest=digest, pin_until=pin_until)

    def _receive_buffer(self) -> memoryview:
        """This thread's buffer for a blob that is transcoded into its slot (raw publishing)."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None:
            buf = self._scratch.buf = memoryview(bytearray(self.writer.slot_bytes))
        return buf

    @staticmethod
    def _write_raw(blob: memoryview, header: blob_format.BlobHeader, slot_view: memoryview, length: int) -> int:
        """The checked `blob` (its parsed `header`) into its slot with codec none (its planes
        joined: the decoder copies it to the GPU as it lies); as it came when that does not fit
        the slot. Returns its length."""
        if blob_format.raw_blob_size(header) <= len(slot_view):
            return blob_format.transcode_raw(blob, slot_view)
        slot_view[:length] = blob
        return length

    def _finish(self, model: str, ref: Ref, slot: int, fill: _Fill, *, error: BaseException | None,
                length: int = 0, digest: bytes = b"", pin_until: int = 0) -> None:
        """Commit or abort a slot and wake the waiters. Lock held."""
        if error is None:
            self.writer.commit(slot, model, *ref, length, digest, time.monotonic_ns(), pin_until)
        else:
            self.writer.abort(slot)
        self._fills.pop(blob_key(model, *ref), None)
        fill.error = error
        fill.done.set()

    def prefill(self, model: str, precision: str, stop: threading.Event | None = None) -> dict[str, Any]:
        """A cold fill: publish the model's blobs at `precision`, layer by layer, at most as
        many as the arena has slots (it never cycles the arena through itself). At prefetch priority, on the
        prefetch threads: demand misses pass it, so the decoder serves while it runs. A blob
        that fails (DATA_LOSS, ...) is logged and skipped. Returns blobs, bytes, seconds."""
        refs = sorted(r for r in self.manifest(model).blobs if r[2] == precision)
        if not refs:
            raise NotFound(f"model {model} has no blobs at {precision}")
        refs = refs[:self.writer.slots]
        before = self.counts["bytes_published"]
        t0 = time.perf_counter()
        done = 0
        step = min(64, self.max_refs, max(1, self.writer.slots // 2))
        for i in range(0, len(refs), step):
            if stop is not None and stop.is_set():
                break
            batch = refs[i:i + step]
            try:
                self.ensure(model, batch, priority="prefetch")
            except (StoreError, RuntimeError) as e:   # RuntimeError: closing under it
                log.warning("prefill of %s: %d blobs from L%d E%d: %s", model, len(batch), batch[0][0], batch[0][1], e)
                if isinstance(e, RuntimeError):
                    break
            done += len(batch)
        seconds = time.perf_counter() - t0
        nbytes = self.counts["bytes_published"] - before
        log.info("prefilled %d of %s's %s blobs: %.2f GB in %.1f s (%.2f GB/s into the arena)", done, model,
                 precision, nbytes / 1e9, seconds, nbytes / seconds / 1e9 if seconds else 0.0)
        return {"blobs": done, "bytes": nbytes, "seconds": seconds}

    # ---- reading back (the gRPC face) ----------------------------------------------------------
    def blob(self, model: str, layer: int, expert: int, precision: str, attempts: int = 4) -> bytes:
        """The blob's bytes, through the arena (published first when missing)."""
        for _ in range(attempts):
            got = self._reader.read(model, layer, expert, precision)
            if got is not None:
                return got
            self.ensure(model, [(layer, expert, precision)])
        raise Unavailable(f"{model} L{layer} E{expert} {precision} was evicted {attempts} times while being read "
                          f"(the arena is thrashing: raise its budget)")

    def stats(self) -> dict[str, Any]:
        now = time.monotonic_ns()
        with self._lock:
            c = dict(self.counts)
            c.update(self.writer.counters(), slots=self.writer.slots, slot_bytes=self.writer.slot_bytes,
                     used=self.writer.used(), pinned=self.writer.pinned(now), epoch=self.writer.epoch)
        secs = c.pop("fill_seconds")
        c["fill_gbps"] = c["bytes_published"] / secs / 1e9 if secs else 0.0
        return c

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self._reader.close()
        self.writer.close()
        self.upstream.close()


class ReadThroughStore:
    """The ModelStore face of an ArenaPublisher, for ExpertStoreServicer: manifests and the
    dense file from the upstream, expert blobs through the arena. Read-only (pack into the
    upstream)."""

    def __init__(self, publisher: ArenaPublisher) -> None:
        self.publisher = publisher
        self._models: set[str] = set()

    def manifest(self, model: str) -> Manifest:
        m = self.publisher.manifest(model)
        self._models.add(model)
        return m

    def check_ref(self, model: str, layer: int, expert: int, precision: str) -> None:
        self.publisher.check_ref(model, layer, expert, precision)

    def open_expert(self, model: str, layer: int, expert: int, precision: str, offset: int = 0,
                    chunk_bytes: int = 1 << 20) -> BlobReader:
        if self.publisher.raw and precision == "bf16":   # the arena's copy is transcoded: serve the stored one
            return BufferReader(self.publisher.upstream.fetch_expert(model, layer, expert, precision), offset,
                                chunk_bytes, "upstream")
        return BufferReader(self.publisher.blob(model, layer, expert, precision), offset, chunk_bytes, "arena")

    def open_dense(self, model: str, offset: int = 0, chunk_bytes: int = 1 << 20) -> BlobReader:
        return BufferReader(self.publisher.upstream.fetch_dense(model), offset, chunk_bytes, "upstream")

    def models(self) -> list[str]:
        return sorted(self._models)

    def put_file(self, *args: Any, **kw: Any) -> tuple[str, int]:
        raise StoreError("a co-located store is a read-through copy: pack into its upstream store",
                         code="FAILED_PRECONDITION")

    def verify_expert(self, model: str, layer: int, expert: int, precision: str) -> VerifyResult:
        raise StoreError("a co-located store checks each blob as it enters the arena: verify its upstream store",
                         code="FAILED_PRECONDITION")

    def verify_dense(self, model: str) -> VerifyResult:
        return self.verify_expert(model, 0, 0, "")

    def stats(self) -> dict[str, dict]:
        s = self.publisher.stats()
        return {"arena": {"hits": s["hits"], "misses": s["misses"], "bytes_written": s["bytes_published"]}}


__all__ = ["ArenaPublisher", "ReadThroughStore", "raw_slot_bytes", "slot_bytes_for"]
