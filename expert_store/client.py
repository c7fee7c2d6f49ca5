"""StoreClient: read models from an expert store, local or over gRPC, with one API.

    with StoreClient.open("grpc://10.0.0.5:50051,10.0.0.6:50051", token=..., deadline_s=30) as store:
        m = store.manifest("mixtral")                       # Manifest
        blob = store.fetch_expert("mixtral", 3, 5, "int4")  # whole encoded blob
        store.fetch_expert("mixtral", 3, 6, "int4", out=pinned_view)  # straight into a buffer
        for (layer, expert, precision), blob in store.fetch_experts("mixtral", refs): ...
        dense = store.fetch_dense("mixtral")                # safetensors bytes

Targets
    /path/to/store            a store directory, served in-process (ModelStore, no network)
    grpc://h1:p1,h2:p2        replicas; "h1:p1,h2:p2" (no scheme) is the same
    dns:///host:port          every address host resolves to (re-resolved periodically)
    k8s://ns/service:port     the Service's ready endpoints (EndpointSlice watch)
(dns:/// and k8s:// come from expert_store.discovery; the replica set follows it live.)

Over gRPC
- Rendezvous (highest-random-weight) hashing maps each blob key to an order of replicas:
  the first is where that blob is fetched, so every replica's RAM/Redis tiers hold a
  disjoint share of the hot set (cache affinity); the rest are the failover order, and
  removing a replica moves only the keys it owned.
- Only UNAVAILABLE and a broken stream (connection reset, a stream that ends early) are
  retried: on the next replica, resuming every blob from the byte it had reached. Every
  other status maps to its expert_store.errors class at once, except bad data (below).
- Bad data is an answer, not an outage. A replica answers with bad data when it replies
  DATA_LOSS (its own check failed) or when every byte of a blob came from it and the
  assembled blob fails the client's check (the blob's seal, its ref, or for the dense file
  the manifest's size/xxh3). The client logs a WARNING naming that replica and the blob,
  asks it nothing more in this call and tries the next replica at once. The status a
  caller gets:
    good bytes from any replica              -> the bytes
    every replica tried answered bad data    -> DataLoss (DATA_LOSS), naming the blob and
                                                each replica with its reason
    some replica could not be reached (only  -> Unavailable (UNAVAILABLE, retryable: that
    transport failures, through the retry       replica may hold a good copy), whose message
    window) and none delivered good data        names the replicas that sent bad data too
  Bytes resumed from two replicas that fail the seal blame neither: the blob is refetched
  from byte 0 on the next replica, which is then accountable for all of it.
- A missing blob the manifest lists is a replica inconsistency, not an answer. Every replica
  should hold the whole model, but one can lack a blob its model's manifest lists (still
  being packed, a replaced disk, a pack that placed the blob elsewhere). When a replica
  answers NOT_FOUND for an expert blob (or the dense file) that the model's manifest lists
  (the manifest this client holds; fetched once on such a NOT_FOUND if it has none yet),
  the client logs a WARNING naming that replica (once per replica and model, not per blob),
  asks it nothing more in this call and tries the next replica in rendezvous order at once
  (no backoff). The status a caller gets:
    good bytes from any replica              -> the bytes
    every replica answered NOT_FOUND         -> NotFound (NOT_FOUND), naming the blob and
                                                the replicas
    NOT_FOUND and bad data, all reached      -> DataLoss (some copy exists, none is good),
                                                naming both kinds of replica
    some replica could not be reached        -> Unavailable (it may hold the blob), naming
                                                the replicas that lacked it too
  A blob the manifest does not list, an unknown model (its manifest is NOT_FOUND too) and
  a bad ref stay an immediate NOT_FOUND / INVALID_ARGUMENT: no other replica is asked.
- Why a server can send bad bytes without saying so: it checks an NVMe file once at rest
  and then trusts it while its stat signature (device, inode, size, mtime, ctime) is
  unchanged (tiers/nvme.py). Any write from user space moves ctime (utime cannot set it
  back), so the server re-checks and answers DATA_LOSS itself; what it cannot see is media
  bit rot under an unchanged inode, or a store whose manifest agrees with a corrupt blob.
  Only the client's seal check catches those. The client then tells that replica before
  failing over: it sends Verify for the blob (deadline min(deadline_s, VERIFY_DEADLINE_S),
  best effort: a failed Verify is logged, never raised). The replica re-reads every copy,
  checks it fully (manifest size/xxh3 and the blob's seal), forgets its "checked" mark and
  removes a bad copy, NVMe file included; its next fetch of that blob answers NOT_FOUND (the
  client fails over as for any missing blob) until the blob is uploaded again (a resumed
  `expert-store pack --store grpc://...`). The caller's status is unchanged by this.
- Each RPC attempt has a deadline (deadline_s). At most max_streams streams run at once
  per client (a semaphore shared by all calls); fetch_experts spreads its refs over up to
  that many parallel streams.
- Blobs land straight in the caller's buffer when one is given (fetch_expert(out=...)),
  and assembled expert blobs are checked (format.check_blob: the blob's own seal) before
  they are returned, so bytes resumed from two replicas can never be silently mixed (and
  the dense file against the manifest, when this client has fetched it).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import grpc
import xxhash

from expert_store import format as blob_format
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as pb_grpc
from expert_store.errors import DataLoss, InvalidArgument, NotFound, StoreError, Unavailable, error_for_code
from expert_store.grpc_serving import tune_malloc
from expert_store.manifest import Manifest, Ref
from expert_store.store import ModelStore
from expert_store.wire import MAX_MESSAGE_BYTES, TOKEN_ENV

log = logging.getLogger("expert_store.client")

Pem = bytes | str | os.PathLike | None  # PEM bytes, or the path of a PEM file

PRIORITIES = {"demand": pb.DEMAND, "prefetch": pb.PREFETCH}
# A channel to a replica that went away retries its connection with exponential backoff up to
# this; failover keeps retrying UNAVAILABLE for RETRY_WINDOW_S, so a restarted replica is reached.
RECONNECT_BACKOFF_MAX_MS = 1_000
RETRY_WINDOW_S = 2.5
# The deadline of the Verify a client sends to a replica that served bad bytes (at most its
# deadline_s): the replica re-reads and hashes one blob; the call is best effort.
VERIFY_DEADLINE_S = 5.0
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")
# transport failures that surface as codes other than UNAVAILABLE: the stream broke, the
# request itself was fine
_BROKEN_STREAM_HINTS = ("rst_stream", "socket closed", "connection reset", "goaway", "stream removed",
                        "broken pipe", "end of stream", "connection closed", "failed to connect")


def _check_ref(ref: Any) -> Ref:
    try:
        layer, expert, precision = ref
    except (TypeError, ValueError):
        raise InvalidArgument(f"a ref is (layer, expert, precision), got {ref!r}") from None
    if isinstance(layer, bool) or isinstance(expert, bool) or not isinstance(layer, int) \
            or not isinstance(expert, int) or layer < 0 or expert < 0:
        raise InvalidArgument(f"layer and expert must be non-negative ints, got {ref!r}")
    if precision not in blob_format.PRECISIONS:
        raise InvalidArgument(f"unknown precision {precision!r}; expected one of {blob_format.PRECISIONS}")
    return layer, expert, precision


def _check_model(model: Any) -> str:
    try:
        return blob_format.validate_model_name(model)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def _writable(out: Any) -> memoryview:
    view = memoryview(out)
    if view.readonly:
        raise InvalidArgument("out must be a writable buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# --------------------------------------------------------------------------------------------
# rendezvous hashing


def rendezvous_score(key: str, replica: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{replica}\x00{key}".encode())


def rendezvous_order(key: str, replicas: Iterable[str]) -> list[str]:
    """Replicas by descending score for `key`: [owner, first fallback, ...]. Deterministic,
    independent of the input order; removing a replica changes only the keys it owned."""
    return sorted(replicas, key=lambda r: (-rendezvous_score(key, r), r))


# --------------------------------------------------------------------------------------------
# targets


def parse_replicas(target: str) -> list[str]:
    """'grpc://h1:p1,h2:p2' or 'h1:p1,h2:p2' -> ['h1:p1', 'h2:p2'] (ValueError if malformed)."""
    rest = target[len("grpc://"):] if target.startswith("grpc://") else target
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"no replica address in {target!r}")
    for p in parts:
        m = _HOST_PORT.match(p)
        if m is None or not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"bad replica address {p!r} in {target!r}: expected HOST:PORT")
    return list(dict.fromkeys(parts))


def is_remote_target(target: str) -> bool:
    """True for grpc://, dns:///, k8s://, local-shm:// and 'host:port[,host:port...]' (unless
    such a directory exists); False for a store directory."""
    if target.startswith(("grpc://", "dns:", "k8s://", "local-shm://")):
        return True
    if os.path.isdir(target):
        return False
    try:
        parse_replicas(target)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# the client


class StoreClient:
    """One API over a local store directory or remote replicas (see the module docstring).
    `StoreClient.open(target, ...)` picks the implementation."""

    @staticmethod
    def open(target: str | os.PathLike, *, token: str | None = None, tls_ca: Pem = None, tls_cert: Pem = None,
             tls_key: Pem = None,
             tls_server_name: str | None = None, deadline_s: float = 30.0, max_streams: int = 4,
             max_refs_per_call: int = 64, max_attempts: int | None = None, channels_per_replica: int | None = None,
             verify: bool = True, redis_url: str | None = None, ram_bytes: int = 0,
             discovery_timeout_s: float = 30.0) -> "StoreClient":
        """target: a store directory, "grpc://h:p,h:p", "h:p,h:p", "dns:///h:p" or "k8s://ns/svc:port".

        token: bearer token (default $EXPERT_STORE_TOKEN); tls_ca/tls_cert/tls_key: PEM bytes or
        file paths (TLS when tls_ca is given; mTLS with cert and key); deadline_s: per RPC
        attempt; max_streams: parallel streams of this client; redis_url/ram_bytes: tiers of an
        in-process store directory."""
        target = os.fspath(target)
        if target.startswith("local-shm://"):   # a co-located store's arena (expert_store/arena_client.py)
            from expert_store.arena_client import ArenaStoreClient

            if tls_ca or tls_cert or tls_key:
                raise InvalidArgument("a local-shm:// store's control port is loopback plaintext: no TLS options")
            return ArenaStoreClient.open_target(target, token=token, deadline_s=deadline_s)
        if not is_remote_target(target):
            if not Path(target).is_dir():
                raise NotFound(f"store directory {target} does not exist "
                               f"(or give a replica address: grpc://HOST:PORT)")
            return LocalStoreClient(ModelStore.open(target, redis_url=redis_url, ram_bytes=ram_bytes))
        client = GrpcStoreClient(
            [], token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name,
            deadline_s=deadline_s, max_streams=max_streams, max_refs_per_call=max_refs_per_call,
            max_attempts=max_attempts, channels_per_replica=channels_per_replica, verify=verify, target=target)
        try:
            if target.startswith(("dns:", "k8s://")):
                client.follow_discovery(target, timeout_s=discovery_timeout_s)
            else:
                client.set_replicas(parse_replicas(target))
        except ValueError as e:
            client.close()
            raise InvalidArgument(str(e)) from None
        except BaseException:
            client.close()
            raise
        return client

    # the API (both implementations)
    def manifest(self, model: str) -> Manifest:
        raise NotImplementedError

    def fetch_expert(self, model: str, layer: int, expert: int, precision: str, out: Any = None,
                     priority: str = "demand") -> bytes | bytearray | memoryview:
        raise NotImplementedError

    def fetch_experts(self, model: str, refs: Sequence[Ref], priority: str = "demand") -> Iterator[tuple[Ref, Any]]:
        raise NotImplementedError

    def fetch_expert_range(self, model: str, layer: int, expert: int, precision: str, start: int, end: int,
                           out: Any = None, priority: str = "demand") -> bytes | bytearray | memoryview:
        """Bytes [start, end) of an expert blob (into out[:end - start] when given): a part of a
        blob that several receivers fetch side by side. Unchecked: a blob's seal covers all of
        it, so whoever joins the parts checks the whole (format.decode_raw / check_blob).
        InvalidArgument for a range outside the blob or an `out` too small."""
        raise NotImplementedError

    def fetch_dense(self, model: str, out: Any = None) -> bytes | bytearray | memoryview:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "StoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


LOCAL_RANGE_CHUNK_BYTES = 8 << 20   # a store directory's range is copied out in pieces this large


class LocalStoreClient(StoreClient):
    """The embedded default: a store directory read in-process (no server)."""

    def __init__(self, store: ModelStore):
        self.store = store

    def manifest(self, model: str) -> Manifest:
        return self.store.manifest(_check_model(model))

    def fetch_expert(self, model, layer, expert, precision, out=None, priority="demand"):
        _check_priority(priority)
        layer, expert, precision = _check_ref((layer, expert, precision))
        if out is not None:   # read straight into the caller's buffer (no copy under the GIL)
            try:
                return self.store.expert_into(_check_model(model), layer, expert, precision, _writable(out))
            except ValueError as e:
                raise InvalidArgument(f"out is too small: {e}") from None
        blob = self.store.expert_blob(_check_model(model), layer, expert, precision)
        return _into(out, blob)

    def fetch_experts(self, model, refs, priority="demand"):
        _check_priority(priority)
        model = _check_model(model)
        refs = [_check_ref(r) for r in refs]
        for ref in refs:
            yield ref, self.store.expert_blob(model, *ref)

    def fetch_expert_range(self, model, layer, expert, precision, start, end, out=None, priority="demand"):
        # read from `start` as FetchExperts serves a resume (a large file: seeks there, hashes
        # only if it reaches the end), stopping at `end`: a part reads its own bytes
        _check_priority(priority)
        layer, expert, precision = _check_ref((layer, expert, precision))
        start, end = _check_range(start, end)
        with self.store.open_expert(_check_model(model), layer, expert, precision, offset=start,
                                    chunk_bytes=LOCAL_RANGE_CHUNK_BYTES) as reader:
            start, end = _check_range(start, end, reader.total)
            view = memoryview(bytearray(end - start)) if out is None else _writable(out)
            if len(view) < end - start:
                raise InvalidArgument(f"out holds {len(view)} bytes; the range has {end - start}")
            for offset, data, _ in reader:
                n = min(len(data), end - offset)
                view[offset - start:offset - start + n] = data[:n]
                if offset + n >= end:
                    break
        return view[:end - start]

    def fetch_dense(self, model, out=None):
        return _into(out, self.store.dense(_check_model(model)))

    def stat(self) -> dict:
        return {"local": {"models": self.store.models(), "tiers": self.store.stats()}}

    def close(self) -> None:
        self.store.close()


def _into(out: Any, blob: bytes) -> Any:
    if out is None:
        return blob
    view = _writable(out)
    if len(view) < len(blob):
        raise InvalidArgument(f"out holds {len(view)} bytes; the blob has {len(blob)}")
    view[: len(blob)] = blob
    return view[: len(blob)]


def _check_range(start: Any, end: Any, total: int | None = None) -> tuple[int, int]:
    """[start, end) as a non-empty range of ints, within a blob of `total` bytes when that is
    known; else InvalidArgument."""
    try:
        start, end = int(start), int(end)
    except (TypeError, ValueError):
        raise InvalidArgument(f"range [{start!r}, {end!r}) is not a pair of integers") from None
    if not 0 <= start < end:
        raise InvalidArgument(f"range [{start}, {end}) is not a non-empty range of byte offsets")
    if total is not None and end > total:
        raise InvalidArgument(f"range [{start}, {end}) is not inside the blob's {total} bytes")
    return start, end


def _check_priority(priority: str) -> int:
    try:
        return PRIORITIES[priority]
    except KeyError:
        raise InvalidArgument(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}") from None


# ---- replicas


class _Replica:
    """One server address: a few channels (separate TCP connections, so SO_REUSEPORT can
    spread one client's streams over a replica's worker processes)."""

    def __init__(self, address: str, make_channel, channels: int):
        self.address = address
        self.channels = [make_channel(address) for _ in range(channels)]
        self.stubs = [pb_grpc.ExpertStoreStub(c) for c in self.channels]
        self.inflight = [0] * channels
        self.suspect_until = 0.0
        self.retired = False
        self.closed = False
        self.lock = threading.Lock()

    def take(self) -> int | None:
        """Index of the least busy channel (None once this replica is closed)."""
        with self.lock:
            if self.closed:
                return None
            i = min(range(len(self.stubs)), key=self.inflight.__getitem__)
            self.inflight[i] += 1
            return i

    def give(self, i: int) -> None:
        with self.lock:
            self.inflight[i] -= 1
            idle = self.retired and not any(self.inflight)
        if idle:
            self.close()

    def close(self) -> None:
        with self.lock:
            self.closed = True
        for c in self.channels:
            c.close()


class _Blob:
    """One blob being received: resumable (received), into a caller buffer or its own."""

    __slots__ = ("ref", "key", "out", "buf", "received", "total", "done", "start")

    def __init__(self, ref: Ref | None, key: str, out: Any = None):
        self.ref, self.key = ref, key
        self.out = None if out is None else _writable(out)
        self.buf: Any = None
        self.received = 0
        self.total: int | None = None
        self.done = False
        self.start = 0  # the offset the current attempt resumed from (0: all bytes from one replica)

    @property
    def from_one_replica(self) -> bool:
        """Whether every byte received came from the replica of the current attempt."""
        return self.start == 0

    def reset(self) -> None:
        self.received, self.total, self.done = 0, None, False

    def accept(self, chunk: pb.BlobChunk) -> None:
        data = chunk.data  # read once: each access of a bytes field makes a new bytes object
        if chunk.total_size and self.total is not None and chunk.total_size != self.total:
            self.reset()  # another replica holds a different blob under this key: start over
            raise _BrokenStream(f"{self.key}: size changed between replicas")
        if self.total is None:
            if not chunk.total_size and chunk.offset == 0 and chunk.last and not data:
                self.total = 0
            elif not chunk.total_size:
                raise _BrokenStream(f"{self.key}: first chunk without total_size")
            else:
                self.total = chunk.total_size
            if self.out is not None:
                if len(self.out) < self.total:
                    raise InvalidArgument(f"out holds {len(self.out)} bytes; the blob has {self.total}")
                self.buf = self.out
            elif self.buf is None or len(self.buf) != self.total:
                self.buf = bytearray(self.total)
        if chunk.offset != self.received:
            raise _BrokenStream(f"{self.key}: chunk at {chunk.offset}, expected {self.received}")
        end = self.received + len(data)
        if end > self.total:
            raise _BrokenStream(f"{self.key}: more data than its total_size {self.total}")
        self.buf[self.received:end] = data  # the one copy, into the caller's buffer
        self.received = end
        if chunk.last:
            if self.received != self.total:
                raise _BrokenStream(f"{self.key}: last chunk at {self.received} of {self.total}")
            self.done = True

    def result(self) -> Any:
        if self.out is not None:
            return self.out[: self.total]
        return self.buf


class _BrokenStream(Exception):
    """The stream broke off or misbehaved: retry on the next replica, resuming."""


class _BadData(Exception):
    """The replica delivered a whole blob (every byte from it) that fails the client's check
    (the blob's seal, its ref, or the manifest's size/xxh3): its copy is bad although the
    server did not say so. That replica is not asked again in this call; it is sent
    ``verify`` (a pb.VerifyRequest naming the blob) first, so it re-checks and drops it."""

    def __init__(self, message: str, verify: pb.VerifyRequest | None = None):
        super().__init__(message)
        self.verify = verify


class GrpcStoreClient(StoreClient):
    def __init__(self, addresses: Sequence[str], *, token: str | None = None, tls_ca: Pem = None,
                 tls_cert: Pem = None, tls_key: Pem = None, tls_server_name: str | None = None,
                 deadline_s: float = 30.0, max_streams: int = 4, max_refs_per_call: int = 64,
                 max_attempts: int | None = None, channels_per_replica: int | None = None, verify: bool = True,
                 target: str | None = None):
        if max_streams < 1 or max_refs_per_call < 1 or deadline_s <= 0:
            raise InvalidArgument("max_streams, max_refs_per_call and deadline_s must be positive")
        self.target = target or ",".join(addresses)
        self.deadline_s = deadline_s
        self.max_streams = max_streams
        self.max_refs_per_call = max_refs_per_call
        self.max_attempts = max_attempts
        self.channels_per_replica = channels_per_replica or min(max_streams, 4)
        self.verify = verify
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = _channel_credentials(tls_ca, tls_cert, tls_key)
        tune_malloc()  # every received chunk is a fresh 1 MiB allocation (grpc_serving.tune_malloc)
        self._options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),  # each channel its own connection
            ("grpc.enable_retries", 0),  # retries are ours: they resume from an offset
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
        ]
        if tls_server_name:
            self._options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._lock = threading.Lock()
        self._replicas: dict[str, _Replica] = {}
        self._streams = threading.BoundedSemaphore(max_streams)
        self._pool = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="store-fetch")
        self._manifests: dict[str, Manifest] = {}
        self._missing_logged: set[tuple[str, str]] = set()  # (replica, model) warned about
        self._discovery = None
        self._closed = False
        if addresses:
            self.set_replicas(addresses)

    # ---- replica set

    def _make_channel(self, address: str) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(address, self._credentials, options=self._options)
        return grpc.insecure_channel(address, options=self._options)

    def set_replicas(self, addresses: Iterable[str]) -> None:
        """Replace the replica set (discovery calls this on every change). Connections to
        replicas that stay are kept; a removed one closes once its streams finish."""
        addresses = list(dict.fromkeys(addresses))
        with self._lock:
            if self._closed:
                return
            for gone in set(self._replicas) - set(addresses):
                replica = self._replicas.pop(gone)
                with replica.lock:
                    replica.retired = True
                    idle = not any(replica.inflight)
                if idle:
                    replica.close()
            for address in addresses:
                if address not in self._replicas:
                    self._replicas[address] = _Replica(address, self._make_channel, self.channels_per_replica)
        log.debug("store replicas: %s", ", ".join(addresses) or "-")

    def follow_discovery(self, target: str, timeout_s: float = 30.0) -> None:
        """Track a dns:/// or k8s:// target: the ring follows its ready set."""
        from expert_store.discovery import open_discovery

        self._discovery = open_discovery(target, on_change=self.set_replicas)
        self._discovery.wait_ready(timeout_s)

    def replicas(self) -> list[str]:
        with self._lock:
            return sorted(self._replicas)

    def _order(self, key: str) -> list[_Replica]:
        """Rendezvous order for key; replicas that failed recently go last."""
        with self._lock:
            replicas = dict(self._replicas)
        if not replicas:
            raise Unavailable(f"no store replica for {self.target}")
        now = time.monotonic()
        ordered = [replicas[a] for a in rendezvous_order(key, replicas)]
        return [r for r in ordered if r.suspect_until <= now] + [r for r in ordered if r.suspect_until > now]

    def _attempts(self, n_replicas: int) -> int:
        return self.max_attempts or max(3, 2 * n_replicas)

    # ---- retry loop shared by every RPC

    def _with_failover(self, key: str, attempt_fn, what: str, listed=None):
        """Run attempt_fn(stub, timeout) on the replicas in key's order until it returns;
        UNAVAILABLE / broken streams move on to the next replica (with backoff after a
        full round), anything else raises the matching StoreError. Unless max_attempts was
        given, rounds go on for at least RETRY_WINDOW_S: longer than a channel's reconnect
        backoff, so a replica that has just restarted is reached rather than given up on.

        Bad data (a DATA_LOSS status, or whole bytes that fail the client's check: _BadData)
        is an answer, not an outage: that replica is logged and not asked again in this
        call, and the next one is tried at once. When every replica of the set answered
        with bad data, or every one tried did and the attempts ran out, the call raises
        DataLoss naming the blob and each replica's reason; when some replica could not be
        reached (transport failures only) it raises Unavailable, which names the replicas
        that sent bad data too (see the module docstring).

        listed: for blob fetches, a callable -> (model, bool): whether the model's manifest
        lists the blob(s) still asked for. A NOT_FOUND for a listed blob is a replica
        inconsistency: that replica is logged (once per replica and model) and not asked
        again, and the next one is tried at once; when every replica lacked it the call
        raises NotFound naming the blob and the replicas. Without `listed`, or for a blob
        the manifest does not list, NOT_FOUND is raised at once."""
        order = self._order(key)
        attempts = self._attempts(len(order))
        window_end = time.monotonic() + (RETRY_WINDOW_S if self.max_attempts is None else 0.0)
        last = "no attempt made"
        bad: dict[str, str] = {}        # replica -> why its answer was bad data
        unreached: dict[str, str] = {}  # replica -> its last transport failure
        missing: dict[str, str] = {}    # replica -> its NOT_FOUND for a blob the manifest lists
        todo: list[_Replica] = []       # replicas left in this round
        attempt = rounds = 0
        while True:
            new_round = not todo
            if new_round:
                if rounds:
                    order = self._order(key)  # the set may have changed meanwhile (discovery)
                todo = [r for r in order if r.address not in bad and r.address not in missing]
                if not todo:
                    raise self._no_copy(what, bad, missing)
            if attempt >= attempts and time.monotonic() >= window_end:
                break
            if new_round:
                if rounds:  # backoff after a full round
                    time.sleep(min(1.0, 0.05 * 2 ** rounds) * random.uniform(0.5, 1.0))
                rounds += 1
            attempt += 1
            replica = todo.pop(0)
            i = replica.take()
            if i is None:  # left the set meanwhile
                last = f"{replica.address}: removed from the replica set"
                continue
            try:
                result = attempt_fn(replica.stubs[i], self.deadline_s)
                replica.suspect_until = 0.0
                return result
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DATA_LOSS:
                    # this replica's copy failed the server's own integrity check
                    self._note_bad(what, replica.address, f"DATA_LOSS {e.details()}", bad, unreached)
                    continue
                if e.code() == grpc.StatusCode.NOT_FOUND and listed is not None:
                    model, is_listed = listed()
                    if is_listed:
                        # the manifest lists it: this replica is inconsistent, another may have it
                        self._note_missing(what, model, replica.address, e.details() or "NOT_FOUND",
                                           missing, unreached)
                        continue
                if not _retryable(e):
                    raise _store_error(e, replica.address) from None
                last = f"{replica.address}: {e.code().name} {e.details()}"
            except _BadData as e:
                # the server served bytes it believes good (e.g. a file it checked once at rest
                # that rotted since under an unchanged stat): only the client saw it, so it
                # tells the replica (Verify: re-check, drop the bad copy) before failing over
                told = self._tell_replica(replica.stubs[i], replica.address, e.verify, what)
                self._note_bad(what, replica.address, f"served bad bytes: {e}{told}", bad, unreached)
                continue
            except _BrokenStream as e:
                last = f"{replica.address}: broken stream ({e})"
            finally:
                replica.give(i)
            unreached[replica.address] = last
            replica.suspect_until = time.monotonic() + 2.0
            more = attempt < attempts or time.monotonic() < window_end
            log.warning("%s: %s; %s", what, last, "failing over" if more else "giving up")
        if (bad or missing) and not unreached:  # the only answers were bad data / NOT_FOUND
            raise self._no_copy(what, bad, missing, tried=True)
        also = ("; bad data from " + "; ".join(f"{a}: {why}" for a, why in bad.items())) if bad else ""
        if missing:
            also += "; the blob the manifest lists is missing on " + "; ".join(
                f"{a}: {why}" for a, why in missing.items())
        raise Unavailable(f"{what}: no replica answered after {attempt} attempts (last: {last}){also}")

    @staticmethod
    def _no_copy(what: str, bad: dict, missing: dict, tried: bool = False) -> StoreError:
        """Every replica (tried) answered bad data or NOT_FOUND for a listed blob."""
        every = "every replica tried" if tried else "every replica"
        if not bad:
            return NotFound(f"{what}: {every} lacks this blob although the manifest lists it: "
                            + "; ".join(f"{a}: NOT_FOUND {why}" for a, why in missing.items()))
        also = ("; the blob is missing on " + "; ".join(f"{a}: NOT_FOUND {why}" for a, why in missing.items())
                if missing else "")
        return DataLoss(f"{what}: {every} answered with bad data, none has a good copy: "
                        + "; ".join(f"{a}: {why}" for a, why in bad.items()) + also)

    def _note_missing(self, what: str, model: str, address: str, why: str, missing: dict,
                      unreached: dict) -> None:
        missing[address] = why
        unreached.pop(address, None)
        with self._lock:
            first = (address, model) not in self._missing_logged
            self._missing_logged.add((address, model))
        # once per replica and model: a replica that lacks one blob usually lacks many
        log.log(logging.WARNING if first else logging.DEBUG,
                "%s: replica %s answered NOT_FOUND (%s) for a blob the manifest of %s lists: that "
                "replica's store is inconsistent (incomplete pack or replaced disk? run `expert-store "
                "verify` on it); fetching from the next replica", what, address, why, model)

    def _listed(self, model: str, refs=None, dense: bool = False) -> tuple[str, bool]:
        """(model, whether the model's manifest lists every one of refs / the dense file).
        Uses the manifest this client holds; fetches it once when it has none (an unknown
        model's manifest is NOT_FOUND too: then nothing is listed)."""
        m = self._manifests.get(model)
        if m is None:
            try:
                m = self.manifest(model)
            except StoreError:
                return model, False
        if dense:
            return model, m.dense_size > 0
        refs = list(refs or ())
        return model, bool(refs) and all(r in m.blobs for r in refs)

    def _tell_replica(self, stub: pb_grpc.ExpertStoreStub, address: str, request: pb.VerifyRequest | None,
                      what: str) -> str:
        """Send Verify for a blob the replica served bad: it re-checks every copy, forgets
        its "checked" mark and removes a bad copy. Best effort, with a short deadline: a
        failure is logged, never raised. Returns a note for the caller's message."""
        if request is None:
            return ""
        try:
            reply = stub.Verify(request, timeout=min(self.deadline_s, VERIFY_DEADLINE_S), metadata=self._metadata)
        except grpc.RpcError as e:
            log.warning("%s: Verify on replica %s failed: %s %s", what, address,
                        e.code().name if e.code() is not None else "UNKNOWN", e.details())
            return " (Verify failed)"
        except Exception as e:  # noqa: BLE001 - best effort: never fail the fetch over it
            log.warning("%s: Verify on replica %s failed: %s", what, address, e)
            return " (Verify failed)"
        outcome = "dropped its copy" if reply.dropped else "found it good" if reply.good else "found it bad"
        log.warning("%s: Verify on replica %s %s: %s", what, address, outcome, reply.detail)
        return f" (Verify: {outcome})"

    @staticmethod
    def _note_bad(what: str, address: str, why: str, bad: dict, unreached: dict) -> None:
        bad[address] = why
        unreached.pop(address, None)
        log.warning("%s: replica %s %s; not asking it again in this call (run `expert-store verify` on its "
                    "store: that replica's copy needs repair)", what, address, why)

    # ---- API

    def manifest(self, model: str) -> Manifest:
        model = _check_model(model)
        request = pb.GetManifestRequest(model=model)
        reply = self._with_failover(
            f"{model}/manifest.json",
            lambda stub, timeout: stub.GetManifest(request, timeout=timeout, metadata=self._metadata),
            f"GetManifest({model})")
        m = Manifest.from_proto(reply)
        self._manifests[model] = m
        return m

    def fetch_expert(self, model, layer, expert, precision, out=None, priority="demand"):
        prio = _check_priority(priority)
        model = _check_model(model)
        ref = _check_ref((layer, expert, precision))
        item = _Blob(ref, blob_format.expert_key(model, *ref), out)
        self._stream_experts(model, [item], prio, threading.Event())
        return item.result()

    def fetch_expert_range(self, model, layer, expert, precision, start, end, out=None, priority="demand"):
        """FetchExperts from `start` (the offset a resume sends), cancelled once `end` is in;
        a broken stream resumes where it stopped, on the next replica."""
        prio = _check_priority(priority)
        model = _check_model(model)
        ref = _check_ref((layer, expert, precision))
        start, end = _check_range(start, end)       # the blob's size comes with its first chunk
        key = blob_format.expert_key(model, *ref)
        buf = _writable(out) if out is not None else bytearray(end - start)
        if len(buf) < end - start:
            raise InvalidArgument(f"out holds {len(buf)} bytes; the range has {end - start}")
        state = {"got": start}                  # absolute offset of the next byte wanted

        def attempt(stub, timeout):
            at = state["got"]
            request = pb.FetchExpertsRequest(model=model, priority=prio, refs=[
                pb.ExpertRef(layer=ref[0], expert=ref[1], precision=ref[2], offset=at)])
            with self._streams:
                call = stub.FetchExperts(request, timeout=timeout, metadata=self._metadata)
                try:
                    for chunk in call:
                        data = chunk.data        # read once: each access makes a new bytes object
                        if chunk.total_size:
                            _check_range(start, end, chunk.total_size)
                        if chunk.offset != state["got"]:
                            raise _BrokenStream(f"{key}: chunk at {chunk.offset}, expected {state['got']}")
                        take = min(len(data), end - state["got"])
                        pos = state["got"] - start
                        buf[pos:pos + take] = memoryview(data)[:take]
                        state["got"] += take
                        if state["got"] >= end:
                            call.cancel()        # the rest of the blob is another receiver's part
                            return
                        if chunk.last:
                            raise _BrokenStream(f"{key}: the blob ended at {state['got']}, before {end}")
                except BaseException:
                    call.cancel()
                    raise
            raise _BrokenStream(f"{key}: the stream ended at {state['got']}, before {end}")

        self._with_failover(key, attempt, f"FetchExperts({key}[{start}:{end}])",
                            listed=lambda: self._listed(model, [ref]))
        return memoryview(buf)[:end - start] if out is not None else buf

    def fetch_experts(self, model, refs, priority="demand"):
        """Yields (ref, blob) for every ref as each blob completes (completion order), using
        up to max_streams parallel streams, each to the ref's rendezvous owner."""
        prio = _check_priority(priority)
        model = _check_model(model)
        items = [_Blob(r, blob_format.expert_key(model, *r)) for r in (_check_ref(r) for r in refs)]
        if not items:
            return
        batches = self._plan(items)
        results: queue.Queue = queue.Queue()
        cancel = threading.Event()

        def run(batch: list[_Blob]) -> None:
            try:
                self._stream_experts(model, batch, prio, cancel, on_done=results.put)
            except BaseException as e:  # handed to the consumer
                results.put(e)

        for batch in batches:
            self._pool.submit(run, batch)
        try:
            for _ in range(len(items)):
                got = results.get()
                if isinstance(got, BaseException):
                    raise got
                yield got.ref, got.result()
        finally:
            cancel.set()

    def _plan(self, items: list[_Blob]) -> list[list[_Blob]]:
        """Group blobs by owner replica, then split into at most max_streams streams of at
        most max_refs_per_call refs, keeping each stream on one owner."""
        groups: dict[str, list[_Blob]] = {}
        for it in items:
            groups.setdefault(self._order(it.key)[0].address, []).append(it)
        share = max(1, self.max_streams // len(groups))
        batches = []
        for group in groups.values():
            n = max(min(share, len(group)), -(-len(group) // self.max_refs_per_call))
            batches.extend(group[i::n] for i in range(n))
        return batches

    def _stream_experts(self, model: str, items: list[_Blob], prio: int, cancel: threading.Event,
                        on_done=lambda it: None) -> None:
        """Receive items over FetchExperts with failover and resume; on_done(it) as each completes."""

        def attempt(stub, timeout):
            pending = [it for it in items if not it.done]
            if not pending:   # the last attempt got every blob, then its stream broke: done
                return
            for it in pending:
                it.start = it.received
            request = pb.FetchExpertsRequest(model=model, priority=prio, refs=[
                pb.ExpertRef(layer=it.ref[0], expert=it.ref[1], precision=it.ref[2], offset=it.received)
                for it in pending])
            with self._streams:
                call = stub.FetchExperts(request, timeout=timeout, metadata=self._metadata)
                try:
                    for chunk in call:
                        if cancel.is_set():
                            call.cancel()
                            return
                        if chunk.index >= len(pending):
                            raise _BrokenStream(f"chunk for ref {chunk.index} of {len(pending)}")
                        it = pending[chunk.index]
                        it.accept(chunk)
                        if it.done:
                            self._check_expert(it, model)
                            on_done(it)
                except BaseException:
                    call.cancel()
                    raise
            if any(not it.done for it in pending):
                raise _BrokenStream("the stream ended before every blob was complete")

        what = f"FetchExperts({items[0].key})" if len(items) == 1 else f"FetchExperts({model}, {len(items)} blobs)"
        self._with_failover(items[0].key, attempt, what, listed=lambda: self._listed(
            model, [it.ref for it in items if not it.done]))

    def _check_expert(self, it: _Blob, model: str) -> None:
        if not self.verify:
            return
        whole = it.from_one_replica

        def verify_request() -> pb.VerifyRequest:   # built only for a bad blob, off the fetch path
            return pb.VerifyRequest(model=model, ref=pb.ExpertRef(layer=it.ref[0], expert=it.ref[1],
                                                                  precision=it.ref[2]))
        try:
            header = blob_format.check_blob(memoryview(it.buf)[: it.total])
        except blob_format.BlobError as e:
            it.reset()  # refetch from 0 elsewhere
            if whole:  # every byte came from this replica: its copy is bad
                raise _BadData(f"{it.key} failed its seal check ({e})", verify_request()) from None
            # resumed bytes from two replicas did not fit together: neither is to blame yet
            raise _BrokenStream(f"{it.key} failed its integrity check after a resume ({e})") from None
        if (header.layer, header.expert, header.precision) != it.ref:
            it.reset()
            raise _BadData(f"{it.key}: the server sent L{header.layer} E{header.expert} {header.precision}", verify_request())

    def fetch_dense(self, model: str, out: Any = None):
        """The model's dense safetensors bytes (into `out` when given), resumable; checked
        against the manifest's size and xxh3 when this client has fetched the manifest."""
        model = _check_model(model)
        item = _Blob(None, blob_format.dense_key(model), out)

        def attempt(stub, timeout):
            item.start = item.received
            with self._streams:
                call = stub.FetchDense(pb.FetchDenseRequest(model=model, offset=item.received),
                                       timeout=timeout, metadata=self._metadata)
                try:
                    for chunk in call:
                        item.accept(chunk)
                except BaseException:
                    call.cancel()
                    raise
            if not item.done:
                raise _BrokenStream("the stream ended before the last chunk")
            m = self._manifests.get(model)
            if self.verify and m is not None and m.dense_xxh3:
                data = memoryview(item.buf)[: item.total]
                if len(data) != m.dense_size or blob_format.blob_checksum(data) != m.dense_xxh3:
                    whole = item.from_one_replica
                    item.reset()  # refetch from 0 elsewhere
                    if whole:
                        raise _BadData(f"{item.key}: size/xxh3 do not match the manifest",
                                       pb.VerifyRequest(model=model, dense=True))
                    raise _BrokenStream(f"{item.key}: size/xxh3 do not match the manifest after a resume")

        self._with_failover(item.key, attempt, f"FetchDense({model})",
                            listed=lambda: self._listed(model, dense=True))
        return item.result()

    def put(self, model: str, kind: str, data: Any, *, layer: int = 0, expert: int = 0, precision: str = "",
            chunk_bytes: int = 1 << 20, timeout_s: float | None = None) -> tuple[str, int]:
        """Upload one file (PutBlob) to the key's owner replica; returns (key, size). The
        server makes it visible only once complete and its xxh3 matches. timeout_s: the
        deadline of each attempt (default deadline_s; a large file needs longer)."""
        model = _check_model(model)
        view = memoryview(data).cast("B")
        header = pb.PutBlobHeader(model=model, kind=kind, layer=layer, expert=expert, precision=precision,
                                  total_size=len(view), xxh3=xxhash.xxh3_128_hexdigest(view))

        def messages():
            yield pb.PutBlobChunk(header=header)
            for off in range(0, len(view), chunk_bytes):
                yield pb.PutBlobChunk(data=bytes(view[off:off + chunk_bytes]))

        def attempt(stub, timeout):
            with self._streams:
                return stub.PutBlob(messages(), timeout=timeout if timeout_s is None else timeout_s,
                                    metadata=self._metadata)

        try:
            key = (blob_format.expert_key(model, layer, expert, precision) if kind == "expert"
                   else blob_format.dense_key(model) if kind == "dense" else f"{model}/{kind}")
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        reply = self._with_failover(key, attempt, f"PutBlob({model}, {kind})")
        return reply.key, reply.size

    def call(self, key: str, rpc, what: str) -> Any:
        """Run ``rpc(stub, timeout, metadata)`` on key's replicas with this client's failover,
        per-attempt deadline and auth, for RPCs the methods above do not wrap (expert_store.pack
        probes a replica's blobs with ranged FetchExperts/FetchDense). Raises like them."""
        return self._with_failover(key, lambda stub, timeout: rpc(stub, timeout, self._metadata), what)

    def stat(self) -> dict[str, dict]:
        """Stat of every replica: {address: {"models", "active_streams", "tiers"}} (or {"error"})."""
        out = {}
        for address in self.replicas():
            replica = self._replicas.get(address)
            if replica is None:
                continue
            try:
                r = replica.stubs[0].Stat(pb.StatRequest(), timeout=self.deadline_s, metadata=self._metadata)
            except grpc.RpcError as e:
                out[address] = {"error": f"{e.code().name}: {e.details()}"}
                continue
            out[address] = {"models": list(r.models), "active_streams": r.active_streams,
                            "tiers": {t.name: {"hits": t.hits, "misses": t.misses, "bytes_read": t.bytes_read,
                                               "bytes_written": t.bytes_written, "errors": t.errors,
                                               "mean_read_latency_ms": t.mean_read_latency_ms} for t in r.tiers}}
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            replicas = list(self._replicas.values())
            self._replicas.clear()
        if self._discovery is not None:
            self._discovery.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for r in replicas:
            r.close()


def _retryable(e: grpc.RpcError) -> bool:
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
        details = (e.details() or "").lower()
        return any(h in details for h in _BROKEN_STREAM_HINTS) or code == grpc.StatusCode.CANCELLED
    return False


def _store_error(e: grpc.RpcError, address: str) -> StoreError:
    code = e.code()
    name = code.name if code is not None else "UNKNOWN"
    return error_for_code(name, f"{e.details()} (from {address})")


def _pem(value: Pem, what: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read {what} {value}: {e.strerror or e}") from None


def _channel_credentials(tls_ca: Pem, tls_cert: Pem, tls_key: Pem) -> grpc.ChannelCredentials | None:
    if tls_ca is None and tls_cert is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("a client certificate (mTLS) needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca, "TLS CA"),
                                        private_key=_pem(tls_key, "TLS key"),
                                        certificate_chain=_pem(tls_cert, "TLS certificate"))


__all__ = [
    "StoreClient",
    "LocalStoreClient",
    "GrpcStoreClient",
    "Manifest",
    "Ref",
    "rendezvous_order",
    "rendezvous_score",
    "parse_replicas",
    "is_remote_target",
]
