"""`moe-decoder serve`: the decoder's gRPC service (proto/adapmoe/v1/decoder.proto).

    moe-decoder serve --store grpc://127.0.0.1:50051 --model tiny --listen 127.0.0.1:0 \\
        [--max-active 4] [--max-queue 16] [--metrics-port 9090] [--store-token-file F] [--device cuda]

prints "listening on HOST:PORT" once it serves. A thin grpc.aio servicer over
`decoder.batching.BatchScheduler` (continuous batching, on its own thread):

- Generate (server streaming): one message per produced token (or several tokens when the
  client reads slower than the model decodes), then a final Usage. Sampling parameters,
  max tokens and stop strings as `Engine.generate`; deadlines and cancellation end the
  sequence and free its KV-cache row before the next step.
- Bad requests (prompt over the context, empty prompt, out-of-range parameters):
  INVALID_ARGUMENT. Full (max-active decoding and max-queue waiting): RESOURCE_EXHAUSTED at
  once. Store failures during a step: the store's status (e.g. UNAVAILABLE).
- GetStats: engine.stats() plus the scheduler's counters.
- gRPC health (`grpc.health.v1`, NOT_SERVING first on SIGTERM/SIGINT, then a grace period
  for in-flight streams) and server reflection. The overall status ("") and
  "adapmoe.v1.Decoder" say whether Generate can be served (readiness); the service
  "liveness" stays SERVING while the process works, also while it waits for its model,
  and turns NOT_SERVING only when the batch scheduler died or on shutdown (liveness).
- --wait-for-model [--wait-timeout S]: serve at once with health NOT_SERVING (Generate:
  UNAVAILABLE "model X not in the store yet"), poll the store for the model with capped
  exponential backoff (an unreachable store is waited for the same way), load it when it
  appears, then SERVING. SIGTERM while waiting exits 0; --wait-timeout expiry exits non-zero.
  Without the flag a missing model is a one-line NOT_FOUND error (exit 1) before serving.
- Prometheus metrics on --metrics-port (requests and latency by status, tokens, tokens/s,
  queue depth, active sequences, batch sizes, cache hit rates and bytes per tier).
- One JSON log line per request on stderr (id, status, token counts, latency; never text).
- --http-listen HOST:PORT: the OpenAI HTTP API beside gRPC (decoder/serving/http_api.py), on
  the same scheduler, limits, metrics, token and TLS settings; prints "http on HOST:PORT".
- Security (all optional): a bearer token clients must send (--auth-token-file or
  $MOE_DECODER_TOKEN; constant-time compare, health exempt, never logged), TLS or mTLS for
  clients (--tls-cert/--tls-key[/--tls-client-ca]), and TLS/mTLS to the store
  (--store-tls-ca[/--store-tls-cert/--store-tls-key]) next to the store token.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import math
import random
import re
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2

from decoder.batching import (BatchScheduler, ErrorEvent, FinishEvent, InvalidRequest, SamplingSpec,
                              SchedulerError, TokenEvent)
from expert_store import grpc_serving
from expert_store._proto.adapmoe.v1 import decoder_pb2 as pb
from expert_store._proto.adapmoe.v1 import decoder_pb2_grpc as pb_grpc

log = logging.getLogger("decoder.server")
request_log = logging.getLogger("decoder.requests")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decoder"].full_name  # "adapmoe.v1.Decoder"
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# KV-cache positions per row unless --max-seq-len says otherwise (Mixtral's 32k context would
# take 4 GiB of bf16 KV cache per row)
DEFAULT_MAX_SEQ_LEN = 8192
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
TOKEN_ENV = "MOE_DECODER_TOKEN"  # the token clients of this service must send (--auth-token-file wins)
# gRPC health service name of the liveness check: SERVING while the process works (waiting for
# its model included); NOT_SERVING when the batch scheduler died (restart us) or on shutdown
LIVENESS_SERVICE = "liveness"


@dataclass(frozen=True)
class ServiceConfig:
    listen: str = "127.0.0.1:50052"
    default_max_tokens: int = 128   # for max_tokens = 0
    grace_s: float = 10.0           # on SIGTERM: in-flight streams get this long
    drain_s: float = 1.0            # on SIGTERM: NOT_SERVING but still accepting for this long
    max_prompt_chars: int = 1 << 20 # longer prompt text is refused before tokenizing
    token: str | None = None        # bearer token clients must send (None = no auth)
    tls_cert: bytes | None = None   # PEM; with tls_key: serve TLS
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None  # PEM; set: clients need a certificate it signed (mTLS)
    http_listen: str | None = None  # HOST:PORT of the OpenAI HTTP API (None: gRPC only)
    model: str = ""                 # the model's name (the HTTP API's `model`)
    retry_after_s: int = 1          # HTTP 429's Retry-After

    def __post_init__(self) -> None:
        grpc_serving.check_security(self.token, self.tls_cert, self.tls_key, self.tls_client_ca)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
class DecoderMetrics:
    """Prometheus metrics of one decoder process (own registry; a no-op when disabled).
    Engine figures (cache tiers, bytes, routing) are read from engine.stats() at scrape time."""

    def __init__(self, enabled: bool, scheduler: BatchScheduler | None = None, window_s: float = 10.0) -> None:
        self.enabled = enabled
        self.window_s = window_s
        self._steps: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        if not enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        lat = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.requests = Counter("adapmoe_decoder_requests", "Generate requests by final status", ["status"],
                                registry=r)
        self.latency = Histogram("adapmoe_decoder_request_seconds", "Generate latency by final status",
                                 ["status"], buckets=lat, registry=r)
        self.first_token = Histogram("adapmoe_decoder_time_to_first_token_seconds",
                                     "request received -> first token", buckets=lat, registry=r)
        self.generated = Counter("adapmoe_decoder_generated_tokens", "tokens generated", registry=r)
        self.prompt = Counter("adapmoe_decoder_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.batch = Histogram("adapmoe_decoder_batch_size", "sequences per decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.step = Histogram("adapmoe_decoder_step_seconds", "duration of one decode step",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                              registry=r)
        tps = Gauge("adapmoe_decoder_tokens_per_second", f"decode throughput over the last {window_s:g}s",
                    registry=r)
        tps.set_function(self.tokens_per_s)
        self.model_loaded = Gauge("adapmoe_decoder_model_loaded",
                                  "1 once the model is loaded and Generate is served (0: waiting for it)",
                                  registry=r)
        if scheduler is not None:
            self.bind(scheduler)

    def bind(self, scheduler: BatchScheduler) -> None:
        """The scheduler's gauges and the engine's figures (for a model loaded after the
        metrics endpoint started: --wait-for-model)."""
        if not self.enabled:
            return
        from prometheus_client import Gauge

        r = self.registry
        Gauge("adapmoe_decoder_queue_depth", "sequences waiting for a batch slot",
              registry=r).set_function(lambda: scheduler.queued)
        Gauge("adapmoe_decoder_active_sequences", "sequences being decoded",
              registry=r).set_function(lambda: scheduler.active)
        Gauge("adapmoe_decoder_max_active", "--max-active", registry=r).set(scheduler.max_active)
        Gauge("adapmoe_decoder_max_queue", "--max-queue", registry=r).set(scheduler.max_queue)
        r.register(EngineStatsCollector(scheduler.engine_stats))
        self.model_loaded.set(1)

    def on_step(self, batch: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, batch))
            while self._steps and now - self._steps[0][0] > self.window_s:
                self._steps.popleft()
        if self.enabled:
            self.batch.observe(batch)
            self.step.observe(seconds)

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._steps and now - self._steps[0][0] > self.window_s:
                self._steps.popleft()
            return sum(b for _, b in self._steps) / self.window_s

    def request(self, status: str, seconds: float, prompt_tokens: int = 0, tokens: int = 0,
                first_token_s: float | None = None) -> None:
        if not self.enabled:
            return
        self.requests.labels(status).inc()
        self.latency.labels(status).observe(seconds)
        if tokens:
            self.generated.inc(tokens)
        if prompt_tokens:
            self.prompt.inc(prompt_tokens)
        if first_token_s is not None:
            self.first_token.observe(first_token_s)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (port 0 allowed)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()


class EngineStatsCollector:
    """engine.stats() as gauges, at scrape time: per expert-cache tier hits, misses, hit rate and
    bytes; bytes fetched from the store; experts per token; single-expert ratio; stall time."""

    TIER_FIELDS = ("hits", "misses", "lookups", "loads", "bytes", "hit_rate")

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def describe(self):  # no eager collect at registration
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        try:
            s = self._stats()
        except Exception:  # a scrape must not fail because the engine is closing
            log.debug("engine.stats() failed during a scrape", exc_info=True)
            return
        tiers = s.get("tiers") or {}
        for f in self.TIER_FIELDS:
            name = {"bytes": "adapmoe_decoder_cache_tier_bytes", "hit_rate": "adapmoe_decoder_cache_hit_rate"}.get(
                f, f"adapmoe_decoder_cache_tier_{f}")
            g = GaugeMetricFamily(name, f"expert cache {f.replace('_', ' ')} per tier (engine.stats())",
                                  labels=["tier"])
            any_value = False
            for tier, t in tiers.items():
                v = t.get(f) if isinstance(t, dict) else None
                if isinstance(v, (int, float)) and math.isfinite(v):
                    g.add_metric([str(tier)], float(v))
                    any_value = True
            if any_value:
                yield g
        per_token = (s.get("provider") or {}).get("bytes_per_token")
        if isinstance(per_token, dict):
            g = GaugeMetricFamily("adapmoe_decoder_tier_bytes_per_token", "bytes moved per token per tier",
                                  labels=["tier"])
            for tier, v in per_token.items():
                if isinstance(v, (int, float)):
                    g.add_metric([str(tier)], float(v))
            yield g
        for key, name, doc in (
                ("bytes_fetched", "adapmoe_decoder_store_bytes_fetched", "expert bytes fetched from the store"),
                ("fetches", "adapmoe_decoder_store_fetches", "expert blobs fetched from the store"),
                ("experts_per_token", "adapmoe_decoder_experts_per_token", "experts per token and layer (decode)"),
                ("single_expert_ratio", "adapmoe_decoder_single_expert_ratio", "share of top-1 decisions (decode)"),
                ("stall_s", "adapmoe_decoder_stall_seconds", "time compute waited for experts"),
                ("tokens_per_s", "adapmoe_decoder_engine_decode_tokens_per_second",
                 "engine decode throughput since start"),
                ("generated_tokens", "adapmoe_decoder_engine_generated_tokens", "tokens generated by the engine")):
            v = s.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                yield GaugeMetricFamily(name, doc, value=float(v))


# --------------------------------------------------------------------------------------------
# the servicer
# --------------------------------------------------------------------------------------------
class _Abort(Exception):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)


class DecoderServicer(pb_grpc.DecoderServicer):
    """Protobuf <-> BatchScheduler. Tokenization runs in a worker thread; the model runs on the
    scheduler's step thread; events come back through loop.call_soon_threadsafe."""

    def __init__(self, scheduler: BatchScheduler | None, config: ServiceConfig, metrics: DecoderMetrics,
                 not_ready: Callable[[], str] | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.scheduler: BatchScheduler | None = None
        self.tokenizer = None
        # why Generate is UNAVAILABLE before attach() (--wait-for-model)
        self.not_ready = not_ready or (lambda: "the model is not loaded yet")
        if scheduler is not None:
            self.attach(scheduler)

    def attach(self, scheduler: BatchScheduler) -> None:
        """Serve Generate with this (started) scheduler from now on."""
        self.tokenizer = scheduler.engine.tokenizer
        self.scheduler = scheduler

    def _spec(self, request: pb.GenerateRequest) -> SamplingSpec:
        s = request.sampling
        return SamplingSpec(max_tokens=int(request.max_tokens) or self.config.default_max_tokens,
                            temperature=float(s.temperature), top_p=float(s.top_p),
                            seed=int(s.seed) if s.HasField("seed") else None,
                            stop=tuple(request.stop)).validate()

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        limit = self.scheduler.max_seq_len
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequest("give either prompt or prompt_token_ids, not both")
        if request.prompt_token_ids:
            if len(request.prompt_token_ids) > limit:
                raise InvalidRequest(f"prompt has {len(request.prompt_token_ids)} tokens, longer than the "
                                     f"context of {limit} tokens")
            return self.scheduler.check_prompt(request.prompt_token_ids)
        if not request.prompt:
            raise InvalidRequest("empty prompt")
        # refuse text that cannot fit before spending CPU on tokenizing it (no real token is
        # 64 characters long)
        max_chars = min(self.config.max_prompt_chars, max(1 << 16, 64 * limit))
        if len(request.prompt) > max_chars:
            raise InvalidRequest(f"prompt of {len(request.prompt)} characters cannot fit the context of "
                                 f"{limit} tokens")
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: send prompt_token_ids")
        return self.scheduler.check_prompt(self.tokenizer.encode(request.prompt))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        t0 = time.monotonic()
        rid = _request_id(context)
        status, prompt_n, tokens, finish, first_token_s = "OK", 0, 0, "", None
        seq = None
        try:
            if self.scheduler is None:
                raise _Abort("UNAVAILABLE", self.not_ready())
            spec = self._spec(request)
            if not self.scheduler.alive:
                raise _Abort("UNAVAILABLE", "the decoder is not serving")
            self.scheduler.ensure_room()  # refuse before spending CPU on the prompt
            ids = await asyncio.to_thread(self._prompt_ids, request)
            prompt_n = len(ids)
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e9 else None
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def sink(ev: Any) -> None:
                loop.call_soon_threadsafe(events.put_nowait, ev)

            seq = self.scheduler.submit(ids, spec, sink, deadline=deadline, request_id=rid)
            while True:
                ev = await events.get()
                if isinstance(ev, TokenEvent):
                    text, ids_out = [ev.text], [ev.token_id]
                    last = None
                    while not events.empty():  # the client reads slower than we decode: coalesce
                        nxt = events.get_nowait()
                        if not isinstance(nxt, TokenEvent):
                            last = nxt
                            break
                        text.append(nxt.text)
                        ids_out.append(nxt.token_id)
                    if first_token_s is None:
                        first_token_s = time.monotonic() - t0
                    tokens += len(ids_out)
                    yield pb.GenerateResponse(delta=pb.TokenDelta(text="".join(text), token_ids=ids_out))
                    if last is None:
                        continue
                    ev = last
                if isinstance(ev, FinishEvent):
                    u = ev.usage
                    finish = u.finish_reason
                    yield pb.GenerateResponse(usage=pb.Usage(
                        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                        finish_reason=u.finish_reason, seconds=u.seconds, tokens_per_s=u.tokens_per_s,
                        experts_per_token=u.experts_per_token, single_expert_ratio=u.single_expert_ratio,
                        request_id=rid, queue_seconds=u.queue_s, first_token_seconds=u.first_token_s))
                    return
                if isinstance(ev, ErrorEvent):
                    raise _Abort(ev.code, ev.message)
        except SchedulerError as e:
            status = e.code
            await context.abort(_status(e.code), str(e))
        except _Abort as e:
            status = e.code
            await context.abort(_status(e.code), e.details)
        except GeneratorExit:  # the stream was closed under us (client gone)
            status = "CANCELLED"
            raise
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except Exception as e:
            if type(e).__name__ == "AbortError" or isinstance(e, grpc.aio.AbortError):
                raise
            status = "INTERNAL"
            log.exception("Generate %s failed", rid)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            if seq is not None:
                self.scheduler.cancel(seq)  # no-op when it finished; frees the row otherwise
            seconds = time.monotonic() - t0
            self.metrics.request(status, seconds, prompt_n, tokens, first_token_s)
            request_log.info(json.dumps({
                "ts": round(time.time(), 3), "event": "generate", "id": rid, "status": status,
                "prompt_tokens": prompt_n, "tokens": tokens, "finish": finish,
                "latency_s": round(seconds, 4),
                "first_token_s": None if first_token_s is None else round(first_token_s, 4),
                "max_tokens": int(request.max_tokens), "temperature": float(request.sampling.temperature),
            }, separators=(",", ":")))

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.DecoderStats:
        sch = self.scheduler
        if sch is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.not_ready())
        stats = await asyncio.to_thread(sch.engine_stats)
        return pb.DecoderStats(stats_json=json.dumps(stats, default=str), active=sch.active, queued=sch.queued,
                               max_active=sch.max_active, max_queue=sch.max_queue,
                               scheduler_json=json.dumps({**asdict(sch.stats), "max_seq_len": sch.max_seq_len,
                                                          "kv_cache_bytes": sch.kv_cache_bytes(),
                                                          "rows_in_use": sch.rows_in_use()}))


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID_RE.match(value):
            return value
    return uuid.uuid4().hex[:16]


# --------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------
def split_host_port(listen: str) -> tuple[str, int]:
    return grpc_serving.split_host_port(listen, example_port=50052)


class DecoderServer:
    """Servicer + health + reflection on one port, over a started BatchScheduler, or (scheduler
    None: --wait-for-model) over none yet: NOT_SERVING and Generate UNAVAILABLE until attach()."""

    def __init__(self, scheduler: BatchScheduler | None, config: ServiceConfig,
                 metrics: DecoderMetrics | None = None, not_ready: Callable[[], str] | None = None) -> None:
        self.scheduler = scheduler
        self.config = config
        self.metrics = metrics or DecoderMetrics(False)
        # bearer token: constant-time check, health exempt
        self.server = grpc.aio.server(interceptors=grpc_serving.auth_interceptors(config.token),
                                      options=grpc_serving.channel_options(MAX_MESSAGE_BYTES, reuse_port=False))
        self.servicer = DecoderServicer(scheduler, config, self.metrics, not_ready=not_ready)
        pb_grpc.add_DecoderServicer_to_server(self.servicer, self.server)
        self.health = grpc_serving.add_health_and_reflection(self.server, SERVICE_NAME)
        self.port = 0
        self._stopping = asyncio.Event()
        self.http = None  # the OpenAI HTTP API beside gRPC (--http-listen), on the same scheduler
        self.http_address = ""
        if config.http_listen:
            from decoder.serving.http_api import HttpFrontend, HttpServer, HttpSettings

            front = HttpFrontend(HttpSettings(model=config.model, default_max_tokens=config.default_max_tokens,
                                              max_prompt_chars=config.max_prompt_chars, token=config.token,
                                              retry_after_s=config.retry_after_s),
                                 self.metrics, not_ready=self.servicer.not_ready)
            self.http = HttpServer(front, config.http_listen, grace_s=config.grace_s, tls_cert=config.tls_cert,
                                   tls_key=config.tls_key, tls_client_ca=config.tls_client_ca)

    async def _attach_http(self, scheduler: BatchScheduler) -> None:
        if self.http is not None:
            from decoder.serving.http_api import chat_template_of

            template = await asyncio.to_thread(chat_template_of, scheduler.engine)
            self.http.front.attach(scheduler, template)

    async def start(self) -> str:
        if self.http is not None:  # first: a port that cannot be bound fails before gRPC serves
            self.http_address = await self.http.start()
            if self.scheduler is not None:
                await self._attach_http(self.scheduler)
        host, port = split_host_port(self.config.listen)
        self.port = grpc_serving.add_port(self.server, grpc_serving.join_host_port(host, port), self.config.tls_cert,
                                          self.config.tls_key, self.config.tls_client_ca)
        if self.port == 0:
            raise OSError(f"could not bind {self.config.listen}")
        await self.server.start()
        await grpc_serving.set_health(self.health, SERVICE_NAME, serving=self.scheduler is not None)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        return grpc_serving.join_host_port(host, self.port)

    async def attach(self, scheduler: BatchScheduler) -> None:
        """The model is loaded (--wait-for-model): serve Generate with this started scheduler,
        health SERVING."""
        self.scheduler = scheduler
        self.servicer.attach(scheduler)
        await self._attach_http(scheduler)
        await grpc_serving.set_health(self.health, SERVICE_NAME, serving=True)

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def watch_scheduler(self, interval_s: float = 1.0) -> None:
        """Health NOT_SERVING, the liveness service's too (readiness and liveness fail: the
        kubelet restarts us), if the scheduler's step loop dies."""
        while not self._stopping.is_set():
            if self.scheduler is not None and not self.scheduler.alive:
                log.error("the batch scheduler is not running: health NOT_SERVING")
                await grpc_serving.set_health(self.health, SERVICE_NAME, serving=False)
                await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
                return
            try:
                await asyncio.wait_for(self._stopping.wait(), interval_s)
            except asyncio.TimeoutError:
                pass

    async def wait_and_stop(self) -> None:
        """Wait for request_stop() (SIGTERM/SIGINT), then: health NOT_SERVING; keep accepting
        for drain_s (load balancers and the kubelet see NOT_SERVING and move traffic away);
        stop accepting, a grace period for in-flight streams, stop. A server that never served
        (still waiting for its model) skips the drain: nobody routes to an unready pod."""
        await self._stopping.wait()
        serving = self.scheduler is not None
        log.info("shutting down: health NOT_SERVING, %.1fs drain, %.1fs grace for in-flight requests",
                 self.config.drain_s if serving else 0.0, self.config.grace_s)
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.front.draining = True  # /health 503, new requests 503
        if serving and self.config.drain_s > 0:
            await asyncio.sleep(self.config.drain_s)
        await asyncio.gather(self.server.stop(self.config.grace_s),
                             self.http.stop() if self.http is not None else asyncio.sleep(0))


async def serve(scheduler: BatchScheduler, config: ServiceConfig, metrics: DecoderMetrics | None = None,
                on_ready: Callable[[str], None] | None = None, handle_signals: bool = True,
                on_http_ready: Callable[[str], None] | None = None) -> None:
    srv = DecoderServer(scheduler, config, metrics)
    address = await srv.start()
    if handle_signals:
        grpc_serving.stop_on_signals(srv.request_stop)
    if on_http_ready is not None and srv.http_address:
        on_http_ready(srv.http_address)
    if on_ready is not None:
        on_ready(address)
    watchdog = asyncio.create_task(srv.watch_scheduler())
    try:
        await srv.wait_and_stop()
    finally:
        watchdog.cancel()


async def serve_when_loaded(load: "Future[BatchScheduler]", config: ServiceConfig,
                            metrics: DecoderMetrics | None = None, on_ready: Callable[[str], None] | None = None,
                            not_ready: Callable[[], str] | None = None, handle_signals: bool = True,
                            on_stop: Callable[[], None] | None = None,
                            on_http_ready: Callable[[str], None] | None = None) -> bool:
    """--wait-for-model: serve at once (health NOT_SERVING, Generate UNAVAILABLE with
    `not_ready()`), attach the started scheduler `load` resolves to (health SERVING), serve
    until SIGTERM/SIGINT. `on_stop` runs when a stop is requested (cancel the wait). A failed
    `load` stops the server and raises its error. Returns whether the model was served."""
    srv = DecoderServer(None, config, metrics, not_ready=not_ready)
    address = await srv.start()

    def request_stop() -> None:
        srv.request_stop()
        if on_stop is not None:
            on_stop()

    if handle_signals:
        grpc_serving.stop_on_signals(request_stop)
    if on_http_ready is not None and srv.http_address:
        on_http_ready(srv.http_address)
    if on_ready is not None:
        on_ready(address)
    loaded = asyncio.wrap_future(load)
    stop = asyncio.create_task(srv._stopping.wait())
    watchdog = None
    try:
        await asyncio.wait({loaded, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not srv.stopping:
            error = loaded.exception()
            if error is not None:
                await srv.health.enter_graceful_shutdown()
                await srv.server.stop(0)
                if srv.http is not None:
                    await srv.http.stop()
                raise error
            await srv.attach(loaded.result())
            if metrics is not None:
                metrics.bind(loaded.result())
            log.info("serving: health SERVING")
            watchdog = asyncio.create_task(srv.watch_scheduler())
        await srv.wait_and_stop()
        return srv.scheduler is not None
    finally:
        stop.cancel()
        if watchdog is not None:
            watchdog.cancel()
        if not loaded.done():
            loaded.cancel()  # the loading thread sees its future cancelled and cleans up
        elif not loaded.cancelled():
            loaded.exception()  # retrieved: a wait cut short by the stop is no error


# --------------------------------------------------------------------------------------------
# waiting for the model (--wait-for-model)
# --------------------------------------------------------------------------------------------
class ModelWaitTimeout(TimeoutError):
    """--wait-timeout passed before the model could be loaded."""


class WaitCancelled(Exception):
    """The wait was cancelled (SIGTERM)."""


# store errors that mean "not yet": the model is not packed, the store is not up (or busy)
_WAITABLE = {"NOT_FOUND": "no-model", "UNAVAILABLE": "no-store", "RESOURCE_EXHAUSTED": "no-store",
             "DEADLINE_EXCEEDED": "no-store"}


class ModelWaiter:
    """Waits until `model` is in the store, then loads it (plain logic, no server).

    `run(load)` opens a client with `open_client()` (again and again while that fails: a store
    directory that does not exist yet, no ready endpoint behind a k8s:// target), asks for the
    model's manifest until the store answers with it, then returns `load(client)`. NOT_FOUND
    ("not in the store yet") and UNAVAILABLE ("store unreachable") are retried after a capped
    exponential backoff (first_delay_s, doubling up to max_delay_s, with jitter), also when
    `load` raises them; any other error is raised at once. One log line each time the reason
    for waiting changes (and a reminder every reminder_s), not one per attempt: the store
    client's own per-attempt warnings are muted while waiting. `cancel()` (any thread) ends
    the wait with WaitCancelled; timeout_s with ModelWaitTimeout."""

    QUIET_LOGGERS = ("expert_store.client", "expert_store.discovery")

    def __init__(self, model: str, store: str, open_client: Callable[[], Any], *, timeout_s: float | None = None,
                 first_delay_s: float = 0.5, max_delay_s: float = 5.0, reminder_s: float = 60.0,
                 logger: logging.Logger | None = None) -> None:
        self.model, self.store = model, store
        self.open_client = open_client
        self.timeout_s = timeout_s
        self.first_delay_s, self.max_delay_s, self.reminder_s = first_delay_s, max_delay_s, reminder_s
        self.log = logger or log
        self.client: Any = None
        self.state = "waiting"      # waiting | no-store | no-model | loading | loaded
        self.last_error = ""
        self.attempts = 0
        self._stop = threading.Event()

    def cancel(self) -> None:
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def message(self) -> str:
        """Why the model is not served yet (Generate's UNAVAILABLE details)."""
        if self.state == "no-store":
            return (f"model {self.model!r} not in the store yet: store {self.store} is unreachable "
                    f"({self.last_error}); waiting for it")
        if self.state == "loading":
            return f"model {self.model!r} is loading from store {self.store}"
        if self.state == "loaded":
            return f"model {self.model!r} is loaded"
        return f"model {self.model!r} not in the store yet (store {self.store}); waiting for it"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def run(self, load: Callable[[Any], Any]) -> Any:
        from expert_store.errors import StoreError

        t0 = time.monotonic()
        deadline = None if self.timeout_s is None else t0 + self.timeout_s
        quiet = {name: logging.getLogger(name).level for name in self.QUIET_LOGGERS}
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)
        delay, logged_state, next_reminder = self.first_delay_s, None, t0 + self.reminder_s
        try:
            while True:
                if self._stop.is_set():
                    raise WaitCancelled(f"stopped while waiting for model {self.model!r}")
                self.attempts += 1
                try:
                    if self.client is None:
                        self.client = self.open_client()
                    self.client.manifest(self.model)
                    self.state = "loading"
                    for name, level in quiet.items():  # from here on, store trouble is news
                        logging.getLogger(name).setLevel(level)
                    quiet = {}
                    if logged_state is not None:
                        self.log.info("model %s is in store %s after %.1fs (%d attempts): loading it", self.model,
                                      self.store, time.monotonic() - t0, self.attempts)
                    result = load(self.client)
                    self.state = "loaded"
                    return result
                except StoreError as e:
                    state = _WAITABLE.get(e.code)
                    if state is None:
                        raise
                    self.state = state
                    self.last_error = (str(e).strip().splitlines() or [e.code])[0]
                now = time.monotonic()
                if self.state != logged_state:
                    retry = (f"retrying in {delay:.1f}s, backing off to every {self.max_delay_s:g}s"
                             + ("" if deadline is None else f", for at most {self.timeout_s:g}s in all"))
                    if self.state == "no-model":
                        self.log.info("model %s is not in the store yet; waiting for it (store %s, %s)",
                                      self.model, self.store, retry)
                    else:
                        self.log.warning("store %s is unreachable (%s); waiting for it (model %s, %s)",
                                         self.store, self.last_error, self.model, retry)
                    logged_state, next_reminder = self.state, now + self.reminder_s
                elif now >= next_reminder:
                    self.log.info("still waiting for model %s: %.0fs, %d attempts (last: %s)", self.model,
                                  now - t0, self.attempts, self.last_error)
                    next_reminder = now + self.reminder_s
                if deadline is not None and now >= deadline:
                    raise ModelWaitTimeout(
                        f"model {self.model!r} did not appear in store {self.store} within {self.timeout_s:g}s "
                        f"({self.attempts} attempts; last: {self.last_error})")
                sleep = delay * random.uniform(0.8, 1.0)
                if deadline is not None:
                    sleep = min(sleep, max(0.0, deadline - now))
                if self._stop.wait(sleep):
                    raise WaitCancelled(f"stopped while waiting for model {self.model!r}")
                delay = min(self.max_delay_s, delay * 2)
        finally:
            for name, level in quiet.items():
                logging.getLogger(name).setLevel(level)


class BackgroundLoad:
    """fn() on a daemon thread (a wait that SIGTERM cuts short must not hold up the exit); its
    result or error lands in `.future`. `abandon()` hands back a result that is already there
    (the caller cleans it up); a result that arrives later goes to cleanup(result) instead."""

    def __init__(self, fn: Callable[[], Any], cleanup: Callable[[Any], None]) -> None:
        self.future: Future[Any] = Future()
        self._cleanup = cleanup
        self._lock = threading.Lock()
        self._abandoned = False
        self.thread = threading.Thread(target=self._run, args=(fn,), name="load-model", daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            result = fn()
        except BaseException as e:  # handed to the event loop
            with self._lock:
                if not self._abandoned and not self.future.cancelled():
                    try:
                        self.future.set_exception(e)
                    except Exception:  # cancelled meanwhile
                        pass
            return
        with self._lock:
            if not self._abandoned and not self.future.cancelled():
                try:
                    self.future.set_result(result)
                    return
                except Exception:  # cancelled meanwhile
                    pass
        self._cleanup(result)

    def abandon(self) -> Any:
        with self._lock:
            self._abandoned = True
            f = self.future
            if f.done() and not f.cancelled() and f.exception() is None:
                return f.result()
        return None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from decoder.cli import (BUDGET_HELP, GATING_HELP, _Parser, add_adapmoe_options, parse_size,
                             refuse_ambiguous_flags)

    p = _Parser(prog="moe-decoder serve", description="Serve Generate over gRPC (adapmoe.v1.Decoder).")
    p.add_argument("--store", required=True, help="store address (host:port[,...], grpc://, dns:///, k8s://) "
                                                  "or a store directory (in-process)")
    p.add_argument("--model", required=True, help="model name in the store")
    p.add_argument("--listen", default="127.0.0.1:50052", help="HOST:PORT to serve on (port 0: any free port)")
    p.add_argument("--http-listen", default=None, metavar="HOST:PORT",
                   help="also serve the OpenAI HTTP API (/v1/models, /v1/completions, /v1/chat/completions, "
                        "/health, /metrics) here, on the same scheduler and limits (port 0: any free port)")
    p.add_argument("--max-active", type=int, default=4, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=16, help="sequences that may wait for a row; "
                                                              "beyond: RESOURCE_EXHAUSTED")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="positions per KV-cache row (prompt + generated; longer prompts are "
                        f"INVALID_ARGUMENT); default: the model's context, at most {DEFAULT_MAX_SEQ_LEN}")
    p.add_argument("--default-max-tokens", type=int, default=128, help="for requests with max_tokens 0")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default=None, help="metrics bind address (default: the --listen host)")
    p.add_argument("--store-token-file", default=None, metavar="F",
                   help="bearer token sent to the store (default: $EXPERT_STORE_TOKEN, if set)")
    p.add_argument("--store-deadline", type=float, default=30.0, help="seconds per store RPC attempt")
    p.add_argument("--store-tls-ca", default=None, metavar="F", help="CA (PEM) of the store's TLS certificate")
    p.add_argument("--store-tls-cert", default=None, metavar="F", help="client certificate (PEM) for store mTLS")
    p.add_argument("--store-tls-key", default=None, metavar="F", help="client key (PEM) for store mTLS")
    p.add_argument("--store-tls-server-name", default=None, help="expected name in the store's certificate")
    p.add_argument("--auth-token-file", default=None, metavar="F",
                   help=f"require this bearer token from clients (default: ${TOKEN_ENV}, if set)")
    p.add_argument("--tls-cert", default=None, metavar="F", help="serve TLS with this certificate chain (PEM)")
    p.add_argument("--tls-key", default=None, metavar="F", help="private key (PEM) of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, metavar="F",
                   help="require client certificates signed by this CA (mTLS)")
    refuse_ambiguous_flags(p)  # --token-file, --tls-ca: which of the two is meant?
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "int8", "int4"], help="expert precision")
    p.add_argument("--gating", default="topk", help=GATING_HELP)
    p.add_argument("--budget", type=float, default=None, help=BUDGET_HELP)
    p.add_argument("--gpu-cache-bytes", type=parse_size, default=None, help="GPU expert cache budget")
    p.add_argument("--host-cache-bytes", type=parse_size, default=None, help="host (pinned) expert cache budget")
    add_adapmoe_options(p)  # --cache-plan, --lookahead, --loss-bound, --miss-precision, --miss-threshold
    p.add_argument("--no-prefetch", action="store_true", help="disable the cross-layer prefetcher")
    p.add_argument("--wait-for-model", action="store_true",
                   help="serve at once (health NOT_SERVING, Generate UNAVAILABLE) and wait for the model to "
                        "appear in the store (and for the store to be reachable), then load it and serve; "
                        "without: a model not in the store is an error")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="S",
                   help="with --wait-for-model: give up (exit 1) after S seconds (default: wait forever)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--drain", type=float, default=1.0,
                   help="seconds between NOT_SERVING and refusing new requests on SIGTERM")
    p.add_argument("--log-level", default="INFO")
    from expert_store.cli import show_defaults

    return show_defaults(p)  # --help lists the defaults


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(message)s"))
    request_log.addHandler(h)
    request_log.propagate = False
    request_log.setLevel(logging.INFO)


def _read_auth_token(path: str | None) -> str | None:
    """The token this service requires: from a file (stripped), else $MOE_DECODER_TOKEN, else None."""
    return grpc_serving.read_token_file(path, TOKEN_ENV)


def _read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"--{what} {path} is empty")
    return data


def main(argv: list[str] | None = None) -> int:
    import torch

    from decoder.cli import engine_options, quiet_store_retries, read_store_token, refuse_checkpoint_dir
    from decoder.engine import Engine
    from expert_store.client import StoreClient

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.wait_timeout is not None:
        if not args.wait_for_model:
            raise ValueError("--wait-timeout goes with --wait-for-model")
        if not args.wait_timeout > 0:
            raise ValueError("--wait-timeout must be > 0")
    _setup_logging(args.log_level)
    for name in ("max_active", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    refuse_checkpoint_dir(args.store)
    listen_host, _ = split_host_port(args.listen)
    if args.http_listen is not None:
        grpc_serving.split_host_port(args.http_listen, example_port=8000)  # a bad address fails before loading
    options = engine_options(args)  # bad flag combinations fail before anything starts
    dtype = getattr(torch, args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32"))
    token = read_store_token(args.store_token_file)
    auth_token = _read_auth_token(args.auth_token_file)
    tls = {name: _read_pem(getattr(args, name), name.replace("_", "-"))
           for name in ("tls_cert", "tls_key", "tls_client_ca")}
    config = ServiceConfig(listen=args.listen, default_max_tokens=args.default_max_tokens,
                           grace_s=args.grace, drain_s=args.drain, token=auth_token, http_listen=args.http_listen,
                           model=args.model, **tls)

    def open_client() -> StoreClient:
        return StoreClient.open(args.store, token=token, deadline_s=args.store_deadline,
                                tls_ca=args.store_tls_ca, tls_cert=args.store_tls_cert,
                                tls_key=args.store_tls_key, tls_server_name=args.store_tls_server_name)

    def load_engine(client: StoreClient) -> Engine:
        return Engine.from_store(client, args.model, device=args.device, dtype=dtype, gating=args.gating,
                                 gpu_cache_bytes=args.gpu_cache_bytes, host_cache_bytes=args.host_cache_bytes,
                                 precision=args.precision, budget=args.budget,
                                 prefetch=False if args.no_prefetch else None, **options)

    def start_scheduler(engine: Engine, metrics: DecoderMetrics) -> BatchScheduler:
        ctx = engine.config.max_position_embeddings
        max_seq_len = args.max_seq_len or min(ctx, DEFAULT_MAX_SEQ_LEN)
        scheduler = BatchScheduler(engine, max_active=args.max_active, max_queue=args.max_queue,
                                   max_seq_len=max_seq_len, on_step=metrics.on_step)
        scheduler.start()
        log.info("model %s: %d KV-cache rows x %d positions (%.1f MiB), queue %d, device %s",
                 args.model, args.max_active, max_seq_len, scheduler.kv_cache_bytes() / 2 ** 20,
                 args.max_queue, args.device)
        return scheduler

    def serve_metrics(metrics: DecoderMetrics) -> None:
        if args.metrics_port is not None:
            mport = metrics.serve_http(args.metrics_host or listen_host, args.metrics_port)
            print(f"metrics on {grpc_serving.join_host_port(args.metrics_host or listen_host, mport)}", flush=True)

    def on_ready(addr: str) -> None:
        print(f"listening on {addr}", flush=True)

    def on_http_ready(addr: str) -> None:
        print(f"http on {addr}", flush=True)

    metrics_on = args.metrics_port is not None or args.http_listen is not None  # /metrics on the HTTP port too

    if args.wait_for_model:
        return _serve_waiting(args, config, open_client, load_engine, start_scheduler, serve_metrics, on_ready,
                              on_http_ready, metrics_on)

    client = open_client()
    try:
        # a store that is down: one error line, not one per retry (unless debugging)
        with quiet_store_retries(enabled=args.log_level.upper() != "DEBUG"):
            engine = load_engine(client)
        with engine:
            metrics = DecoderMetrics(metrics_on)
            scheduler = start_scheduler(engine, metrics)
            try:
                metrics.bind(scheduler)
                serve_metrics(metrics)
                asyncio.run(serve(scheduler, config, metrics, on_ready=on_ready, on_http_ready=on_http_ready))
            finally:
                scheduler.close()
                metrics.close()
    finally:
        client.close()
    return 0


def _serve_waiting(args: argparse.Namespace, config: ServiceConfig, open_client: Callable[[], Any],
                   load_engine: Callable[[Any], Any], start_scheduler: Callable[[Any, DecoderMetrics], Any],
                   serve_metrics: Callable[[DecoderMetrics], None], on_ready: Callable[[str], None],
                   on_http_ready: Callable[[str], None] | None = None, metrics_on: bool = False) -> int:
    """--wait-for-model: the server (and metrics) first, the model when the store has it."""
    metrics = DecoderMetrics(metrics_on)
    waiter = ModelWaiter(args.model, args.store, open_client, timeout_s=args.wait_timeout)

    def load() -> BatchScheduler:
        engine = waiter.run(load_engine)
        try:
            if waiter.cancelled:
                raise WaitCancelled("stopped while loading")
            return start_scheduler(engine, metrics)
        except BaseException:
            engine.close()
            raise

    def close_loaded(scheduler: BatchScheduler | None) -> None:
        if scheduler is not None:
            scheduler.close()
            scheduler.engine.close()

    background = BackgroundLoad(load, close_loaded)
    try:
        serve_metrics(metrics)
        try:
            asyncio.run(serve_when_loaded(background.future, config, metrics, on_ready=on_ready,
                                          not_ready=waiter.message, on_stop=waiter.cancel,
                                          on_http_ready=on_http_ready))
        except WaitCancelled:
            pass
    finally:
        waiter.cancel()
        close_loaded(background.abandon())
        waiter.close()
        background.thread.join(2.0)  # a store RPC in flight ends with the closed client
        metrics.close()
    return 0


__all__ = ["DecoderServicer", "DecoderServer", "DecoderMetrics", "EngineStatsCollector", "ServiceConfig",
           "serve", "serve_when_loaded", "ModelWaiter", "ModelWaitTimeout", "WaitCancelled", "BackgroundLoad",
           "main", "build_parser", "SERVICE_NAME", "LIVENESS_SERVICE"]
