"""`expert-store serve`'s processes: one server process (`run_single`), or N pre-forked ones on
one port (`run_workers`, SO_REUSEPORT) because one Python process tops out near 1 GB/s; the
parent supervises them (restarts a dead worker, forwards SIGTERM/SIGINT) and serves their
merged Prometheus metrics. Each process runs `expert_store.server.serve` over its own
ModelStore (`StoreSpec`)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

from expert_store.grpc_serving import join_host_port
from expert_store.server import ServerConfig, serve, split_host_port
from expert_store.store import ModelStore

log = logging.getLogger("expert_store.workers")


def print_listening(address: str) -> None:
    print(f"listening on {address}", flush=True)


def start_metrics_server(port: int, multiprocess_dir: str | None = None) -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    if multiprocess_dir is None:
        start_http_server(port)
        return
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)
    start_http_server(port, registry=registry)


@dataclass(frozen=True)
class StoreSpec:
    """How a worker opens its own ModelStore (each process has its own RAM tier and clients)."""

    store_dir: str
    redis_url: str | None = None
    ram_bytes: int | None = None
    stream_above_bytes: int | None = None  # None: ModelStore's default
    redis_password: str | None = None  # for a URL without one (a password kept in a Secret file)

    def open(self) -> ModelStore:
        kw: dict[str, Any] = {"redis_url": self.redis_url}
        if self.redis_password:
            kw["password"] = self.redis_password
        if self.ram_bytes is not None:
            kw["ram_bytes"] = self.ram_bytes
        if self.stream_above_bytes is not None:
            kw["stream_above_bytes"] = self.stream_above_bytes
        return ModelStore.open(self.store_dir, **kw)


def run_single(spec: StoreSpec, config: ServerConfig) -> None:
    """`expert-store serve --workers 1`: one process, metrics (if any) served in-process."""
    store = spec.open()
    if config.metrics_port is not None:
        start_metrics_server(config.metrics_port)
    asyncio.run(serve(store, config, on_ready=print_listening))


def _worker_main(spec: StoreSpec, config: ServerConfig, ready: Any) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {os.getpid()} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM; ^C reaches the whole group
    try:
        store = spec.open()
        asyncio.run(serve(store, config, on_ready=lambda addr: ready.send(("ready", addr))))
    except BaseException as e:  # report, do not let the parent wait for a dead worker
        try:
            ready.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        raise


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket, so port 0 becomes one concrete port all workers
    share and no unrelated process can take it meanwhile. Held by the parent while it runs."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def run_workers(spec: StoreSpec, config: ServerConfig, workers: int, ready_timeout_s: float = 60.0) -> int:
    """Pre-fork `workers` server processes on one port and supervise them.

    Workers are spawned (not forked: gRPC must not be initialised before a fork), each with
    its own ModelStore, all listening on the same port with SO_REUSEPORT, so the kernel
    spreads connections over them. The parent prints "listening on HOST:PORT" once every
    worker serves, restarts a worker that dies (at most 5 times a minute), and forwards
    SIGTERM/SIGINT to all of them (each flips its health to NOT_SERVING and drains).
    """
    host, port = split_host_port(config.listen)
    reserved = reserve_port(host, port)
    port = reserved.getsockname()[1]
    config = replace(config, listen=join_host_port(host, port), reuse_port=True)
    metrics_dir = None
    if config.metrics_port is not None:
        metrics_dir = tempfile.mkdtemp(prefix="expert-store-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        start_metrics_server(config.metrics_port, metrics_dir)  # workers record, the parent serves
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def spawn() -> tuple[Any, Any]:
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_main, args=(spec, config, child_end), daemon=False)
        proc.start()
        child_end.close()
        return proc, parent_end

    procs: list[tuple[Any, Any]] = []
    try:
        procs = [spawn() for _ in range(workers)]
        deadline = time.monotonic() + ready_timeout_s
        for proc, conn in procs:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"worker {proc.pid} did not start within {ready_timeout_s:.0f}s")
            kind, detail = conn.recv()
            if kind != "ready":
                raise RuntimeError(f"worker {proc.pid} failed to start: {detail}")
        print_listening(config.listen)
        restarts: list[float] = []
        while not stopping:
            sentinels = [p.sentinel for p, _ in procs]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            for i, (proc, conn) in enumerate(procs):
                if proc.is_alive() or stopping:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5:
                    raise RuntimeError("workers keep dying (more than 5 restarts in a minute); giving up")
                log.warning("worker %d exited with %s; restarting it", proc.pid, proc.exitcode)
                conn.close()
                if metrics_dir is not None:  # its live gauges no longer count
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(proc.pid, metrics_dir)
                procs[i] = spawn()
        return 0
    finally:
        for proc, _ in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        end = time.monotonic() + config.grace_s + 5
        for proc, _ in procs:
            proc.join(max(0.1, end - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        for s, h in old.items():
            signal.signal(s, h)
        reserved.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
