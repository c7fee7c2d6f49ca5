"""What both gRPC services (`expert-store serve`, `moe-decoder serve`) set up the same way.

Bearer-token auth (`BearerTokenInterceptor`, `read_token_file`), the check that a TLS / token
set-up can work (`check_security`), HOST:PORT parsing and
joining, the common channel options, the TLS / mTLS or plaintext port, and gRPC health +
server reflection. Bytes and grpc only (no torch): the store's serving path imports it, and
`decoder.serving` imports it from here (`expert_store` never imports `decoder`).
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import os
import platform
import signal
import threading
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

AUTH_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)  # probes (kubelet gRPC probes send no token)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` metadata required on every RPC except health checks.
    Compared in constant time; the token never appears in logs or error details."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(AUTH_EXEMPT_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _unauthenticated_like(handler)


def _unauthenticated_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    details = "missing or invalid bearer token"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)
        yield  # pragma: no cover  (makes this an async generator)

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


def check_security(token: str | None, tls_cert: bytes | None, tls_key: bytes | None,
                   tls_client_ca: bytes | None) -> None:
    """ValueError for a server security set-up that cannot work: a certificate without its key
    (or the reverse), a client CA without TLS, an empty bearer token."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    if tls_client_ca is not None and tls_cert is None:
        raise ValueError("a client CA (mTLS) needs a server certificate and key")
    if token is not None and not token:
        raise ValueError("the bearer token is empty")


def auth_interceptors(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a server needs: a bearer-token check when `token` is set, else none."""
    return [BearerTokenInterceptor(token)] if token else []


def read_token_file(path: str | None, env_var: str) -> str | None:
    """A bearer token from a file (stripped), else $`env_var`, else None. An empty file is an
    error, not "no auth"."""
    if path:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    return os.environ.get(env_var) or None


def split_host_port(listen: str, example_port: int) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" -> (host without brackets, port); `example_port` only shows
    in the error message."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT "
                         f"(e.g. 127.0.0.1:{example_port}, [::]:{example_port})")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {listen!r}: port out of range")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def channel_options(max_message_bytes: int, reuse_port: bool) -> list[tuple[str, Any]]:
    """Message size limits, SO_REUSEPORT (on only for pre-forked workers) and keepalive."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD_BYTES = 32 << 20
MALLOC_TRIM_THRESHOLD_BYTES = 128 << 20
_malloc_tuned: bool | None = None
_malloc_lock = threading.Lock()


def tune_malloc() -> bool:
    """Let glibc reuse the memory of freed gRPC messages instead of returning it to the kernel
    and faulting it back in for the next one (once per process; True when applied).

    Every 1 MiB chunk is a fresh allocation on both ends (grpc's slices, the message bytes).
    glibc's defaults serve such sizes with mmap, or from a heap top it trims on free, so each
    message costs its pages' faults and zeroing: with both processes of a 1 -> 1 stream
    measured on the 2-core dev box (perf), page faults, clear_page and munmap were ~15% of the
    receiving process. Fixing the two thresholds below cut the client's CPU per GB by about
    a third (benchmarks/README.md, "Expert store throughput", has the measurement). Setting
    only one of the two made things worse (a fixed threshold
    turns off glibc's dynamic one), so both are set. The cost: up to 128 MiB of freed heap
    kept per malloc arena, and allocations under 32 MiB come from the heap. A no-op off glibc."""
    global _malloc_tuned
    with _malloc_lock:
        if _malloc_tuned is None:
            _malloc_tuned = False
            if platform.libc_ver()[0] == "glibc":
                try:
                    mallopt = ctypes.CDLL(None).mallopt
                except (OSError, AttributeError):
                    return False
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)) and \
                    bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES))
        return _malloc_tuned


def add_port(server: grpc.aio.Server, address: str, tls_cert: bytes | None, tls_key: bytes | None,
             tls_client_ca: bytes | None) -> int:
    """TLS (mTLS when `tls_client_ca` is set) when `tls_cert` is set, else plaintext; returns
    the bound port (0: could not bind)."""
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(tls_key, tls_cert)], root_certificates=tls_client_ca, require_client_auth=tls_client_ca is not None)
        return server.add_secure_port(address, creds)
    return server.add_insecure_port(address)


def add_health_and_reflection(server: grpc.aio.Server, service_name: str) -> health.aio.HealthServicer:
    """gRPC health (`grpc.health.v1`) and server reflection for `service_name`, health and
    reflection itself; returns the health servicer (see `set_health`)."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    return servicer


async def set_health(servicer: health.aio.HealthServicer, service_name: str, serving: bool) -> None:
    """The overall status ("") and `service_name`'s: SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await servicer.set("", status)
    await servicer.set(service_name, status)


def stop_on_signals(request_stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT call `request_stop` (on the running event loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)


__all__ = ["AUTH_EXEMPT_PREFIXES", "BearerTokenInterceptor", "check_security", "auth_interceptors",
           "read_token_file", "split_host_port", "join_host_port", "channel_options", "add_port",
           "add_health_and_reflection", "set_health", "stop_on_signals", "tune_malloc"]
