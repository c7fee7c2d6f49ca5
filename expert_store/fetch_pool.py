"""FetchPool: receive expert blobs in several processes, straight into one shared-memory arena.

One Python process receives gRPC at ~1 GB/s at best (threads do not help: the GIL;
benchmarks/README.md, "Expert store throughput"), so a decoder that needs more receives in N
worker processes, each with its own StoreClient
(its own gRPC channel), all writing into slots of one `multiprocessing.shared_memory` arena
that the parent (the decoder) owns and registers with CUDA once. Bytes go wire -> arena ->
GPU with no extra copy.

    with FetchPool("grpc://10.0.0.5:50051", "mixtral", workers=4, arena_bytes=8 << 30) as pool:
        pool.pin()                                   # cudaHostRegister once (no-op without CUDA)
        fut = pool.submit(3, 5, "int4", priority="demand")
        c = fut.result()                             # Completion(ref, slot, offset, size, ...)
        blob = pool.arena[c.offset:c.offset + c.size]   # checked bytes; pool.tensor() for torch
        pool.release(c.slot)                         # slot back to the pool's free list

The arena is `slots` fixed slots of `slot_bytes` (default: the model's largest blob, rounded
up to 4 KiB). `submit(..., slot=None)` takes a free slot; a caller that manages its own slots
(an expert cache whose host tier *is* the arena) passes `slot=i` and owns it.

Scheduling: the parent keeps one queue, demand before prefetch before background (FIFO within
each, a crashed worker's request goes back at its old place). "background" (an expert cache's
store prefetch into its host tier, for predicted host-tier misses) is the lowest and bounded:
at most `background_limit` of them are on the wire at once (default: half the workers, at least
one), so the other workers stay free for demand and prefetch; the store sees it as a prefetch.
Each worker holds one job (a request, or one part of a striped one) at a time, so a demand
submitted behind a hundred prefetches waits only for the jobs already on the wire (at most
`workers`), never for the queue. A Future still queued can be cancelled; `promote(future)`
moves a queued prefetch someone now waits for to demand's place.

Striped fetches: one receiving process moves a blob at a fraction of what N of them move
together (~0.25-0.9 GB/s of 3-4 GB/s on the H200 host), so a blob someone waits for can be
asked for in parts, `submit(..., parts=k)`: up to k byte ranges of it (`split_ranges`, none
under MIN_PART_BYTES) queued at the request's place, each received into its bytes of the slot
by whichever worker frees up first (`StoreClient.fetch_expert_range`), and once all are in, one
"check" job runs the whole blob's checks (and the raw mode's decode) on the joined bytes. A
part's store error fails the request once its other parts on the wire have returned (the slot
is not reused under a write); a worker that dies takes only its part back to the queue (a
check that dies: every part again, the decode may have overwritten them).

Integrity: a worker reports a completion only after `format.check_blob` passed on the bytes
in the arena (the blob's seal over every byte) and, for a raw blob, its payload's xxh3, its
header names the requested ref and its size is the manifest's. With `raw=True` a coded bf16
blob is checked as it is written into its slot with its byte planes joined (codec none, a new
seal: `format.transcode_raw`), so the consumer copies the payload where it lies and the decode
runs in the N workers. (The client also checks; a store replies DATA_LOSS rather than bytes
that fail the manifest's xxh3.)

Faults: a worker that dies (SIGKILL, OOM) is noticed through its process sentinel; its
request is retried on another worker (from byte 0: the slot may hold a partial write) and a
replacement worker is started. A request fails with Unavailable after `max_attempts` crashes.
Store errors (NotFound, DataLoss, ...) fail the request's Future with that error.

Future callbacks run on the pool's I/O thread: keep them short (hand work to another thread).

Shutdown: `close()` (or leaving `with`) stops the workers (asks, then SIGKILL after a grace),
fails queued Futures, unregisters the arena from CUDA and unlinks the shared memory. Views
of the arena the caller still holds keep the mapping alive until they are dropped, but the
segment's name is gone, so nothing leaks. A pool never closed is unlinked at interpreter exit.

Pinning (`pin()`): with CUDA available,
    torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
(flags 0 = cudaHostRegisterDefault) page-locks the arena in place, so `tensor[a:b].to("cuda",
non_blocking=True)` is a DMA copy from it (measured on an H200: 52.6 GB/s after registering,
5.9 GB/s before; 43 ms per 512 MB to register). `close()` calls cudaHostUnregister first.
Without CUDA (or without torch) pin() does nothing and returns False.

This module imports no torch at import time (the store side stays light); tensor() and pin()
import it when called.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any, Sequence

from expert_store import format as blob_format, page_lock
from expert_store.errors import InvalidArgument, NotFound, ResourceExhausted, StoreError, Unavailable, error_for_code

log = logging.getLogger("expert_store.fetch_pool")

Ref = tuple[int, int, str]
SLOT_ALIGN = 4096
RANGE_ALIGN = 64 << 10           # parts of a striped blob start at multiples of this
MIN_PART_BYTES = 4 << 20
_RANK = {"demand": 0, "prefetch": 1, "background": 2}
WIRE_PRIORITY = {"demand": "demand", "prefetch": "prefetch", "background": "prefetch"}   # what the store is told


@dataclass(frozen=True)
class Completion:
    """A blob received and checked: it is at arena[offset:offset + size] (slot `slot`)."""

    ref: Ref
    slot: int
    offset: int
    size: int
    worker_pid: int
    attempts: int
    seconds: float  # from submit to completion
    parts: int = 1                       # byte ranges it was received in (submit's parts=)
    receivers: tuple[int, ...] = ()      # the pids that received them (a striped blob's)


@dataclass(eq=False)
class _Request:
    """One blob asked for. Its jobs on the workers: the whole blob (job None), or parts 0..k-1
    then "check" (the joined parts checked in the slot) when it is striped."""

    rid: int
    ref: Ref
    priority: str
    slot: int
    owned: bool                 # slot taken from the pool's free list (released on failure)
    future: Future
    submitted: float
    seq: int
    size: int = 0               # the manifest's bytes
    ranges: list[tuple[int, int]] | None = None   # [start, end) of each part when striped
    parts_left: int = 0         # parts not yet received
    inflight: int = 0           # jobs of this request on workers now
    started: bool = False       # its Future runs (a queued request can still be cancelled)
    error: StoreError | None = None   # it fails once none of its jobs is on a worker
    tries: dict = field(default_factory=dict)    # job -> times sent to a worker
    receivers: set = field(default_factory=set)   # pids that received a part
    queued: set = field(default_factory=set)      # its jobs in the queue now (promote() leaves stale entries)
    failures: list[str] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        """The most times any one of its jobs went to a worker."""
        return max(self.tries.values(), default=0)


def split_ranges(size: int, parts: int, min_part_bytes: int = MIN_PART_BYTES) -> list[tuple[int, int]]:
    """[start, end) of up to `parts` parts of a `size`-byte blob, cut at RANGE_ALIGN boundaries
    and none smaller than `min_part_bytes` but the last (a part is its own stream: below a few
    MB its round trip costs more than it saves). One part: the whole blob."""
    parts = max(1, min(int(parts), size // max(1, int(min_part_bytes))))
    step = -(-size // parts)
    step = -(-step // RANGE_ALIGN) * RANGE_ALIGN
    return [(start, min(size, start + step)) for start in range(0, size, step)]


def _release_views(*views: Any) -> None:
    for v in views:
        if isinstance(v, memoryview):
            v.release()


class _Receiver:
    """A receiving process's state: its StoreClient, the arena, a buffer beside the slots for
    blobs that come coded, and per precision whether the last blob came coded."""

    def __init__(self, client: Any, manifest: Any, model: str, shm: Any, slot_bytes: int, raw: bool) -> None:
        self.client = client
        self.manifest = manifest
        self.model = model
        self.shm = shm
        self.slot_bytes = slot_bytes
        self.raw = raw
        self.scratch: memoryview | None = None
        self.coded: dict[str, bool] = {}    # a store packs one way: the last blob's codec says where to receive

    def _scratch(self) -> memoryview:
        self.scratch = self.scratch or memoryview(bytearray(self.slot_bytes))
        return self.scratch

    def fetch(self, ref: Ref, priority: str, offset: int) -> int:
        """A whole blob into the slot at `offset`: its checked size there. A bf16 blob may come
        coded (byte planes + lz4) and is then decoded into the slot from this process's buffer;
        the first goes straight into the slot (a codec-none store then never copies, a coded
        one moves that one blob aside once)."""
        layer, expert, precision = ref
        out = self.shm.buf[offset:offset + self.slot_bytes]
        got = None
        try:
            transcode = self.raw and precision == "bf16"
            recv = self._scratch() if transcode and self.coded.get(precision, False) else out
            got = self.client.fetch_expert(self.model, layer, expert, precision, out=recv, priority=priority)
            return self._finish(ref, recv, out, len(got))
        finally:
            _release_views(got, out)

    def fetch_range(self, ref: Ref, priority: str, offset: int, start: int, end: int) -> int:
        """Bytes [start, end) of a blob into the same bytes of the slot at `offset`, unchecked
        (the check runs once the parts are joined: check())."""
        layer, expert, precision = ref
        out = self.shm.buf[offset + start:offset + end]
        got = None
        try:
            got = self.client.fetch_expert_range(self.model, layer, expert, precision, start, end, out=out,
                                                 priority=priority)
            if len(got) != end - start:
                raise blob_format.BlobError(f"range [{start}, {end}) came back with {len(got)} bytes")
            return len(got)
        finally:
            _release_views(got, out)

    def check(self, ref: Ref, offset: int, size: int) -> int:
        """A blob joined from parts in the slot at `offset`: checked (and decoded) as a whole
        blob received there is."""
        out = self.shm.buf[offset:offset + self.slot_bytes]
        try:
            return self._finish(ref, out, out, size)
        finally:
            _release_views(out)

    def _finish(self, ref: Ref, recv: memoryview, out: memoryview, size: int) -> int:
        """Check a blob of `size` bytes in `recv` and leave its checked form in `out` (codec none
        where `raw` asks and it fits, else as it came): the size there."""
        layer, expert, precision = ref
        header, _ = blob_format.read_header(recv[:size])
        if (header.model, header.layer, header.expert, header.precision) != (self.model, layer, expert, precision):
            raise blob_format.BlobError(f"header is for {header.model} L{header.layer} E{header.expert} "
                                        f"{header.precision}")
        expected = self.manifest.blobs.get((layer, expert, precision))
        if expected is not None and expected[0] != size:
            raise blob_format.BlobError(f"size {size} != manifest size {expected[0]}")
        self.coded[precision] = header.codec != "none"
        if header.codec == "none":   # seal and payload xxh3: the payload is used where it lies
            blob_format.decode_raw(recv[:size])
            if recv is not out:
                out[:size] = recv[:size]
        elif self.raw and precision == "bf16" and blob_format.raw_blob_size(header) <= len(out):
            if recv is out:          # in the slot it decodes into: moved aside first
                scratch = self._scratch()
                scratch[:size] = out[:size]
                recv = scratch
            size = blob_format.transcode_raw(recv[:size], out)   # checks it as it decodes
        else:                        # kept as it came (not asked for raw, or the raw blob does not fit)
            blob_format.check_blob(recv[:size])
            if recv is not out:
                out[:size] = recv[:size]
        return size


def _worker_main(target: str, model: str, shm_name: str, slot_bytes: int, conn: Any, client_options: dict,
                 raw: bool = False) -> None:
    """One receiving process: its own StoreClient; fetch into the arena, check, report. With
    `raw`, a coded blob (bf16 byte planes) is written into its slot with codec none
    (format.transcode_raw, which checks it as it decodes) from a buffer beside it, as it came
    when that does not fit the slot: the decode runs in this process, not in the decoder's.

    Messages: ("fetch", rid, ref, priority, offset) a whole blob -> ("done", rid, size);
    ("range", rid, ref, priority, offset, start, end) one part -> ("part", rid, nbytes);
    ("check", rid, ref, offset, size) the joined parts -> ("done", rid, size); any of them may
    answer ("error", rid, code, message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    from expert_store.client import StoreClient

    shm = shared_memory.SharedMemory(name=shm_name)
    client = None
    try:
        client = StoreClient.open(target, **client_options)
        manifest = client.manifest(model)  # connects before the first request, sizes for the checks
        receiver = _Receiver(client, manifest, model, shm, slot_bytes, raw)
        conn.send(("ready", os.getpid()))
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg is None:
                return
            kind, rid, ref = msg[0], msg[1], tuple(msg[2])
            try:
                if kind == "fetch":
                    reply = ("done", rid, receiver.fetch(ref, msg[3], msg[4]))
                elif kind == "range":
                    reply = ("part", rid, receiver.fetch_range(ref, msg[3], msg[4], msg[5], msg[6]))
                else:
                    reply = ("done", rid, receiver.check(ref, msg[3], msg[4]))
            except StoreError as e:
                reply = ("error", rid, e.code, str(e))
            except blob_format.BlobError as e:
                reply = ("error", rid, "DATA_LOSS", f"integrity check failed: {e}")
            except Exception as e:  # noqa: BLE001 - reported to the parent, the worker lives on
                reply = ("error", rid, "INTERNAL", f"{type(e).__name__}: {e}")
            conn.send(reply)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    except BaseException as e:
        try:
            conn.send(("failed", os.getpid(), f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        raise
    finally:
        if client is not None:
            client.close()
        try:
            shm.close()
        except BufferError:  # a view still referenced somewhere: the mapping goes with the process
            pass


class _Worker:
    def __init__(self, ctx: Any, args: tuple) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(*args[:4], child, *args[4:]), daemon=True,
                                name="fetch-pool-worker")
        self.proc.start()
        child.close()
        self.pid = self.proc.pid
        self.ready = False
        self.request: _Request | None = None
        self.job: Any = None        # what of `request` it works on (see _Request)
        self.dead = False


def _unlink_quietly(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # views still exported: the mapping lives until they go
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


class FetchPool:
    """N receiving processes -> one shared-memory arena (see the module docstring)."""

    def __init__(self, target: str, model: str, *, workers: int = 2, arena_bytes: int | None = None,
                 slots: int | None = None, slot_bytes: int | None = None, max_attempts: int = 3,
                 start_timeout_s: float = 60.0, deadline_s: float = 30.0, token: str | None = None,
                 tls_ca: Any = None, tls_cert: Any = None, tls_key: Any = None,
                 tls_server_name: str | None = None, background_limit: int | None = None,
                 raw: bool = False, min_part_bytes: int = MIN_PART_BYTES) -> None:
        from expert_store.client import StoreClient

        if workers < 1:
            raise InvalidArgument("workers must be >= 1")
        if max_attempts < 1:
            raise InvalidArgument("max_attempts must be >= 1")
        self.target = str(target)
        self.model = model
        self.workers_wanted = int(workers)
        self.background_limit = max(1, int(workers) // 2) if background_limit is None else int(background_limit)
        if self.background_limit < 1:
            raise InvalidArgument("background_limit must be >= 1")
        self.max_attempts = int(max_attempts)
        self.min_part_bytes = int(min_part_bytes)
        if self.min_part_bytes < RANGE_ALIGN:
            raise InvalidArgument(f"min_part_bytes must be >= {RANGE_ALIGN}")
        self._client_options = {"deadline_s": deadline_s, "max_streams": 1}
        for k, v in (("token", token), ("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key),
                     ("tls_server_name", tls_server_name)):
            if v is not None:
                self._client_options[k] = v
        if self.target.startswith(("grpc://", "dns:", "k8s://")) or not os.path.isdir(self.target):
            self._client_options["channels_per_replica"] = 1
        with StoreClient.open(self.target, **self._client_options) as client:
            self.manifest = client.manifest(model)
        largest = max((size for size, _ in self.manifest.blobs.values()), default=0)
        self.slot_bytes = int(slot_bytes) if slot_bytes else -(-max(largest, 1) // SLOT_ALIGN) * SLOT_ALIGN
        if slots is None:
            if arena_bytes is None:
                raise InvalidArgument("give arena_bytes or slots")
            slots = int(arena_bytes) // self.slot_bytes
        self.slots = int(slots)
        if self.slots < 1:
            raise ResourceExhausted(f"the arena holds no slot of {self.slot_bytes} bytes (the largest blob)")
        self.arena_bytes = self.slots * self.slot_bytes
        self._shm = shared_memory.SharedMemory(create=True, size=self.arena_bytes)
        self.shm_name = self._shm.name
        self._finalizer = weakref.finalize(self, _unlink_quietly, self._shm)
        self.arena = self._shm.buf                       # memoryview of the whole arena
        self._tensor: Any = None
        self._pinned_ptr: int | None = None

        self._lock = threading.Lock()
        self._free = list(range(self.slots - 1, -1, -1))
        self._busy_slots: set[int] = set()
        self._queue: list[tuple[int, int, _Request]] = []
        self._ids = itertools.count()
        self._seq = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._closing = False
        self._closed = False
        self._restarts: list[float] = []
        self.stats_counts = {"completed": 0, "failed": 0, "retried": 0, "worker_restarts": 0, "bytes": 0,
                             "striped": 0, "parts": 0, "promoted": 0}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._ctx = multiprocessing.get_context("spawn")
        self.raw = bool(raw)   # coded bf16 blobs land in their slots decoded (codec none)
        self._worker_args = (self.target, model, self.shm_name, self.slot_bytes, self._client_options, self.raw)
        self._workers: list[_Worker] = []
        self.all_worker_pids: list[int] = []
        try:
            for _ in range(self.workers_wanted):
                self._spawn()
            self._await_ready(start_timeout_s)
        except BaseException:
            self._stop_workers(grace_s=1.0)
            self._release_arena()
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise
        self._thread = threading.Thread(target=self._run, name="fetch-pool", daemon=True)
        self._thread.start()

    # ---- arena views ------------------------------------------------------------------------
    def slot_offset(self, slot: int) -> int:
        return slot * self.slot_bytes

    def slot_view(self, slot: int) -> memoryview:
        if not 0 <= slot < self.slots:
            raise InvalidArgument(f"slot {slot} out of range (0..{self.slots - 1})")
        return self.arena[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def numpy(self) -> Any:
        """The arena as a numpy uint8 array [slots, slot_bytes] (no copy)."""
        import numpy as np

        return np.frombuffer(self.arena, dtype=np.uint8).reshape(self.slots, self.slot_bytes)

    def tensor(self) -> Any:
        """The arena as a torch uint8 tensor [slots, slot_bytes] on the CPU (no copy; one
        tensor per pool, so pin() and the caller share it)."""
        if self._tensor is None:
            import torch

            self._tensor = torch.frombuffer(self.arena, dtype=torch.uint8).view(self.slots, self.slot_bytes)
        return self._tensor

    def pin(self) -> bool:
        """Page-lock the arena for DMA with cudaHostRegister (once); False without CUDA."""
        if self._pinned_ptr is None:
            self._pinned_ptr = page_lock.register(self.tensor())
        return self._pinned_ptr is not None

    @property
    def pinned(self) -> bool:
        return self._pinned_ptr is not None

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, layer: int, expert: int, precision: str, priority: str = "demand",
               slot: int | None = None, parts: int = 1) -> Future:
        """Queue one blob; the Future resolves to a Completion (or a StoreError). slot=None
        takes a free slot (ResourceExhausted when none is free; give it back with release).
        parts=k stripes it: up to k byte ranges (split_ranges) received side by side by the
        workers that free up first, then checked once joined."""
        if priority not in _RANK:
            raise InvalidArgument(f"priority must be one of {sorted(_RANK)}, got {priority!r}")
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise InvalidArgument(f"parts must be an integer >= 1, got {parts!r}")
        ref = (int(layer), int(expert), str(precision))
        entry = self.manifest.blobs.get(ref)
        if entry is None:
            raise NotFound(f"{self.model} has no blob L{ref[0]} E{ref[1]} {ref[2]}")
        if entry[0] > self.slot_bytes:
            raise InvalidArgument(f"blob of {entry[0]} bytes does not fit a {self.slot_bytes}-byte slot")
        fut: Future = Future()
        with self._lock:
            if self._closing:
                raise Unavailable("the fetch pool is closed")
            owned = slot is None
            if owned:
                if not self._free:
                    raise ResourceExhausted(f"all {self.slots} arena slots are in use")
                slot = self._free.pop()
            elif not 0 <= slot < self.slots:
                raise InvalidArgument(f"slot {slot} out of range (0..{self.slots - 1})")
            if slot in self._busy_slots:
                if owned:
                    self._free.append(slot)
                raise InvalidArgument(f"slot {slot} already has a fetch in flight")
            self._busy_slots.add(slot)
            req = _Request(next(self._ids), ref, priority, slot, owned, fut, time.perf_counter(), next(self._seq),
                           size=entry[0])
            ranges = split_ranges(entry[0], parts, self.min_part_bytes) if parts > 1 else []
            if len(ranges) > 1:
                req.ranges, req.parts_left = ranges, len(ranges)
                self.stats_counts["striped"] += 1
            self._requests[req.rid] = req
            for job in (range(len(ranges)) if req.ranges else (None,)):
                self._push(req, job)
        self._wake()
        return fut

    def promote(self, future: Future, priority: str = "demand") -> bool:
        """Raise the priority of the request behind `future` (a prefetch someone now waits for):
        its jobs still queued move to `priority`'s place, ahead of every lower one; those on the
        wire go on. False when the request is no longer in the pool or already ranks as high."""
        if priority not in _RANK:
            raise InvalidArgument(f"priority must be one of {sorted(_RANK)}, got {priority!r}")
        with self._lock:
            req = next((r for r in self._requests.values() if r.future is future), None)
            if req is None or _RANK[req.priority] <= _RANK[priority]:
                return False
            req.priority = priority
            for job in list(req.queued):
                self._push(req, job)      # the old entries are skipped when they come up
            self.stats_counts["promoted"] += 1
        self._wake()
        return True

    def fetch_many(self, refs: Sequence[Ref], priority: str = "demand") -> list[Future]:
        return [self.submit(*ref, priority=priority) for ref in refs]

    def release(self, slot: int) -> None:
        """Give a slot that submit(slot=None) took back to the free list."""
        with self._lock:
            if slot in self._busy_slots or slot in self._free or not 0 <= slot < self.slots:
                raise InvalidArgument(f"slot {slot} is not a completed slot of this pool")
            self._free.append(slot)

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    def inflight(self) -> dict[int, Ref]:
        """{worker pid: the ref it is receiving now}."""
        with self._lock:
            return {w.pid: w.request.ref for w in self._workers if w.request is not None and not w.dead}

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._workers if not w.dead]

    def stats(self) -> dict:
        with self._lock:
            return dict(self.stats_counts, queued=len(self._queue), workers=len(self._workers),
                        free_slots=len(self._free), slots=self.slots, slot_bytes=self.slot_bytes)

    # ---- the parent's I/O thread ------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def _spawn(self) -> _Worker:
        w = _Worker(self._ctx, self._worker_args)
        with self._lock:
            self._workers.append(w)
            self.all_worker_pids.append(w.pid)
        return w

    def _await_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for w in self._workers:
            while not w.ready:
                left = deadline - time.monotonic()
                if left <= 0 or not w.conn.poll(left):
                    raise Unavailable(f"fetch worker {w.pid} did not start within {timeout_s:.0f}s")
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    raise Unavailable(f"fetch worker {w.pid} exited while starting") from None
                if msg[0] == "failed":
                    raise Unavailable(f"fetch worker {w.pid} could not start: {msg[2]}")
                self._on_message(w, msg)

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    workers = list(self._workers)
                waitables = [self._wake_r] + [w.conn for w in workers] + [w.proc.sentinel for w in workers]
                ready = multiprocessing.connection.wait(waitables, timeout=1.0)
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                for w in workers:
                    if w.conn in ready:
                        try:
                            while w.conn.poll():
                                self._on_message(w, w.conn.recv())
                        except (EOFError, OSError):
                            self._on_death(w)
                    if not w.dead and (w.proc.sentinel in ready or not w.proc.is_alive()):
                        self._on_death(w)
                self._dispatch()
        except BaseException:  # noqa: BLE001 - never leave callers waiting on a dead thread
            log.exception("fetch pool I/O thread failed")
            self._fail_all(Unavailable("the fetch pool's I/O thread failed"))

    def _on_message(self, w: _Worker, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            w.ready = True
            return
        if kind == "failed":
            log.error("fetch worker %d failed: %s", w.pid, msg[2])
            return
        rid = msg[1]
        ended = None
        with self._lock:
            req = self._requests.get(rid)
            if w.request is not None and w.request.rid == rid:
                w.request = w.job = None
            if req is None:
                return
            req.inflight -= 1
            if kind == "part":
                req.parts_left -= 1
                req.receivers.add(w.pid)
                self.stats_counts["parts"] += 1
                if req.error is None and req.parts_left == 0:
                    self._push(req, "check")   # every part is in: check the joined blob
            elif kind == "done":
                ended = self._end(req, Completion(req.ref, req.slot, req.slot * self.slot_bytes, msg[2], w.pid,
                                                  req.attempts, time.perf_counter() - req.submitted,
                                                  len(req.ranges or ()) or 1, tuple(sorted(req.receivers))))
            elif req.error is None:
                req.error = error_for_code(msg[2], msg[3])
            if ended is None and req.error is not None and req.inflight == 0:
                ended = self._end(req, req.error)   # nothing of it on a worker: its slot is free to reuse
        if ended is not None:
            self._resolve(*ended)

    # the queue holds jobs: (rank, request seq, job order, (request, job)); the first three are
    # unique, so the heap never compares requests
    def _push(self, req: _Request, job: Any) -> None:
        order = -1 if job == "check" else (job or 0)
        req.queued.add(job)
        heapq.heappush(self._queue, (_RANK[req.priority], req.seq, order, (req, job)))

    def _end(self, req: _Request, result: Any) -> tuple[_Request, Any]:
        """Take `req` out of the pool's books (lock held); the caller resolves its Future."""
        self._requests.pop(req.rid, None)
        self._busy_slots.discard(req.slot)
        if isinstance(result, Completion):
            self.stats_counts["completed"] += 1
            self.stats_counts["bytes"] += result.size
        else:
            self.stats_counts["failed"] += 1
            if req.owned:
                self._free.append(req.slot)
        return req, result

    @staticmethod
    def _resolve(req: _Request, result: Any) -> None:
        if isinstance(result, Completion):
            req.future.set_result(result)
        else:
            req.future.set_exception(result)

    def _message(self, req: _Request, job: Any) -> tuple:
        offset = req.slot * self.slot_bytes
        if job is None:
            return ("fetch", req.rid, req.ref, WIRE_PRIORITY[req.priority], offset)
        if job == "check":
            return ("check", req.rid, req.ref, offset, req.size)
        start, end = req.ranges[job]
        return ("range", req.rid, req.ref, WIRE_PRIORITY[req.priority], offset, start, end)

    def _on_death(self, w: _Worker) -> None:
        if w.dead:
            return
        w.dead = True
        w.proc.join(0.5)
        log.warning("fetch worker %d died (exit code %s)%s", w.pid, w.proc.exitcode,
                    f" while receiving {w.request.ref}" if w.request else "")
        ended = None
        with self._lock:
            self._workers.remove(w)
            req, job = w.request, w.job
            w.request = w.job = None
            if req is not None and self._requests.get(req.rid) is req:
                req.inflight -= 1
                req.failures.append(f"worker {w.pid} died (exit code {w.proc.exitcode})")
                if req.error is None and req.tries.get(job, 0) >= self.max_attempts:
                    req.error = Unavailable(
                        f"{self.model} L{req.ref[0]} E{req.ref[1]} {req.ref[2]}: gave up after "
                        f"{req.tries[job]} attempts ({'; '.join(req.failures)})")
                if req.error is not None:
                    if req.inflight == 0:
                        ended = self._end(req, req.error)
                else:
                    # again from its first byte (the slot may hold a partial write), at its old
                    # place; a check may have decoded into the slot: every part again
                    self.stats_counts["retried"] += 1
                    again = range(len(req.ranges)) if job == "check" else (job,)
                    if job == "check":
                        req.parts_left = len(req.ranges)
                    for j in again:
                        self._push(req, j)
            closing = self._closing
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < 60.0]
            restart = not closing and len(self._restarts) < 10 * self.workers_wanted
            if restart:
                self._restarts.append(now)
                self.stats_counts["worker_restarts"] += 1
        w.conn.close()
        if ended is not None:
            self._resolve(*ended)
        if restart:
            self._spawn()  # its "ready" arrives through the loop; it gets work once ready
        elif not self._workers and not closing:
            self._fail_all(Unavailable("every fetch worker died and they keep dying"))

    def _dispatch(self) -> None:
        sends = []
        with self._lock:
            background = sum(1 for w in self._workers if w.request is not None and w.request.priority == "background")

            def background_full() -> bool:
                # the queue is by rank: a background job first means only background is left
                return self._queue[0][3][0].priority == "background" and background >= self.background_limit
            for w in self._workers:
                if not self._queue:
                    break
                if w.dead or not w.ready or w.request is not None:
                    continue
                while self._queue and not background_full():
                    rank, _, _, (req, job) = heapq.heappop(self._queue)
                    if job not in req.queued or rank != _RANK[req.priority]:
                        continue   # an entry promote() left behind
                    req.queued.discard(job)
                    if self._requests.get(req.rid) is not req or req.error is not None:
                        continue   # ended, or failing once its jobs on the wire return: the rest is dropped
                    if not req.started:
                        if not req.future.set_running_or_notify_cancel():   # cancelled while queued
                            self._requests.pop(req.rid, None)
                            self._busy_slots.discard(req.slot)
                            if req.owned:
                                self._free.append(req.slot)
                            continue
                        req.started = True
                    req.tries[job] = req.tries.get(job, 0) + 1
                    req.inflight += 1
                    w.request, w.job = req, job
                    sends.append((w, self._message(req, job)))
                    if req.priority == "background":
                        background += 1
                    break
                if self._queue and background_full():
                    break
        for w, msg in sends:
            try:
                w.conn.send(msg)
            except OSError:
                self._on_death(w)

    def _fail_all(self, error: StoreError) -> None:
        with self._lock:
            reqs = list(self._requests.values())
            self._requests.clear()
            self._queue.clear()
            for req in reqs:
                self._busy_slots.discard(req.slot)
                if req.owned:
                    self._free.append(req.slot)
        for req in reqs:
            if req.future.done():
                continue
            if not req.started and not req.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            req.future.set_exception(error)

    # ---- shutdown ---------------------------------------------------------------------------
    def _stop_workers(self, grace_s: float) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        end = time.monotonic() + grace_s
        for w in self._workers:
            w.proc.join(max(0.05, end - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
            w.conn.close()
            w.proc.close()
        self._workers = []

    def _release_arena(self) -> None:
        if self._pinned_ptr is not None:
            page_lock.unregister(self._pinned_ptr)
            self._pinned_ptr = None
        self._tensor = None
        self.arena = None
        self._finalizer.detach()
        _unlink_quietly(self._shm)

    def close(self, grace_s: float = 5.0) -> None:
        """Stop the workers, fail what is queued, unpin and unlink the arena. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
        self._wake()
        self._thread.join(10)
        self._fail_all(Unavailable("the fetch pool is closed"))
        self._stop_workers(grace_s)
        self._release_arena()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> "FetchPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FetchPool({self.target!r}, {self.model!r}, workers={self.workers_wanted}, slots={self.slots}, "
                f"slot_bytes={self.slot_bytes})")


__all__ = ["FetchPool", "Completion"]
