"""One `moe-decoder serve` process: load the engine from the store, start the batching
scheduler and the metrics endpoint, serve (`service`) until SIGTERM/SIGINT, then close it all.

With --wait-for-model the service starts at once and the model is loaded on a background
thread when the store has it (`waiter`); without, a model that cannot be loaded is an error
before anything serves. Ready lines on stdout, which scripts and tests wait for:
"listening on HOST:PORT" (gRPC), "http on HOST:PORT" (--http-listen), "metrics on HOST:PORT"
(--metrics-port). The CLI (`decoder.cli`) parses the flags into a `ServiceConfig`, a
`ProcessSettings` and the two store/engine callables `run` takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from decoder.batching import BatchScheduler
from decoder.serving.config import ServiceConfig
from decoder.serving.metrics import DecoderMetrics
from decoder.serving.service import serve, serve_when_loaded, split_host_port
from decoder.serving.waiter import BackgroundLoad, ModelWaiter, WaitCancelled
from expert_store import grpc_serving

log = logging.getLogger("decoder.service")

# KV-cache positions per row unless --max-seq-len says otherwise (Mixtral's 32k context would
# take 4 GiB of bf16 KV cache per row)
DEFAULT_MAX_SEQ_LEN = 8192


@dataclass(frozen=True)
class ProcessSettings:
    """What a serving process needs beyond the service's ServiceConfig: the model and store (for
    messages), the scheduler's limits, the metrics endpoint and whether to wait for the model."""

    model: str
    store: str                          # the store target, as given (for messages)
    device: str = "cpu"
    max_active: int = 4                 # KV-cache rows
    max_queue: int = 16
    max_seq_len: int | None = None      # None: the model's context, at most DEFAULT_MAX_SEQ_LEN
    metrics_port: int | None = None     # the --metrics-port endpoint (None: none)
    metrics_host: str | None = None     # None: the gRPC listen host
    wait_for_model: bool = False
    wait_timeout_s: float | None = None
    # with wait_for_model: also wait for the model's calibration profile (adaptive / cost-aware
    # gating read their sensitivities and budget from it)
    needs_profile: bool = False
    # around the first load when not waiting: one error line for a store that is down, not one
    # per retry (the CLI's quiet_store_retries)
    quiet_first_load: Callable[[], ContextManager[Any]] = contextlib.nullcontext


def run(config: ServiceConfig, settings: ProcessSettings, open_client: Callable[[], Any],
        load_engine: Callable[[Any], Any]) -> int:
    """Serve until stopped; `open_client()` opens a StoreClient, `load_engine(client)` builds the
    Engine on it. Returns the exit status (0)."""
    listen_host, _ = split_host_port(config.listen)

    def start_scheduler(engine: Any, metrics: DecoderMetrics) -> BatchScheduler:
        ctx = engine.config.max_position_embeddings
        max_seq_len = settings.max_seq_len or min(ctx, DEFAULT_MAX_SEQ_LEN)
        scheduler = BatchScheduler(engine, max_active=settings.max_active, max_queue=settings.max_queue,
                                   max_seq_len=max_seq_len, on_step=metrics.on_step)
        scheduler.start()
        log.info("model %s: %d KV-cache rows x %d positions (%.1f MiB), queue %d, device %s",
                 settings.model, settings.max_active, max_seq_len, scheduler.kv_cache_bytes() / 2 ** 20,
                 settings.max_queue, settings.device)
        return scheduler

    def serve_metrics(metrics: DecoderMetrics) -> None:
        if settings.metrics_port is not None:
            host = settings.metrics_host or listen_host
            mport = metrics.serve_http(host, settings.metrics_port)
            print(f"metrics on {grpc_serving.join_host_port(host, mport)}", flush=True)

    def on_ready(addr: str) -> None:
        print(f"listening on {addr}", flush=True)

    def on_http_ready(addr: str) -> None:
        print(f"http on {addr}", flush=True)

    metrics_on = settings.metrics_port is not None or config.http_listen is not None  # /metrics on the HTTP port too

    if settings.wait_for_model:
        return _serve_waiting(settings, config, open_client, load_engine, start_scheduler, serve_metrics, on_ready,
                              on_http_ready, metrics_on)

    client = open_client()
    try:
        with settings.quiet_first_load():
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


def _serve_waiting(settings: ProcessSettings, config: ServiceConfig, open_client: Callable[[], Any],
                   load_engine: Callable[[Any], Any], start_scheduler: Callable[[Any, DecoderMetrics], Any],
                   serve_metrics: Callable[[DecoderMetrics], None], on_ready: Callable[[str], None],
                   on_http_ready: Callable[[str], None] | None = None, metrics_on: bool = False) -> int:
    """--wait-for-model: the server (and metrics) first, the model when the store has it."""
    metrics = DecoderMetrics(metrics_on)
    waiter = ModelWaiter(settings.model, settings.store, open_client, timeout_s=settings.wait_timeout_s,
                         needs_profile=settings.needs_profile)

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
