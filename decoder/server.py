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
  for in-flight streams) and server reflection.
- Prometheus metrics on --metrics-port (requests and latency by status, tokens, tokens/s,
  queue depth, active sequences, batch sizes, cache hit rates and bytes per tier).
- One JSON log line per request on stderr (id, status, token counts, latency; never text).
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
import re
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Callable

import grpc

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
        if scheduler is not None:
            Gauge("adapmoe_decoder_queue_depth", "sequences waiting for a batch slot",
                  registry=r).set_function(lambda: scheduler.queued)
            Gauge("adapmoe_decoder_active_sequences", "sequences being decoded",
                  registry=r).set_function(lambda: scheduler.active)
            Gauge("adapmoe_decoder_max_active", "--max-active", registry=r).set(scheduler.max_active)
            Gauge("adapmoe_decoder_max_queue", "--max-queue", registry=r).set(scheduler.max_queue)
            r.register(EngineStatsCollector(scheduler.engine_stats))

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

    def __init__(self, scheduler: BatchScheduler, config: ServiceConfig, metrics: DecoderMetrics) -> None:
        self.scheduler = scheduler
        self.config = config
        self.metrics = metrics
        self.tokenizer = scheduler.engine.tokenizer

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
        stats = await asyncio.to_thread(self.scheduler.engine_stats)
        sch = self.scheduler
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
    """Servicer + health + reflection on one port, over a started BatchScheduler."""

    def __init__(self, scheduler: BatchScheduler, config: ServiceConfig, metrics: DecoderMetrics | None = None
                 ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.metrics = metrics or DecoderMetrics(False)
        # bearer token: constant-time check, health exempt
        self.server = grpc.aio.server(interceptors=grpc_serving.auth_interceptors(config.token),
                                      options=grpc_serving.channel_options(MAX_MESSAGE_BYTES, reuse_port=False))
        self.servicer = DecoderServicer(scheduler, config, self.metrics)
        pb_grpc.add_DecoderServicer_to_server(self.servicer, self.server)
        self.health = grpc_serving.add_health_and_reflection(self.server, SERVICE_NAME)
        self.port = 0
        self._stopping = asyncio.Event()

    async def start(self) -> str:
        host, port = split_host_port(self.config.listen)
        self.port = grpc_serving.add_port(self.server, grpc_serving.join_host_port(host, port), self.config.tls_cert,
                                          self.config.tls_key, self.config.tls_client_ca)
        if self.port == 0:
            raise OSError(f"could not bind {self.config.listen}")
        await self.server.start()
        await grpc_serving.set_health(self.health, SERVICE_NAME, serving=True)
        return grpc_serving.join_host_port(host, self.port)

    def request_stop(self) -> None:
        self._stopping.set()

    async def watch_scheduler(self, interval_s: float = 1.0) -> None:
        """Health NOT_SERVING (readiness and liveness fail: the kubelet restarts us) if the
        scheduler's step loop dies."""
        while not self._stopping.is_set():
            if not self.scheduler.alive:
                log.error("the batch scheduler is not running: health NOT_SERVING")
                await grpc_serving.set_health(self.health, SERVICE_NAME, serving=False)
                return
            try:
                await asyncio.wait_for(self._stopping.wait(), interval_s)
            except asyncio.TimeoutError:
                pass

    async def wait_and_stop(self) -> None:
        """Wait for request_stop() (SIGTERM/SIGINT), then: health NOT_SERVING; keep accepting
        for drain_s (load balancers and the kubelet see NOT_SERVING and move traffic away);
        stop accepting, a grace period for in-flight streams, stop."""
        await self._stopping.wait()
        log.info("shutting down: health NOT_SERVING, %.1fs drain, %.1fs grace for in-flight requests",
                 self.config.drain_s, self.config.grace_s)
        await self.health.enter_graceful_shutdown()
        if self.config.drain_s > 0:
            await asyncio.sleep(self.config.drain_s)
        await self.server.stop(self.config.grace_s)


async def serve(scheduler: BatchScheduler, config: ServiceConfig, metrics: DecoderMetrics | None = None,
                on_ready: Callable[[str], None] | None = None, handle_signals: bool = True) -> None:
    srv = DecoderServer(scheduler, config, metrics)
    address = await srv.start()
    if handle_signals:
        grpc_serving.stop_on_signals(srv.request_stop)
    if on_ready is not None:
        on_ready(address)
    watchdog = asyncio.create_task(srv.watch_scheduler())
    try:
        await srv.wait_and_stop()
    finally:
        watchdog.cancel()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from decoder.cli import BUDGET_HELP, GATING_HELP, _Parser, add_adapmoe_options, parse_size

    p = _Parser(prog="moe-decoder serve", description="Serve Generate over gRPC (adapmoe.v1.Decoder).")
    p.add_argument("--store", required=True, help="store address (host:port[,...], grpc://, dns:///, k8s://) "
                                                  "or a store directory (in-process)")
    p.add_argument("--model", required=True, help="model name in the store")
    p.add_argument("--listen", default="127.0.0.1:50052", help="HOST:PORT to serve on (port 0: any free port)")
    p.add_argument("--max-active", type=int, default=4, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=16, help="sequences that may wait for a row; "
                                                              "beyond: RESOURCE_EXHAUSTED")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="positions per KV-cache row (prompt + generated; longer prompts are "
                        f"INVALID_ARGUMENT); default: the model's context, at most {DEFAULT_MAX_SEQ_LEN}")
    p.add_argument("--default-max-tokens", type=int, default=128, help="for requests with max_tokens 0")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default=None, help="metrics bind address (default: the --listen host)")
    p.add_argument("--token-file", "--store-token-file", dest="token_file", default=None,
                   help="bearer token for the store (default: $EXPERT_STORE_TOKEN)")
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
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--drain", type=float, default=1.0,
                   help="seconds between NOT_SERVING and refusing new requests on SIGTERM")
    p.add_argument("--log-level", default="INFO")
    return p


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

    from decoder.cli import engine_options
    from decoder.engine import Engine
    from expert_store.client import StoreClient
    from expert_store.server import read_token

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.log_level)
    for name in ("max_active", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    listen_host, _ = split_host_port(args.listen)
    options = engine_options(args)  # bad flag combinations fail before anything starts
    dtype = getattr(torch, args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32"))
    token = read_token(args.token_file)
    auth_token = _read_auth_token(args.auth_token_file)
    tls = {name: _read_pem(getattr(args, name), name.replace("_", "-"))
           for name in ("tls_cert", "tls_key", "tls_client_ca")}
    client = StoreClient.open(args.store, token=token, deadline_s=args.store_deadline, tls_ca=args.store_tls_ca,
                              tls_cert=args.store_tls_cert, tls_key=args.store_tls_key,
                              tls_server_name=args.store_tls_server_name)
    try:
        engine = Engine.from_store(client, args.model, device=args.device, dtype=dtype, gating=args.gating,
                                   gpu_cache_bytes=args.gpu_cache_bytes, host_cache_bytes=args.host_cache_bytes,
                                   precision=args.precision, budget=args.budget,
                                   prefetch=False if args.no_prefetch else None, **options)
        with engine:
            metrics_box: list[DecoderMetrics] = []
            ctx = engine.config.max_position_embeddings
            max_seq_len = args.max_seq_len or min(ctx, DEFAULT_MAX_SEQ_LEN)
            scheduler = BatchScheduler(engine, max_active=args.max_active, max_queue=args.max_queue,
                                       max_seq_len=max_seq_len,
                                       on_step=lambda b, s: metrics_box[0].on_step(b, s) if metrics_box else None)
            metrics = DecoderMetrics(args.metrics_port is not None, scheduler)
            metrics_box.append(metrics)
            if args.metrics_port is not None:
                mport = metrics.serve_http(args.metrics_host or listen_host, args.metrics_port)
                print(f"metrics on {grpc_serving.join_host_port(args.metrics_host or listen_host, mport)}", flush=True)
            config = ServiceConfig(listen=args.listen, default_max_tokens=args.default_max_tokens,
                                   grace_s=args.grace, drain_s=args.drain, token=auth_token, **tls)
            scheduler.start()
            log.info("model %s: %d KV-cache rows x %d positions (%.1f MiB), queue %d, device %s",
                     args.model, args.max_active, max_seq_len, scheduler.kv_cache_bytes() / 2 ** 20,
                     args.max_queue, args.device)
            try:
                asyncio.run(serve(scheduler, config, metrics,
                                  on_ready=lambda addr: print(f"listening on {addr}", flush=True)))
            finally:
                scheduler.close()
                metrics.close()
    finally:
        client.close()
    return 0


__all__ = ["DecoderServicer", "DecoderServer", "DecoderMetrics", "EngineStatsCollector", "ServiceConfig",
           "serve", "main", "build_parser", "SERVICE_NAME"]
