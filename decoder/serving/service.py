"""The decoder service of `moe-decoder serve`: the gRPC servicer (`grpc_api`), gRPC health
and reflection, the bearer-token interceptor and TLS on one port, and the OpenAI HTTP API
(`http_api`, --http-listen) beside it, over one started `BatchScheduler`, or over none yet
(--wait-for-model: NOT_SERVING until the loaded scheduler is attached).

Health (`grpc.health.v1`): the overall status ("") and "adapmoe.v1.Decoder" say whether
Generate can be served (readiness); the service "liveness" stays SERVING while the process
works, also while it waits for its model, and turns NOT_SERVING only when the batch scheduler
died or on shutdown (liveness). On SIGTERM/SIGINT: NOT_SERVING first, a drain period, then a
grace period for in-flight streams.

Security (all optional, ServiceConfig): a bearer token clients must send on both front ends
(constant-time compare; health, and on HTTP /health and /metrics, exempt; never logged), and
TLS or mTLS for clients with the same certificates on both ports.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2

from decoder.batching import BatchScheduler
from decoder.serving.config import ServiceConfig
from decoder.serving.grpc_api import SERVICE_NAME, DecoderServicer
from decoder.wire import MAX_MESSAGE_BYTES
from decoder.serving.metrics import DecoderMetrics
from expert_store import grpc_serving
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as pb_grpc

log = logging.getLogger("decoder.service")

# gRPC health service name of the liveness check: SERVING while the process works (waiting for
# its model included); NOT_SERVING when the batch scheduler died (restart us) or on shutdown
LIVENESS_SERVICE = "liveness"


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

