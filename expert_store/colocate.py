"""`expert-store colocate`: a store beside the decoder that publishes blobs into shared memory.

    expert-store colocate --upstream grpc://store-0.store:50051,store-1.store:50051 \\
        --arena /dev/shm/adapmoe.arena --arena-bytes 16G --model mixtral --listen 127.0.0.1:50061

One process, one gRPC port (the control plane): `ExpertArena` (Ensure: "put these blobs in the
arena, tell me where"; DescribeArena), `ExpertStore` (manifest, dense file, and blobs over gRPC
for a client that cannot map the arena) and gRPC health. The bytes go upstream -> arena file ->
the decoder's mapping (`local-shm://` targets, expert_store/arena_client.py). The logic is in
`ArenaPublisher` (expert_store/arena_publisher.py); this module translates protobuf and statuses.

It listens at once and prints "listening on HOST:PORT"; then it sets the arena up: slots sized
to the largest blob of the `--model`s (their manifests are waited for, up to --wait-timeout)
unless --slot-bytes is given. Until the arena is up, gRPC health "" is NOT_SERVING (readiness)
and every call answers UNAVAILABLE; the health service "liveness" is SERVING from the start
(liveness and startup probes), so a pod waiting for its model is never restarted for it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from typing import Any, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2

from expert_store._proto.adapmoe.v1 import expert_arena_pb2 as apb
from expert_store._proto.adapmoe.v1 import expert_arena_pb2_grpc as apb_grpc
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as pb_grpc
from expert_store.arena_publisher import ArenaPublisher, ReadThroughStore, raw_slot_bytes, slot_bytes_for
from expert_store.client import StoreClient
from expert_store.errors import InvalidArgument, NotFound, StoreError, Unavailable
from expert_store.grpc_serving import (add_health_and_reflection, add_port, auth_interceptors, channel_options,
                                       join_host_port, read_token_file, set_health, split_host_port,
                                       stop_on_signals, tune_malloc)
from expert_store.launch import ServerProcess, console_command
from expert_store.manifest import Manifest
from expert_store.server import ExpertStoreServicer, ServerConfig
from expert_store.shm_arena import ArenaWriter
from expert_store.wire import MAX_MESSAGE_BYTES, TOKEN_ENV

log = logging.getLogger("expert_store.colocate")

ARENA_SERVICE = apb.DESCRIPTOR.services_by_name["ExpertArena"].full_name   # "adapmoe.v1.ExpertArena"
STORE_SERVICE = pb.DESCRIPTOR.services_by_name["ExpertStore"].full_name
PRIORITY_NAMES = {pb.DEMAND: "demand", pb.PREFETCH: "prefetch"}


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, StoreError):
        return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN), str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


LIVENESS_SERVICE = "liveness"   # SERVING while the process works, also while it sets up


class PendingPublisher:
    """The publisher once the arena is up; until then every use is Unavailable (why: `waiting`)."""

    def __init__(self, waiting: str) -> None:
        self.waiting = waiting
        self._publisher: ArenaPublisher | None = None

    def set(self, publisher: ArenaPublisher) -> None:
        self._publisher = publisher

    def get(self) -> ArenaPublisher:
        if self._publisher is None:
            raise Unavailable(f"the co-located store is starting: {self.waiting}")
        return self._publisher


class _StartingStore:
    """ReadThroughStore once the publisher is up (ExpertStoreServicer is built before that)."""

    def __init__(self, pending: PendingPublisher) -> None:
        self._pending = pending
        self._store: ReadThroughStore | None = None

    def __getattr__(self, name: str) -> Any:
        if self._store is None:
            self._store = ReadThroughStore(self._pending.get())
        return getattr(self._store, name)


class ExpertArenaServicer(apb_grpc.ExpertArenaServicer):
    """Protobuf <-> ArenaPublisher; publisher calls run in threads (upstream I/O blocks)."""

    def __init__(self, publisher: PendingPublisher, arena_path: str) -> None:
        self.pending = publisher
        self.arena_path = arena_path

    async def Ensure(self, request: apb.EnsureRequest, context: grpc.aio.ServicerContext) -> apb.EnsureResponse:
        try:
            priority = PRIORITY_NAMES.get(request.priority)
            if priority is None:
                raise InvalidArgument(f"unknown priority {request.priority}")
            refs = [(r.layer, r.expert, r.precision) for r in request.refs]
            publisher = self.pending.get()
            remaining = context.time_remaining()
            locs = await asyncio.to_thread(publisher.ensure, request.model, refs, priority, request.pin_s, remaining)
            epoch = publisher.writer.epoch
        except Exception as e:  # noqa: BLE001 - every failure is a status
            code, details = _status(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("Ensure failed", exc_info=e)
            await context.abort(code, details)
        return apb.EnsureResponse(epoch=epoch, blobs=[
            apb.BlobLocation(slot=l.slot, offset=l.offset, size=l.size, generation=l.generation) for l in locs])

    async def DescribeArena(self, request: apb.DescribeArenaRequest, context) -> apb.ArenaInfo:
        try:
            s = await asyncio.to_thread(self.pending.get().stats)
        except StoreError as e:
            await context.abort(*_status(e))
        return apb.ArenaInfo(path=self.arena_path, epoch=s["epoch"], slots=s["slots"], slot_bytes=s["slot_bytes"],
                             used=s["used"], pinned=s["pinned"], hits=s["hits"], misses=s["misses"],
                             publishes=s["publishes"], evictions=s["evictions"], data_loss=s["data_loss"],
                             bytes_published=s["bytes_published"], fill_gbps=s["fill_gbps"])


async def serve_colocated(setup: Callable[[], ArenaPublisher], arena_path: str, listen: str, *,
                          waiting: str = "setting the arena up", token: str | None = None, grace_s: float = 5.0,
                          max_refs: int = 64, on_ready: Callable[[str], None] | None = None,
                          after_ready: Callable[[ArenaPublisher, threading.Event], Any] | None = None) -> None:
    """Serve ExpertArena + ExpertStore (read-through) + health on `listen` at once, run `setup`
    (in a thread) and serve SERVING once it returned, until SIGTERM/SIGINT; then
    `after_ready(publisher, stopping)` runs in a thread of its own (a cold fill). A failed
    setup stops the server and is raised. The publisher is closed on the way out."""
    tune_malloc()
    pending = PendingPublisher(waiting)
    server = grpc.aio.server(interceptors=auth_interceptors(token),
                             options=channel_options(MAX_MESSAGE_BYTES, reuse_port=False))
    apb_grpc.add_ExpertArenaServicer_to_server(ExpertArenaServicer(pending, arena_path), server)
    pb_grpc.add_ExpertStoreServicer_to_server(
        ExpertStoreServicer(_StartingStore(pending), ServerConfig(listen=listen, max_refs=max_refs, token=token)),
        server)
    health = add_health_and_reflection(server, ARENA_SERVICE)
    host, port = split_host_port(listen, example_port=50061)
    bound = add_port(server, join_host_port(host, port), None, None, None)
    if bound == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    await set_health(health, ARENA_SERVICE, serving=False)
    await set_health(health, STORE_SERVICE, serving=False)
    await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    stopping = asyncio.Event()
    stop_on_signals(stopping.set)
    if on_ready is not None:
        on_ready(join_host_port(host, bound))
    closing = threading.Event()
    setting_up = asyncio.ensure_future(asyncio.to_thread(setup))
    stop_wait = asyncio.ensure_future(stopping.wait())
    publisher = None
    try:
        done, _ = await asyncio.wait({setting_up, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if setting_up in done:
            publisher = setting_up.result()   # raises a failed setup
            pending.set(publisher)
            await set_health(health, ARENA_SERVICE, serving=True)
            await set_health(health, STORE_SERVICE, serving=True)
            if after_ready is not None:
                background = threading.Thread(target=after_ready, args=(publisher, closing), name="arena-prefill",
                                              daemon=True)
                background.start()
            await stop_wait
    finally:
        closing.set()
        await health.enter_graceful_shutdown()
        await server.stop(grace_s)
        if publisher is None and setting_up.done() and not setting_up.cancelled() and not setting_up.exception():
            publisher = setting_up.result()
        if publisher is not None:
            publisher.close()


# --------------------------------------------------------------------------------------------
# the command


def add_parser(sub: argparse._SubParsersAction, size: Callable[[str], int], positive: Callable[[str], int],
               precisions: Callable[[str], tuple[str, ...]]) -> None:
    """`expert-store colocate`'s options (expert_store/cli.py registers the command)."""
    c = sub.add_parser("colocate", help="run beside a decoder: publish blobs into a shared-memory arena",
                       description="A read-through store beside the decoder: fetches blobs from --upstream, "
                                   "checks each once and publishes it into a shared-memory arena the decoder "
                                   "maps (moe-decoder --store local-shm://ARENA?control=HOST:PORT).")
    c.add_argument("--upstream", required=True, metavar="DIR|grpc://H:P[,H:P]|dns:///H:P|k8s://NS/SVC:PORT",
                   help="the store that holds the models (the fleet's source of truth)")
    c.add_argument("--arena", required=True, metavar="PATH",
                   help="the arena file, on a memory filesystem both containers mount (/dev/shm, emptyDir Memory)")
    c.add_argument("--arena-bytes", required=True, type=size, metavar="BYTES",
                   help="the arena's budget, e.g. 16G (reserved up front; keep it under the volume's sizeLimit)")
    c.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="a model to size the slots for (repeatable; its manifest is waited for)")
    c.add_argument("--slot-bytes", type=size, metavar="BYTES",
                   help="slot size instead of the --model's largest blob (a multiple of 4096)")
    c.add_argument("--precisions", type=precisions, metavar="P,P",
                   help="size the slots for these precisions' blobs only (e.g. int4: slots a quarter of bf16's; "
                        "a larger blob is then refused with RESOURCE_EXHAUSTED)")
    c.add_argument("--publish", choices=("stored", "raw"), default="stored",
                   help="raw: publish bf16 blobs with their byte planes joined (codec none), so the decoder "
                        "copies them from the arena to the GPU as they lie instead of decoding each host-tier "
                        "miss; costs the join once per publish and slots sized for the raw payload")
    c.add_argument("--prefill", metavar="PRECISION", choices=("bf16", "int8", "int4"),
                   help="once up, publish the --model's blobs at this precision (layer by layer, until the arena "
                        "is full) at prefetch priority: a cold fill that demand misses pass")
    c.add_argument("--listen", default="127.0.0.1:50061", metavar="HOST:PORT", help="the control plane's port")
    c.add_argument("--token-file", metavar="F", help="require this bearer token (else $EXPERT_STORE_TOKEN, if set)")
    c.add_argument("--upstream-token-file", metavar="F", help="bearer token for --upstream")
    c.add_argument("--upstream-tls-ca", metavar="F", help="CA of the upstream's certificates: use TLS")
    c.add_argument("--upstream-tls-cert", metavar="F", help="client certificate for the upstream (mTLS)")
    c.add_argument("--upstream-tls-key", metavar="F", help="client key for the upstream (mTLS)")
    c.add_argument("--redis", metavar="URL", help="(directory upstream) its Redis tier")
    c.add_argument("--fetch-threads", type=positive, default=4, metavar="N", help="parallel upstream fetches")
    c.add_argument("--deadline", type=float, default=30.0, metavar="S", help="deadline of each upstream RPC")
    c.add_argument("--wait-timeout", type=float, default=600.0, metavar="S",
                   help="how long to wait for the upstream and the --model manifests at start")
    c.add_argument("--grace", type=float, default=5.0, metavar="S", help="shutdown grace for in-flight calls")


def cmd_colocate(args: argparse.Namespace) -> int:
    if not args.model and not args.slot_bytes:
        raise InvalidArgument("give --model (slots sized to its largest blob) or --slot-bytes")
    token = read_token_file(args.token_file, TOKEN_ENV)
    upstream_token = read_token_file(args.upstream_token_file, "EXPERT_STORE_UPSTREAM_TOKEN")

    def setup() -> ArenaPublisher:
        upstream = StoreClient.open(args.upstream, token=upstream_token, tls_ca=args.upstream_tls_ca,
                                    tls_cert=args.upstream_tls_cert, tls_key=args.upstream_tls_key,
                                    deadline_s=args.deadline, max_streams=args.fetch_threads, redis_url=args.redis)
        try:
            if args.slot_bytes:
                slot_bytes = args.slot_bytes
            else:
                manifests = _wait_for_manifests(upstream, args.model, args.wait_timeout)
                slot_bytes = (raw_slot_bytes(upstream, manifests, args.precisions) if args.publish == "raw"
                              else slot_bytes_for(manifests, args.precisions))
            writer = ArenaWriter.open(args.arena, args.arena_bytes, slot_bytes)
        except BaseException:
            upstream.close()
            raise
        log.info("arena %s: %d slots of %d bytes (epoch %d, %d blobs kept)", args.arena, writer.slots,
                 writer.slot_bytes, writer.epoch, writer.used())
        return ArenaPublisher(upstream, writer, fetch_threads=args.fetch_threads, raw=args.publish == "raw")

    if args.prefill and not args.model:
        raise InvalidArgument("--prefill needs --model")

    def prefill(publisher: ArenaPublisher, stop: threading.Event) -> None:
        for model in args.model:
            if stop.is_set():
                return
            try:
                publisher.prefill(model, args.prefill, stop)
            except StoreError as e:   # the arena serves on; misses publish on demand
                log.error("prefill of %s at %s failed: %s", model, args.prefill, e)

    waiting = f"waiting for {', '.join(args.model) or 'the upstream'} from {args.upstream}"
    asyncio.run(serve_colocated(setup, args.arena, args.listen, waiting=waiting, token=token, grace_s=args.grace,
                                on_ready=lambda a: print(f"listening on {a}", flush=True),
                                after_ready=prefill if args.prefill else None))
    return 0


class ColocatedStore(ServerProcess):
    """`expert-store colocate` as a child process, for benchmarks and tests
    (expert_store.launch.ServerProcess):

        with ColocatedStore(upstream, "/dev/shm/bench.arena", 16 << 30, model) as col:
            engine = Engine.from_store(col.target, model, host_cache_bytes=..., gpu_cache_bytes=...)

    Returns from the constructor once it serves (health SERVING: the arena is up); `.address`
    is its control port, `.target` the decoder's local-shm:// store target. `stop()` sends
    SIGTERM (the arena file stays: a later store adopts it; `remove=True` unlinks it)."""

    def __init__(self, upstream: str, arena: str, arena_bytes: int, model: str, *, listen: str = "127.0.0.1:0",
                 extra: Sequence[str] = (), start_timeout_s: float = 120.0, env: dict[str, str] | None = None) -> None:
        self.arena = str(arena)
        argv = console_command("expert-store", "expert_store.cli") + [
            "colocate", "--upstream", str(upstream), "--arena", self.arena, "--arena-bytes", str(int(arena_bytes)),
            "--model", model, "--listen", listen, *extra]
        super().__init__(argv, env=env, stderr="pipe", ready_timeout=start_timeout_s)
        self.start()   # it listens at once ("listening on"), then sets the arena up
        try:
            self._await_serving(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    @property
    def target(self) -> str:
        return f"local-shm://{self.arena}?control={self.address}"

    def log(self) -> str:
        return "".join(self.stderr_lines[-50:]).strip()

    def _await_serving(self, timeout_s: float) -> None:
        from grpc_health.v1 import health_pb2_grpc

        end = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < end:
                if not self.running():
                    raise RuntimeError(f"expert-store colocate exited {self.returncode}: {self.log()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"expert-store colocate did not serve within {timeout_s:.0f}s: {self.log()}")

    def stop(self, timeout_s: float = 20.0, remove: bool = False) -> int | None:
        rc = super().stop(timeout_s)
        if remove:
            try:
                os.unlink(self.arena)
            except FileNotFoundError:
                pass
        return rc


def _wait_for_manifests(upstream: StoreClient, models: list[str], timeout_s: float) -> list[Manifest]:
    """The models' manifests, retried while the upstream is down or the model not packed yet."""
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    out = []
    for model in models:
        while True:
            try:
                out.append(upstream.manifest(model))
                break
            except (Unavailable, NotFound) as e:
                if time.monotonic() + delay > deadline:
                    raise Unavailable(f"model {model} not available from the upstream after {timeout_s:.0f}s: {e}") \
                        from None
                log.info("waiting for %s from the upstream: %s", model, e)
                time.sleep(delay)
                delay = min(5.0, delay * 2)
    return out


__all__ = ["ColocatedStore", "ExpertArenaServicer", "PendingPublisher", "serve_colocated", "add_parser", "cmd_colocate",
           "LIVENESS_SERVICE"]
