"""RedisTier: blobs in Redis (single server or Redis Cluster, same code path).

Layout of one blob stored under store key K (all keys share the hash tag ``{K}``, so a
blob lives on one cluster slot and every pipeline touches one node):

    <prefix>:{K}:meta          HASH  size, chunks, chunk_size, xxh3 (xxh3-128 of the blob), gen
    <prefix>:{K}:<gen>:<i>     STRING chunk i (chunk_size bytes, the last one shorter)

``gen`` is a random token per write: the chunks of a write are SET first, the meta HASH
last (one HSET, so readers see the old or the new version), then the previous
generation's chunks are removed. A reader that finds a chunk missing (evicted, a writer
that died half-way, an overwrite racing the read) or a checksum mismatch treats the blob
as a miss and removes the debris; the meta is only removed if it still names the
generation that was found broken (WATCH/MULTI through redis-py's ``transaction``).

Redis is a cache here: when it is unreachable every call degrades to a miss (get) or a
no-op (put/delete), with a rate-limited warning, and the tier stops trying for
``retry_after_s`` so a dead server costs nothing on the request path.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from urllib.parse import unquote, urlsplit, urlunsplit

import redis as redis_py
import xxhash
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from expert_store.tiers.base import TierStats, check_key

log = logging.getLogger(__name__)

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_FAILURES = (RedisError, RedisClusterException, OSError)


def parse_redis_url(url: str, cluster: bool | None = None) -> tuple[str, bool]:
    """Split a tier URL into (plain redis URL, is_cluster). ``redis+cluster://`` and
    ``rediss+cluster://`` select Redis Cluster; ``cluster=True`` forces it for any URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    is_cluster = False
    if scheme in CLUSTER_SCHEMES:
        is_cluster = True
        parts = parts._replace(scheme=CLUSTER_SCHEMES[scheme])
    elif scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} in {url!r}")
    if cluster is not None:
        is_cluster = bool(cluster)
    return urlunsplit(parts), is_cluster


class RedisTier:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        chunk_size: int = 1 << 20,
        prefix: str = "adapmoe",
        cluster: bool | None = None,
        socket_timeout: float = 1.0,
        connect_timeout: float = 0.25,
        retry_after_s: float = 1.0,
        warn_every_s: float = 30.0,
        pipeline_bytes: int = 32 << 20,
        ttl_s: int | None = None,
        password: str | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.url, self.cluster = parse_redis_url(url, cluster)
        self.chunk_size = int(chunk_size)
        self.prefix = prefix
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.retry_after_s = retry_after_s
        self.warn_every_s = warn_every_s
        self.ttl_s = ttl_s
        self._password = password or None  # a password in the URL wins
        self._chunks_per_batch = max(1, pipeline_bytes // self.chunk_size)
        self._client_obj = None
        self._client_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._down_until = 0.0
        self._last_warning = -float("inf")
        self._suppressed = 0
        self._was_down = False
        self._debris_removed = 0
        self._stats = TierStats()

    # -- connection ----------------------------------------------------------------------
    def _make_client(self):
        common = dict(
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.connect_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        if self._password is not None:
            common["password"] = self._password  # from_url lets the URL's own password override it
        if not self.cluster:
            return redis_py.Redis.from_url(self.url, **common)
        parts = urlsplit(self.url)
        hosts = parts.netloc.rsplit("@", 1)[-1].split(",")
        if len(hosts) == 1:
            return RedisCluster.from_url(self.url, **common)
        nodes = []
        for hp in hosts:
            host, _, port = hp.rpartition(":")
            nodes.append(ClusterNode(host or "127.0.0.1", int(port or 6379)))
        auth = {}
        if parts.username:
            auth["username"] = unquote(parts.username)
        if parts.password:
            auth["password"] = unquote(parts.password)
        return RedisCluster(startup_nodes=nodes, ssl=parts.scheme == "rediss", **{**common, **auth})

    def _client(self):
        client = self._client_obj
        if client is None:
            with self._client_lock:
                if self._client_obj is None:
                    # RedisCluster connects (discovers slots) here; plain Redis lazily.
                    self._client_obj = self._make_client()
                client = self._client_obj
        return client

    @property
    def available(self) -> bool:
        """False while the tier is backing off after a failure."""
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self._stats.error()
        now = time.monotonic()
        with self._state_lock:
            self._down_until = now + self.retry_after_s
            self._was_down = True
            if now - self._last_warning >= self.warn_every_s:
                extra = f" ({self._suppressed} similar warnings suppressed)" if self._suppressed else ""
                self._last_warning = now
                self._suppressed = 0
                log.warning(
                    "redis tier %s unavailable during %s: %s: %s; serving without it, retrying in %.1fs%s",
                    self._safe_url(), what, type(exc).__name__, exc, self.retry_after_s, extra,
                )
            else:
                self._suppressed += 1
        if self.cluster:
            # let the next attempt rediscover the cluster from scratch
            with self._client_lock:
                old, self._client_obj = self._client_obj, None
            if old is not None:
                try:
                    old.close()
                except Exception:  # noqa: BLE001 - closing a broken client must not fail a request
                    pass

    def _succeeded(self) -> None:
        if self._was_down:
            with self._state_lock:
                if self._was_down:
                    self._was_down = False
                    log.warning("redis tier %s reachable again", self._safe_url())

    def _safe_url(self) -> str:
        parts = urlsplit(self.url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        scheme = parts.scheme + ("+cluster" if self.cluster else "")
        return f"{scheme}://{netloc}"

    # -- key layout ----------------------------------------------------------------------
    def meta_key(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}:meta"

    def chunk_key(self, key: str, gen: str, index: int) -> str:
        return f"{self.prefix}:{{{key}}}:{gen}:{index}"

    @staticmethod
    def _parse_meta(raw: dict) -> tuple[int, int, str, str] | None:
        try:
            size = int(raw[b"size"])
            chunks = int(raw[b"chunks"])
            digest = raw[b"xxh3"].decode("ascii")
            gen = raw[b"gen"].decode("ascii")
        except (KeyError, ValueError, UnicodeDecodeError):
            return None
        if size < 0 or chunks < 0 or not gen:
            return None
        return size, chunks, digest, gen

    # -- Tier protocol -------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        check_key(key)
        t0 = time.perf_counter()
        if not self.available:
            self._stats.miss(time.perf_counter() - t0)
            return None
        try:
            data = self._get(key)
        except _FAILURES as exc:
            self._failed("get", exc)
            data = None
        else:
            self._succeeded()
        dt = time.perf_counter() - t0
        if data is None:
            self._stats.miss(dt)
        else:
            self._stats.hit(len(data), dt)
        return data

    def _get(self, key: str) -> bytes | None:
        client = self._client()
        raw_meta = client.hgetall(self.meta_key(key))
        if not raw_meta:
            return None
        meta = self._parse_meta(raw_meta)
        if meta is None:
            self._remove_debris(key, None, 0, reason="malformed metadata")
            return None
        size, chunks, digest, gen = meta
        parts: list[bytes] = []
        for start in range(0, chunks, self._chunks_per_batch):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(chunks, start + self._chunks_per_batch)):
                pipe.get(self.chunk_key(key, gen, i))
            got = pipe.execute()
            if any(part is None for part in got):
                self._remove_debris(key, gen, chunks, reason="chunks missing")
                return None
            parts.extend(got)
        data = b"".join(parts)
        if len(data) != size or xxhash.xxh3_128_hexdigest(data) != digest:
            self._remove_debris(key, gen, chunks, reason="checksum mismatch")
            return None
        return data

    def _remove_debris(self, key: str, gen: str | None, chunks: int, *, reason: str) -> None:
        """Delete a broken blob: its meta only if it still names ``gen`` (a concurrent
        writer may have replaced it), and the chunks of ``gen`` (garbage either way)."""
        self._stats.error()
        with self._state_lock:
            self._debris_removed += 1
        log.info("redis tier: dropping %s (%s)", key, reason)
        client = self._client()
        meta_key = self.meta_key(key)

        def drop_meta_if_same(pipe) -> None:
            current = pipe.hget(meta_key, "gen")
            pipe.multi()
            if gen is None or (current is not None and current.decode("ascii", "replace") == gen):
                pipe.delete(meta_key)

        client.transaction(drop_meta_if_same, meta_key)
        if gen is not None and chunks:
            self._delete_chunks(client, key, gen, chunks)

    def _delete_chunks(self, client, key: str, gen: str, chunks: int) -> None:
        for start in range(0, chunks, 1024):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(chunks, start + 1024)):
                pipe.unlink(self.chunk_key(key, gen, i))
            pipe.execute()

    def put(self, key: str, data) -> None:
        """Store ``data`` under ``key``; a no-op (with a warning) when Redis is away."""
        check_key(key)
        if not self.available:
            return
        view = memoryview(data).cast("B")
        gen = secrets.token_hex(6)
        chunks = (len(view) + self.chunk_size - 1) // self.chunk_size
        written = False
        try:
            client = self._client()
            meta_key = self.meta_key(key)
            for start in range(0, chunks, self._chunks_per_batch):
                pipe = client.pipeline(transaction=False)
                for i in range(start, min(chunks, start + self._chunks_per_batch)):
                    piece = view[i * self.chunk_size : (i + 1) * self.chunk_size]
                    pipe.set(self.chunk_key(key, gen, i), piece.tobytes(), ex=self.ttl_s)
                pipe.execute()
            meta = {
                "size": len(view),
                "chunks": chunks,
                "chunk_size": self.chunk_size,
                "xxh3": xxhash.xxh3_128_hexdigest(view),
                "gen": gen,
            }

            def swap_meta(pipe):
                # WATCHed: the generation read here is exactly the one this HSET replaces,
                # so its chunks (and only those) can be removed afterwards.
                replaced = pipe.hmget(meta_key, ["gen", "chunks"])
                pipe.multi()
                pipe.hset(meta_key, mapping=meta)
                if self.ttl_s:
                    pipe.expire(meta_key, self.ttl_s)
                return replaced

            old_gen, old_chunks = client.transaction(swap_meta, meta_key, value_from_callable=True)
            written = True
            if old_gen is not None and old_chunks is not None:
                self._delete_chunks(client, key, old_gen.decode("ascii", "replace"), int(old_chunks))
        except _FAILURES as exc:
            self._failed("put", exc)
            if not written:
                try:  # best effort: do not leave this write's chunks behind
                    self._delete_chunks(self._client(), key, gen, chunks)
                except _FAILURES:
                    pass
            return
        self._succeeded()
        self._stats.wrote(len(view))

    def delete(self, key: str) -> None:
        check_key(key)
        if not self.available:
            return
        try:
            client = self._client()
            meta_key = self.meta_key(key)
            gen, chunks = client.hmget(meta_key, ["gen", "chunks"])
            client.delete(meta_key)
            if gen is not None and chunks is not None:
                self._delete_chunks(client, key, gen.decode("ascii", "replace"), int(chunks))
        except _FAILURES as exc:
            self._failed("delete", exc)
            return
        self._succeeded()

    def contains(self, key: str) -> bool:
        check_key(key)
        if not self.available:
            return False
        try:
            found = bool(self._client().exists(self.meta_key(key)))
        except _FAILURES as exc:
            self._failed("contains", exc)
            return False
        self._succeeded()
        return found

    def ping(self) -> bool:
        """True when Redis answers now (ignores the back-off)."""
        try:
            ok = bool(self._client().ping())
        except _FAILURES as exc:
            self._failed("ping", exc)
            return False
        with self._state_lock:
            self._down_until = 0.0
        self._succeeded()
        return ok

    def stats(self) -> dict:
        s = self._stats.snapshot()
        s.update(available=self.available, debris_removed=self._debris_removed, cluster=self.cluster)
        return s

    def close(self) -> None:
        with self._client_lock:
            client, self._client_obj = self._client_obj, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass

    def __repr__(self) -> str:
        return f"RedisTier({self._safe_url()!r}, chunk_size={self.chunk_size})"
