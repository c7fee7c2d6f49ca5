"""The expert store's gRPC service: a thin grpc.aio servicer over `ModelStore`.

    store = ModelStore.open("/srv/store", redis_url="redis://127.0.0.1:6379/0")
    asyncio.run(serve(store, ServerConfig(listen="0.0.0.0:50051")))

or, from the shell, `expert-store serve --store /srv/store --listen 0.0.0.0:50051`.

The servicer only translates: protobuf in, `ModelStore` call (in a worker thread: tiers do
blocking disk and Redis I/O), protobuf out, and `StoreError.code` -> `grpc.StatusCode`.
The small pieces of logic it needs are plain classes testable without a server:
`StreamLimiter` (bounded concurrent streams), `check_refs`, `PutAssembler` (PutBlob's
all-or-nothing upload) and `verify_request` (Verify: ModelStore.verify_expert/verify_dense
re-check one blob in every tier and remove a bad copy).

Around the servicer: gRPC health (`grpc.health.v1`, flipped to NOT_SERVING first on
SIGTERM/SIGINT, then a grace period for in-flight streams), server reflection, explicit
message size limits, optional bearer-token auth (`BearerTokenInterceptor`), optional TLS /
mTLS, optional Prometheus metrics. Running one or N such processes is expert_store.workers.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc

from expert_store import format as blob_format
from expert_store import grpc_serving
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as pb_grpc
from expert_store.errors import InvalidArgument, ResourceExhausted, StoreError
from expert_store.manifest import Manifest
from expert_store.grpc_serving import (BearerTokenInterceptor, add_health_and_reflection, add_port, auth_interceptors,
                                       channel_options, check_security, join_host_port, read_token_file,
                                       set_health, stop_on_signals, tune_malloc)
from expert_store.store import ModelStore, ServedStore, VerifyResult
from expert_store.tiers.base import BlobReader
from expert_store.wire import MAX_MESSAGE_BYTES, PUT_KINDS, TOKEN_ENV

log = logging.getLogger("expert_store.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertStore"].full_name  # "adapmoe.v1.ExpertStore"
MIN_CHUNK_BYTES = 256 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
# The largest message either side sends: a manifest carries tokenizer.json verbatim (~2 MB for
# Mixtral); blob chunks are at most 1 MiB.
# A ranged (disk) stream hands this much to the event loop per thread hop; the next batch is
# read while one is sent (see tiers.nvme.NvmeRangeReader for why not one hop per chunk).
STREAM_BATCH_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    max_refs: int = 64  # refs per FetchExperts call
    max_streams: int = 64  # concurrent FetchExperts/FetchDense/PutBlob streams per process
    prefetch_share: float = 0.75  # PREFETCH streams may hold at most this share of max_streams
    chunk_bytes: int = MAX_CHUNK_BYTES
    max_put_bytes: int = 8 << 30
    grace_s: float = 5.0  # graceful shutdown: in-flight streams get this long
    token: str | None = None  # bearer token; None = no auth
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None  # set -> mTLS (client certificates required)
    metrics_port: int | None = None
    reuse_port: bool = False  # True in pre-forked workers (several processes, one port)
    # fault injection (tests, benchmarks): every expert blob FetchExperts serves waits this long
    # first, as if its tier were that much slower
    inject_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
        if self.max_refs < 1 or self.max_streams < 1:
            raise ValueError("max_refs and max_streams must be >= 1")
        check_security(self.token, self.tls_cert, self.tls_key, self.tls_client_ca)
        if not 0.0 <= self.inject_latency_s <= 60.0:
            raise ValueError("inject_latency_s must be in [0, 60]")


# --------------------------------------------------------------------------------------------
# plain logic


class StreamLimiter:
    """At most `limit` concurrent streams; PREFETCH may use only `prefetch_share` of them, so
    speculative loads never starve the token being decoded. Over the limit: refuse at once
    (the caller answers RESOURCE_EXHAUSTED) rather than queue, so clients fail over fast."""

    def __init__(self, limit: int, prefetch_share: float = 0.75):
        self.limit = limit
        self.prefetch_limit = max(1, int(limit * prefetch_share))
        self.active = 0

    def try_acquire(self, prefetch: bool = False) -> bool:
        if self.active >= (self.prefetch_limit if prefetch else self.limit):
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


def chunk_message(index: int, offset: int, total_size: int, data: Any, last: bool) -> pb.BlobChunk:
    """The BlobChunk of one (offset, data, last) piece of blob `index`; `data` any bytes-like
    object (protobuf takes bytes only, so a memoryview piece is copied into bytes first)."""
    return pb.BlobChunk(index=index, offset=offset, total_size=total_size,
                        data=data if isinstance(data, bytes) else bytes(data), last=last)


def _take(reader: BlobReader, n: int) -> list[tuple[int, memoryview, bool]]:
    """Up to n chunks of a reader (fewer at its end)."""
    pieces = []
    for piece in reader:
        pieces.append(piece)
        if piece[2] or len(pieces) >= n:
            break
    return pieces


def _drop_reader(opening: asyncio.Future) -> None:
    """An open-ahead the stream no longer needs: cancel it, or close what it opened."""
    if not opening.done():  # the read runs on in its thread: close what it opens
        opening.add_done_callback(lambda f: None if f.cancelled() or f.exception() else f.result().close())
    elif not opening.cancelled():
        if opening.exception() is None:  # retrieved either way, so asyncio does not log it
            opening.result().close()


def validate_model(model: str) -> str:
    try:
        return blob_format.validate_model_name(model)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def check_refs(store: ServedStore, model: str, refs: Sequence[pb.ExpertRef], max_refs: int) -> None:
    """Validate a whole FetchExperts ref list before streaming anything: count, then every
    ref against the model (ModelStore.check_ref: precision, layer/expert range, packed)."""
    if not refs:
        raise InvalidArgument("FetchExperts needs at least one ref")
    if len(refs) > max_refs:
        raise ResourceExhausted(f"{len(refs)} refs in one call; at most {max_refs}")
    for i, ref in enumerate(refs):
        try:
            store.check_ref(model, ref.layer, ref.expert, ref.precision)
        except StoreError as e:
            raise type(e)(f"ref {i}: {e}") from None


def verify_request(store: ServedStore, request: pb.VerifyRequest) -> VerifyResult:
    """Verify's logic: one blob named by ``request`` (a pb.VerifyRequest: model plus an
    ExpertRef, or dense=true) -> ModelStore.verify_expert / verify_dense (a VerifyResult:
    key, good, dropped, detail). InvalidArgument for a request that names no blob or both,
    and for a bad ref; NotFound for an unknown model or a blob no tier holds."""
    validate_model(request.model)
    has_ref = request.HasField("ref")
    if request.dense == has_ref:
        raise InvalidArgument("Verify names one blob: an expert ref, or dense=true (not both)")
    if request.dense:
        return store.verify_dense(request.model)
    ref = request.ref
    return store.verify_expert(request.model, ref.layer, ref.expert, ref.precision)


class PutAssembler:
    """PutBlob's upload: the header first (checked before any data is accepted), then the
    data. ModelStore.put_file verifies the xxh3 and the content and writes atomically, so
    an upload that breaks off or fails a check leaves nothing visible."""

    def __init__(self, header: pb.PutBlobHeader, max_bytes: int):
        validate_model(header.model)
        if header.kind not in PUT_KINDS:
            raise InvalidArgument(f"unknown PutBlob kind {header.kind!r}; expected one of {', '.join(PUT_KINDS)}")
        if header.total_size > max_bytes:
            raise ResourceExhausted(f"blob of {header.total_size} bytes exceeds the {max_bytes}-byte upload limit")
        if not header.xxh3:
            raise InvalidArgument("PutBlob header needs the xxh3-128 hex digest of the payload")
        self.header = header
        self.total = header.total_size
        # grown as data arrives, never allocated up front from the header: a header alone
        # (announcing gigabytes) must not cost the server that much memory
        self.buffer = bytearray()
        self.received = 0

    def add(self, data: bytes) -> None:
        end = self.received + len(data)
        if end > self.total:
            raise InvalidArgument(f"PutBlob sent more than the {self.total} bytes its header announced")
        self.buffer += data
        self.received = end

    def finish(self) -> bytearray:
        if self.received != self.total:
            raise InvalidArgument(f"PutBlob ended after {self.received} of {self.total} bytes")
        return self.buffer


# --------------------------------------------------------------------------------------------
# metrics (optional)


# When the RPC of the running task began (set by `timed_rpc`, read when its status is counted).
_rpc_started: contextvars.ContextVar[float | None] = contextvars.ContextVar("rpc_started", default=None)

# RPC latency buckets, seconds: a manifest or Stat answers in under a millisecond, a stream of
# large expert blobs takes seconds.
RPC_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                       30.0, 60.0)


def timed_rpc(handler: Callable) -> Callable:
    """Mark the start of an RPC handler, so that its latency is observed with its status."""
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        _rpc_started.set(time.perf_counter())
        return await handler(self, request, context)
    return wrapper


class ServerMetrics:
    """Prometheus metrics; a no-op when prometheus is off. Pre-forked workers write through
    prometheus_client's multiprocess mode and the parent serves the sum.

    Per RPC: a count by method and status and a latency histogram by method and status (from
    the handler's start to its answer or its last chunk written). Per tier: hit and miss
    counters, advanced by the growth of the tiers' own cumulative counts."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._tier_seen: dict[tuple[str, str], int] = {}
        if not enabled:
            return
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("adapmoe_store_requests", "RPCs by method and status", ["method", "status"])
        self.rpc_seconds = Histogram("adapmoe_store_rpc_seconds", "RPC latency by method and status, seconds",
                                     ["method", "status"], buckets=RPC_SECONDS_BUCKETS)
        self.bytes_served = Counter("adapmoe_store_bytes_served", "blob bytes streamed", ["method"])
        self.active_streams = Gauge("adapmoe_store_active_streams", "open streams", multiprocess_mode="livesum")
        self.tier_hits = Counter("adapmoe_store_tier_hits", "reads answered by each tier", ["tier"])
        self.tier_misses = Counter("adapmoe_store_tier_misses", "reads missed by each tier", ["tier"])
        self.verified = Counter("adapmoe_store_verified_blobs", "blobs checked by Verify, by outcome",
                                ["outcome"])

    def request(self, method: str, status: str) -> None:
        """Count one finished RPC; with its latency when `timed_rpc` marked its start."""
        if self.enabled:
            self.requests.labels(method, status).inc()
            started = _rpc_started.get()
            if started is not None:
                self.rpc_seconds.labels(method, status).observe(time.perf_counter() - started)

    def served(self, method: str, nbytes: int) -> None:
        if self.enabled:
            self.bytes_served.labels(method).inc(nbytes)

    def verify(self, good: bool, dropped: bool) -> None:
        if self.enabled:
            self.verified.labels("good" if good else "dropped" if dropped else "bad").inc()

    def streams(self, active: int) -> None:
        if self.enabled:
            self.active_streams.set(active)

    def tiers(self, stats: dict[str, dict]) -> None:
        """Advance the tier counters to this process's cumulative tier counts."""
        if self.enabled:
            for tier, s in stats.items():
                self._advance(self.tier_hits, tier, "hits", int(s.get("hits", 0)))
                self._advance(self.tier_misses, tier, "misses", int(s.get("misses", 0)))

    def _advance(self, counter: Any, tier: str, what: str, total: int) -> None:
        seen = self._tier_seen.get((tier, what), 0)
        if total < seen:  # the tier's counts restarted (store reopened): all of it is new
            seen = 0
        if total > seen:
            counter.labels(tier).inc(total - seen)
        self._tier_seen[(tier, what)] = total


def tier_stats(store: ServedStore) -> dict[str, dict]:
    """{tier name: its counters} (ModelStore.stats)."""
    return store.stats()


# --------------------------------------------------------------------------------------------
# the servicer


class _StreamGone(Exception):
    """A write failed: the client cancelled or the connection dropped mid-stream."""


async def _write(context: grpc.aio.ServicerContext, message: Any) -> None:
    try:
        await context.write(message)
    except Exception as e:  # grpc raises its internal ExecuteBatchError before the cancel lands
        raise _StreamGone(str(e)) from None


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a store/format error is answered with."""
    if isinstance(exc, _Abort):
        return exc.code, exc.details
    if isinstance(exc, StoreError):
        return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN), str(exc)
    if isinstance(exc, blob_format.BlobError):
        return grpc.StatusCode.DATA_LOSS, f"integrity check failed: {exc}"
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (FileNotFoundError, KeyError)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


class ExpertStoreServicer(pb_grpc.ExpertStoreServicer):
    """Protobuf <-> a ServedStore (ModelStore, or colocate's read-through store). Store calls
    run in threads: tiers block on disk and Redis."""

    def __init__(self, store: ServedStore, config: ServerConfig, metrics: ServerMetrics | None = None):
        self.store = store
        self.config = config
        self.metrics = metrics or ServerMetrics(False)
        self.limiter = StreamLimiter(config.max_streams, config.prefetch_share)

    async def _call(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
        if isinstance(exc, _StreamGone) or context.done():  # client gone mid-stream: nobody to tell
            self.metrics.request(method, "CANCELLED")
            raise asyncio.CancelledError()
        code, details = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method, exc_info=exc)
        elif code == grpc.StatusCode.DATA_LOSS:
            log.error("%s: %s", method, details)
        self.metrics.request(method, code.name)
        await context.abort(code, details)

    def _acquire_stream(self, prefetch: bool = False) -> None:
        if not self.limiter.try_acquire(prefetch):
            kind = "prefetch " if prefetch else ""
            raise ResourceExhausted(f"too many concurrent {kind}streams (limit {self.limiter.limit} per process"
                                    f"{f', prefetch {self.limiter.prefetch_limit}' if prefetch else ''})")
        self.metrics.streams(self.limiter.active)

    def _release_stream(self) -> None:
        self.limiter.release()
        self.metrics.streams(self.limiter.active)

    async def _manifest(self, model: str) -> Manifest:
        validate_model(model)
        return await self._call(self.store.manifest, model)

    # ---- RPCs

    @timed_rpc
    async def GetManifest(self, request: pb.GetManifestRequest, context) -> pb.Manifest:
        try:
            m = await self._manifest(request.model)
            reply = m.to_proto()
        except Exception as e:
            await self._fail(context, "GetManifest", e)
        self.metrics.request("GetManifest", "OK")
        return reply

    @timed_rpc
    async def FetchExperts(self, request: pb.FetchExpertsRequest, context) -> None:
        method, acquired, sent = "FetchExperts", False, 0
        reading: asyncio.Future | None = None
        try:
            if len(request.refs) > self.config.max_refs:  # before any store work
                raise ResourceExhausted(f"{len(request.refs)} refs in one call; at most {self.config.max_refs}")
            validate_model(request.model)
            await self._call(check_refs, self.store, request.model, request.refs, self.config.max_refs)
            self._acquire_stream(prefetch=request.priority == pb.PREFETCH)
            acquired = True
            refs = request.refs
            model, chunk_bytes = request.model, self.config.chunk_bytes

            def open_ref(i: int) -> asyncio.Future:
                r = refs[i]
                return asyncio.ensure_future(self._call(
                    self.store.open_expert, model, r.layer, r.expert, r.precision, r.offset, chunk_bytes))

            # open-ahead: the next blob is opened (small ones read whole from disk/Redis; large
            # ones only opened, they stream chunk by chunk) while this one streams
            reading = open_ref(0)
            for index, ref in enumerate(refs):
                if self.config.inject_latency_s:
                    await asyncio.sleep(self.config.inject_latency_s)
                reader = await reading
                reading = open_ref(index + 1) if index + 1 < len(refs) else None
                sent += await self._stream(context, reader, index)
        except Exception as e:
            self.metrics.served(method, sent)
            await self._fail(context, method, e)
        finally:
            if reading is not None:  # the stream ended early: drop the open-ahead
                _drop_reader(reading)
            if acquired:
                self._release_stream()
        self.metrics.served(method, sent)
        self.metrics.request(method, "OK")
        self.metrics.tiers(tier_stats(self.store))

    async def _stream(self, context: grpc.aio.ServicerContext, reader: BlobReader, index: int) -> int:
        """Send every chunk of one BlobReader; returns bytes sent. A reader over bytes already
        in memory is iterated on the event loop; one that reads the disk is read in a thread,
        STREAM_BATCH_BYTES at a time (one thread hop per batch, not per chunk), the next batch
        read while this one is written: at most 2 x STREAM_BATCH_BYTES of the blob in memory."""
        sent = 0
        if not getattr(reader, "reads_disk", False):
            try:
                for offset, data, last in reader:
                    await _write(context, chunk_message(index, offset, reader.total, data, last))
                    sent += len(data)
                return sent
            finally:
                reader.close()
        batch = max(1, STREAM_BATCH_BYTES // self.config.chunk_bytes)
        ahead: asyncio.Future | None = None
        try:
            ahead = asyncio.ensure_future(self._call(_take, reader, batch))
            while True:
                pieces = await ahead
                ahead = None
                if not pieces:
                    return sent
                if not pieces[-1][2]:
                    ahead = asyncio.ensure_future(self._call(_take, reader, batch))
                for offset, data, last in pieces:
                    await _write(context, chunk_message(index, offset, reader.total, data, last))
                    sent += len(data)
                if pieces[-1][2]:
                    return sent
                del pieces, data
        finally:
            if ahead is not None:
                try:
                    await asyncio.shield(ahead)  # let the read in the thread finish before closing
                except Exception:  # noqa: BLE001 - the stream is failing anyway
                    pass
            reader.close()

    @timed_rpc
    async def FetchDense(self, request: pb.FetchDenseRequest, context) -> None:
        method, acquired, sent = "FetchDense", False, 0
        try:
            validate_model(request.model)
            self._acquire_stream()
            acquired = True
            reader = await self._call(self.store.open_dense, request.model, request.offset,
                                      self.config.chunk_bytes)
            sent += await self._stream(context, reader, 0)
        except Exception as e:
            self.metrics.served(method, sent)
            await self._fail(context, method, e)
        finally:
            if acquired:
                self._release_stream()
        self.metrics.served(method, sent)
        self.metrics.request(method, "OK")
        self.metrics.tiers(tier_stats(self.store))

    @timed_rpc
    async def PutBlob(self, request_iterator, context) -> pb.PutBlobResponse:
        method, acquired = "PutBlob", False
        try:
            self._acquire_stream()
            acquired = True
            upload: PutAssembler | None = None
            async for msg in request_iterator:
                part = msg.WhichOneof("part")
                if upload is None:
                    if part != "header":
                        raise InvalidArgument("PutBlob: the first message must be the header")
                    upload = PutAssembler(msg.header, self.config.max_put_bytes)
                elif part == "data":
                    upload.add(msg.data)
                else:
                    raise InvalidArgument("PutBlob: only one header, as the first message")
            if upload is None:
                raise InvalidArgument("PutBlob: empty upload")
            h = upload.header
            key, size = await self._call(
                lambda: self.store.put_file(h.model, h.kind, upload.finish(), h.xxh3,
                                            layer=h.layer, expert=h.expert, precision=h.precision))
        except Exception as e:
            await self._fail(context, method, e)
        finally:
            if acquired:
                self._release_stream()
        self.metrics.request(method, "OK")
        return pb.PutBlobResponse(key=key, size=size)

    @timed_rpc
    async def Stat(self, request: pb.StatRequest, context) -> pb.StatResponse:
        try:
            models = await self._call(self.store.models)
            stats = await self._call(tier_stats, self.store)
        except Exception as e:
            await self._fail(context, "Stat", e)
        self.metrics.tiers(stats)
        self.metrics.request("Stat", "OK")
        return pb.StatResponse(
            models=list(models),
            active_streams=self.limiter.active,
            tiers=[pb.TierStat(name=name, hits=int(s.get("hits", 0)), misses=int(s.get("misses", 0)),
                               bytes_read=int(s.get("bytes_read", 0)), bytes_written=int(s.get("bytes_written", 0)),
                               mean_read_latency_ms=float(s.get("mean_read_latency_ms", 0.0)),
                               errors=int(s.get("errors", 0)))
                   for name, s in stats.items()],
        )

    @timed_rpc
    async def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        method = "Verify"
        try:
            if self.config.inject_latency_s:  # it re-reads one blob: delayed like a served blob
                await asyncio.sleep(self.config.inject_latency_s)
            result = await self._call(verify_request, self.store, request)
        except Exception as e:
            await self._fail(context, method, e)
        if not result.good:
            log.warning("Verify: %s is bad on this replica: %s", result.key, result.detail)
        self.metrics.verify(result.good, result.dropped)
        self.metrics.request(method, "OK")
        self.metrics.tiers(tier_stats(self.store))
        return pb.VerifyResponse(key=result.key, good=result.good, dropped=result.dropped, detail=result.detail)


# --------------------------------------------------------------------------------------------
# auth


def read_token(token_file: str | None) -> str | None:
    """The bearer token from a file (stripped), else $EXPERT_STORE_TOKEN, else None."""
    return read_token_file(token_file, TOKEN_ENV)


# --------------------------------------------------------------------------------------------
# server


def split_host_port(listen: str) -> tuple[str, int]:
    return grpc_serving.split_host_port(listen, example_port=50051)


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    return channel_options(MAX_MESSAGE_BYTES, config.reuse_port)


class StoreServer:
    """One server process: servicer + health + reflection on one port."""

    def __init__(self, store: ModelStore, config: ServerConfig):
        self.store = store
        self.config = config
        self.metrics = ServerMetrics(config.metrics_port is not None)
        self.server = grpc.aio.server(interceptors=auth_interceptors(config.token), options=server_options(config))
        self.servicer = ExpertStoreServicer(store, config, self.metrics)
        pb_grpc.add_ExpertStoreServicer_to_server(self.servicer, self.server)
        self.health = add_health_and_reflection(self.server, SERVICE_NAME)
        self.port = 0
        self._stopping = asyncio.Event()

    async def start(self) -> str:
        """Bind and start; returns the bound "host:port"."""
        host, port = split_host_port(self.config.listen)
        address = join_host_port(host, port)
        self.port = add_port(self.server, address, self.config.tls_cert, self.config.tls_key,
                             self.config.tls_client_ca)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        await self.server.start()
        await set_health(self.health, SERVICE_NAME, serving=True)
        return join_host_port(host, self.port)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_and_stop(self) -> None:
        """Wait for request_stop() (SIGTERM/SIGINT), then: health NOT_SERVING, grace, stop."""
        await self._stopping.wait()
        log.info("shutting down: health NOT_SERVING, %.1fs grace for in-flight streams", self.config.grace_s)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s)


async def serve(store: ModelStore, config: ServerConfig, on_ready: Callable[[str], None] | None = None,
                handle_signals: bool = True) -> None:
    """Run one server process until SIGTERM/SIGINT."""
    tune_malloc()
    srv = StoreServer(store, config)
    address = await srv.start()
    if handle_signals:
        stop_on_signals(srv.request_stop)
    if on_ready is not None:
        on_ready(address)
    await srv.wait_and_stop()


__all__ = [
    "ServerConfig",
    "StreamLimiter",
    "PutAssembler",
    "ExpertStoreServicer",
    "BearerTokenInterceptor",
    "StoreServer",
    "serve",
    "check_refs",
    "read_token",
    "status_for",
    "MAX_MESSAGE_BYTES",
    "SERVICE_NAME",
]
