"""The OpenAI-compatible HTTP API of `moe-decoder serve --http-listen HOST:PORT`, on FastAPI +
uvicorn in the gRPC server's event loop, over the same `BatchScheduler` (so one set of limits:
a full scheduler is RESOURCE_EXHAUSTED on gRPC and 429 here).

    GET  /v1/models, /v1/models/{id}     the one model this process serves
    POST /v1/completions                 prompt -> text (stream: server-sent events)
    POST /v1/chat/completions            messages -> the model's chat template -> text
    GET  /health                         200 when requests are served, else 503 (loading, draining, failed)
    GET  /metrics                        Prometheus text (the same registry as --metrics-port)

Request shapes and errors are OpenAI's (`openai_protocol`); `HttpFrontend` holds the logic
and the FastAPI routes only call it. Streams are `data: {json}\\n\\n` events ending with
`data: [DONE]`; an error after the stream began is one `data: {"error": ...}` event, then
`[DONE]`. A client that goes away (mid-stream, or while waiting for a whole answer) cancels its
sequence, which frees its KV-cache row before the next step; it is logged with status 499.

Auth: with a token (--auth-token-file / $MOE_DECODER_TOKEN, as gRPC) every /v1 route needs
`Authorization: Bearer TOKEN` (constant-time compare; 401 otherwise); /health and /metrics
are open, as gRPC health and the --metrics-port endpoint are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

# FastAPI resolves the routes' annotations from this module's names
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoder.batching import (BatchScheduler, ErrorEvent, FinishEvent, InvalidRequest, SchedulerError,
                              TokenEvent)
from decoder.serving import openai_protocol as oai
from decoder.serving.chat import ChatTemplate, ChatTemplateError
from decoder.serving.openai_protocol import ApiError, GenerationRequest

log = logging.getLogger("decoder.http")
request_log = logging.getLogger("decoder.requests")

MAX_BODY_BYTES = 8 * 1024 * 1024
DISCONNECT_POLL_S = 0.25      # how often a non-streaming request checks that its client is still there
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass
class HttpSettings:
    """What the HTTP front end needs from the service's configuration."""

    model: str
    default_max_tokens: int = 128
    max_prompt_chars: int = 1 << 20
    token: str | None = None
    retry_after_s: int = 1           # Retry-After of a 429


class _ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class _Run:
    """One sequence in the scheduler, read from the event loop: the step thread's events go
    through loop.call_soon_threadsafe into a queue."""

    def __init__(self, scheduler: BatchScheduler, ids: list[int], spec: Any, rid: str) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.scheduler = scheduler
        self.seq = scheduler.submit(ids, spec, lambda ev: loop.call_soon_threadsafe(self.events.put_nowait, ev),
                                    request_id=rid)

    async def next(self) -> tuple[str, int, Any]:
        """(text, tokens, end) of every event there is now, waiting for at least one; `end` is
        the FinishEvent or ErrorEvent that ended the sequence, else None."""
        ev = await self.events.get()
        text, n = [], 0
        while True:
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
                n += 1
            else:
                return "".join(text), n, ev
            if self.events.empty():
                return "".join(text), n, None
            ev = self.events.get_nowait()

    def cancel(self) -> None:
        self.scheduler.cancel(self.seq)  # no-op once finished


class HttpFrontend:
    """The OpenAI API over a BatchScheduler attached once the model is loaded (before that,
    generation answers 503 with `not_ready()`)."""

    def __init__(self, settings: HttpSettings, metrics: Any = None,
                 not_ready: Callable[[], str] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.not_ready = not_ready or (lambda: "the model is not loaded yet")
        self.scheduler: BatchScheduler | None = None
        self.tokenizer = None
        self.chat_template: ChatTemplate | None = None
        self.created = int(time.time())
        self.draining = False

    def attach(self, scheduler: BatchScheduler, chat_template: ChatTemplate | None) -> None:
        self.tokenizer = scheduler.engine.tokenizer
        self.chat_template = chat_template
        self.created = int(time.time())
        self.scheduler = scheduler

    # --- checks -------------------------------------------------------------------------
    def health(self) -> tuple[int, dict[str, Any]]:
        if self.draining:
            return 503, {"status": "draining"}
        if self.scheduler is None:
            return 503, {"status": "loading", "message": self.not_ready()}
        if not self.scheduler.alive:
            return 503, {"status": "failed", "message": "the batch scheduler is not running"}
        return 200, {"status": "ok", "model": self.settings.model}

    def authorize(self, header: str | None) -> None:
        token = self.settings.token
        if token is None:
            return
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "missing or invalid bearer token (Authorization: Bearer TOKEN)",
                           code="invalid_api_key")

    def check_model(self, model: str) -> None:
        if model != self.settings.model:
            raise ApiError(404, f"model {model!r} does not exist here; this server serves {self.settings.model!r}",
                           param="model", code="model_not_found")

    def _scheduler(self) -> BatchScheduler:
        if self.draining:
            raise ApiError(503, "the decoder is shutting down", code="unavailable")
        if self.scheduler is None:
            raise ApiError(503, self.not_ready(), code="model_not_loaded")
        if not self.scheduler.alive:
            raise ApiError(503, "the decoder is not serving", code="unavailable")
        return self.scheduler

    # --- a request ----------------------------------------------------------------------
    def prompt_ids(self, req: GenerationRequest, scheduler: BatchScheduler) -> list[int]:
        """Token ids of the prompt: the chat template's text for chat (tokenized without the
        tokenizer's own special tokens: the template has placed them, as HF's
        apply_chat_template does), the text or ids of a completion. Runs in a worker thread."""
        limit = scheduler.max_seq_len
        if req.prompt_ids is not None:
            return scheduler.check_prompt(req.prompt_ids)
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: send the prompt as token ids")
        if req.chat:
            if self.chat_template is None:
                raise ApiError(400, f"model {self.settings.model!r} has no chat template (no chat_template in its "
                                    f"tokenizer_config.json): use /v1/completions", code="no_chat_template")
            try:
                text = self.chat_template.render(req.messages)
            except ChatTemplateError as e:
                raise ApiError(400, str(e), param="messages", code="chat_template_error") from None
        else:
            text = req.prompt_text or ""
        # refuse text that cannot fit before spending CPU on tokenizing it (no real token is 64 characters)
        max_chars = min(self.settings.max_prompt_chars, max(1 << 16, 64 * limit))
        if len(text) > max_chars:
            raise InvalidRequest(f"prompt of {len(text)} characters cannot fit the context of {limit} tokens")
        return scheduler.check_prompt(self.tokenizer.encode(text, add_special_tokens=not req.chat))

    async def start(self, req: GenerationRequest, rid: str) -> tuple[_Run, int]:
        """Checks, prompt, submit: every refusal is an ApiError with its HTTP status."""
        try:
            self.check_model(req.model)
            spec = req.sampling(self.settings.default_max_tokens)
            scheduler = self._scheduler()
            scheduler.ensure_room()  # refuse before spending CPU on the prompt
            ids = await asyncio.to_thread(self.prompt_ids, req, scheduler)
            return _Run(scheduler, ids, spec, rid), len(ids)
        except SchedulerError as e:
            raise ApiError.from_code(e.code, str(e)) from None

    def record(self, status: str, http_status: int, path: str, rid: str, t0: float, prompt_n: int, tokens: int,
               finish: str, first_token_s: float | None) -> None:
        seconds = time.monotonic() - t0
        if self.metrics is not None:
            self.metrics.request(status, seconds, prompt_n, tokens, first_token_s)
        request_log.info(json.dumps({
            "ts": round(time.time(), 3), "event": "http", "path": path, "id": rid, "status": status,
            "http_status": http_status, "prompt_tokens": prompt_n, "tokens": tokens, "finish": finish,
            "latency_s": round(seconds, 4),
            "first_token_s": None if first_token_s is None else round(first_token_s, 4)}, separators=(",", ":")))


def _request_id(request: Any) -> str:
    rid = request.headers.get("x-request-id")
    return rid if rid and _REQUEST_ID_RE.match(rid) else uuid.uuid4().hex[:16]


async def _read_json(request: Any) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def build_app(front: HttpFrontend) -> Any:
    """The FastAPI application: thin routes over `front`."""
    app = FastAPI(title="adapmoe decoder", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: ApiError, rid: str | None = None) -> JSONResponse:
        headers = {"x-request-id": rid} if rid else {}
        if e.status == 429:
            headers["retry-after"] = str(front.settings.retry_after_s)
        if e.status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown routes, 405
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(ApiError(exc.status_code, msg))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, f"{type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = front.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        m = front.metrics
        if m is None or not getattr(m, "enabled", False):
            return error_response(ApiError(404, "metrics are disabled"))
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        try:
            front.authorize(request.headers.get("authorization"))
        except ApiError as e:
            return error_response(e)
        return JSONResponse(oai.models_body(front.settings.model, front.created))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        try:
            front.authorize(request.headers.get("authorization"))
            front.check_model(model_id)
        except ApiError as e:
            return error_response(e)
        return JSONResponse(oai.model_body(front.settings.model, front.created))

    async def generate(request: Request, chat: bool) -> Response:
        t0 = time.monotonic()
        rid = _request_id(request)
        path = request.url.path
        prefix = "chatcmpl-" if chat else "cmpl-"
        prompt_n = 0
        try:
            front.authorize(request.headers.get("authorization"))
            body = await _read_json(request)
            req = oai.parse_chat(body) if chat else oai.parse_completion(body)
            run, prompt_n = await front.start(req, rid)
        except ApiError as e:
            front.record(e.status_code_name, e.status, path, rid, t0, prompt_n, 0, "", None)
            return error_response(e, rid)
        created = int(time.time())
        if req.stream:
            return StreamingResponse(_stream(front, run, req, rid, prefix + rid, created, path, t0, prompt_n),
                                     media_type="text/event-stream",
                                     headers={"x-request-id": rid, "cache-control": "no-cache",
                                              "x-accel-buffering": "no"})
        return await _whole(front, request, run, req, rid, prefix + rid, created, path, t0, prompt_n, error_response)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    return app


async def _whole(front: HttpFrontend, request: Any, run: _Run, req: GenerationRequest, rid: str, oid: str,
                 created: int, path: str, t0: float, prompt_n: int, error_response: Callable[..., Any]) -> Any:
    """A non-streaming answer: wait for the sequence to end (checking that the client is still
    there), then one JSON body."""
    text, tokens, first_token_s, finish = [], 0, None, ""
    status, http_status = "OK", 200
    try:
        while True:
            try:
                delta, n, end = await asyncio.wait_for(run.next(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone() from None
                continue
            if n and first_token_s is None:
                first_token_s = time.monotonic() - t0
            text.append(delta)
            tokens += n
            if isinstance(end, FinishEvent):
                u = end.usage
                finish = u.finish_reason
                usage = oai.usage_body(u.prompt_tokens, u.completion_tokens)
                body = (oai.chat_body if req.chat else oai.completion_body)(oid, created, req.model, "".join(text),
                                                                            finish, usage)
                return JSONResponse(body, headers={"x-request-id": rid})
            if isinstance(end, ErrorEvent):
                e = ApiError.from_code(end.code, end.message)
                status, http_status = e.status_code_name, e.status
                return error_response(e, rid)
    except _ClientGone:  # nobody reads this answer
        status, http_status = "CANCELLED", 499
        return Response(status_code=499)
    except asyncio.CancelledError:
        status, http_status = "CANCELLED", 499
        raise
    finally:
        run.cancel()
        front.record(status, http_status, path, rid, t0, prompt_n, tokens, finish, first_token_s)


async def _stream(front: HttpFrontend, run: _Run, req: GenerationRequest, rid: str, oid: str, created: int,
                  path: str, t0: float, prompt_n: int) -> AsyncIterator[bytes]:
    """Server-sent events of one sequence. Starlette cancels this generator when the client
    disconnects; `finally` then cancels the sequence."""
    tokens, first_token_s, finish = 0, None, ""
    status, http_status = "OK", 200
    model, chat, usage_on = req.model, req.chat, req.include_usage
    try:
        if chat:
            yield _sse(oai.chat_chunk(oid, created, model, {"role": "assistant", "content": ""}, None, usage_on))
        while True:
            delta, n, end = await run.next()
            if n and first_token_s is None:
                first_token_s = time.monotonic() - t0
            tokens += n
            if isinstance(end, ErrorEvent):
                e = ApiError.from_code(end.code, end.message)
                status, http_status = e.status_code_name, e.status
                yield _sse(e.body())
                yield b"data: [DONE]\n\n"
                return
            end_reason = end.usage.finish_reason if isinstance(end, FinishEvent) else None
            if delta or end_reason is not None:
                if chat:
                    yield _sse(oai.chat_chunk(oid, created, model, {"content": delta} if delta else {}, end_reason,
                                              usage_on))
                else:
                    yield _sse(oai.completion_chunk(oid, created, model, delta, end_reason, usage_on))
            if end_reason is not None:
                finish = end_reason
                if usage_on:
                    u = end.usage
                    yield _sse(oai.usage_chunk(oid, created, model, chat,
                                               oai.usage_body(u.prompt_tokens, u.completion_tokens)))
                yield b"data: [DONE]\n\n"
                return
    except (asyncio.CancelledError, GeneratorExit):
        status, http_status = "CANCELLED", 499
        raise
    finally:
        run.cancel()
        front.record(status, http_status, path, rid, t0, prompt_n, tokens, finish, first_token_s)


# --------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------
def _server_ssl(cert: bytes, key: bytes, client_ca: bytes | None) -> ssl.SSLContext:
    """TLS (mTLS with client_ca) from PEM bytes; the certificate chain and key pass through a
    private temporary directory that is removed at once (ssl loads them only from files)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as d:
        cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    if client_ca is not None:
        ctx.load_verify_locations(cadata=client_ca.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def chat_template_of(engine: Any) -> ChatTemplate | None:
    """The chat template stored with the engine's model (tokenizer_config.json), or None; a
    store that cannot say is logged and means no template."""
    client = getattr(engine, "client", None)
    if client is None:
        return None
    try:
        config = client.manifest(engine.model_name).tokenizer_config
    except Exception as e:
        log.warning("could not read the chat template of %s: %s: %s", engine.model_name, type(e).__name__, e)
        return None
    template = ChatTemplate.from_tokenizer_config(config)
    if template is None:
        log.info("model %s has no chat template: /v1/chat/completions answers 400", engine.model_name)
    elif template.error:
        log.warning("model %s: %s (chat requests answer 400)", engine.model_name, template.error)
    return template


class HttpServer:
    """uvicorn serving `build_app(front)` on HOST:PORT (port 0: any free port) inside the
    running event loop; signals stay with the gRPC server's handlers."""

    def __init__(self, front: HttpFrontend, listen: str, grace_s: float = 10.0, tls_cert: bytes | None = None,
                 tls_key: bytes | None = None, tls_client_ca: bytes | None = None) -> None:
        import uvicorn

        self.front = front
        self.listen = listen
        self.config = uvicorn.Config(build_app(front), log_config=None, access_log=False, lifespan="off",
                                     timeout_graceful_shutdown=grace_s, server_header=False)
        self.config.load()
        if tls_cert is not None and tls_key is not None:
            self.config.ssl = _server_ssl(tls_cert, tls_key, tls_client_ca)

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # SIGTERM/SIGINT belong to the service's own shutdown
                yield

        self.server = _Server(self.config)
        self.port = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        from expert_store import grpc_serving

        host, port = grpc_serving.split_host_port(self.listen, example_port=8000)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise OSError(f"could not bind --http-listen {self.listen}: {e.strerror or e}") from None
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {self.listen} did not start")
            await asyncio.sleep(0.01)
        return grpc_serving.join_host_port(host, self.port)

    async def stop(self) -> None:
        """Stop accepting; in-flight requests get the grace period, then are cut."""
        if self._task is None:
            return
        self.server.should_exit = True
        try:
            await self._task
        except Exception:
            log.debug("the HTTP server ended with an error", exc_info=True)
        self._task = None


__all__ = ["HttpFrontend", "HttpServer", "HttpSettings", "build_app", "chat_template_of"]
