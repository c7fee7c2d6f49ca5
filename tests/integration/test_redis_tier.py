"""RedisTier and TieredStore against a real redis-server and a real 3-node Redis Cluster."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import redis

from expert_store import format as fmt
from expert_store.store import ModelStore
from expert_store.tiers import MemoryTier, NvmeTier, RedisTier, TieredStore, parse_redis_url
from store_model import MODEL, make_blob, write_model

KEY = "m/experts/L002/E005.int4.blob"


def redis_keys(server) -> list[bytes]:
    with server.client() as c:
        return sorted(c.keys("*"))


def test_parse_redis_url():
    assert parse_redis_url("redis://h:1/0") == ("redis://h:1/0", False)
    assert parse_redis_url("redis+cluster://h:1") == ("redis://h:1", True)
    assert parse_redis_url("rediss+cluster://u:p@h:1") == ("rediss://u:p@h:1", True)
    assert parse_redis_url("redis://h:1", cluster=True) == ("redis://h:1", True)
    with pytest.raises(ValueError):
        parse_redis_url("http://h:1")


def test_round_trip_chunking_and_overwrite(redis_server):
    tier = RedisTier(redis_server.url, chunk_size=1000)
    data = os.urandom(5500)
    tier.put(KEY, data)
    assert tier.get(KEY) == data
    keys = redis_keys(redis_server)
    assert len(keys) == 7  # 6 chunks + meta, all under the blob's hash tag
    assert all(k.startswith(b"adapmoe:{" + KEY.encode() + b"}:") for k in keys)
    with redis_server.client() as c:
        meta = c.hgetall(tier.meta_key(KEY))
    assert int(meta[b"size"]) == 5500 and int(meta[b"chunks"]) == 6
    # overwrite with a shorter value: the old generation's chunks are gone
    tier.put(KEY, b"short")
    assert tier.get(KEY) == b"short"
    assert len(redis_keys(redis_server)) == 2
    tier.put("m/empty.blob", b"")
    assert tier.get("m/empty.blob") == b""
    assert tier.contains(KEY) and not tier.contains("m/nothing")
    assert tier.get("m/nothing") is None
    tier.delete(KEY)
    tier.delete("m/empty.blob")
    assert redis_keys(redis_server) == [] and tier.get(KEY) is None
    s = tier.stats()
    assert s["hits"] == 3 and s["misses"] == 2 and s["bytes_read"] == 5500 + 5 and s["errors"] == 0


def test_missing_chunk_is_a_miss_and_debris_is_removed(redis_server):
    tier = RedisTier(redis_server.url, chunk_size=100)
    tier.put(KEY, os.urandom(1000))
    with redis_server.client() as c:
        chunk = [k for k in c.keys("*") if k.endswith(b":4")]
        assert len(chunk) == 1
        c.delete(chunk[0])  # e.g. evicted by maxmemory
    assert tier.get(KEY) is None
    assert redis_keys(redis_server) == []  # meta and the surviving chunks cleaned up
    assert tier.stats()["debris_removed"] == 1


def test_corrupted_chunk_is_a_miss_and_debris_is_removed(redis_server):
    tier = RedisTier(redis_server.url, chunk_size=100)
    data = os.urandom(350)
    tier.put(KEY, data)
    with redis_server.client() as c:
        k = [k for k in c.keys("*") if k.endswith(b":1")][0]
        c.setrange(k, 7, b"\xff\x00")
    assert tier.get(KEY) is None
    assert redis_keys(redis_server) == []


def test_meta_without_chunks_from_a_dead_writer(redis_server):
    tier = RedisTier(redis_server.url)
    with redis_server.client() as c:
        c.hset(tier.meta_key(KEY), mapping={"size": 10, "chunks": 1, "xxh3": "0" * 32, "gen": "dead"})
        c.hset(tier.meta_key("m/garbled"), mapping={"size": "x"})
    assert tier.get(KEY) is None and tier.get("m/garbled") is None
    assert redis_keys(redis_server) == []


def test_concurrent_writers_and_readers_never_see_a_mix(redis_server):
    """Two versions written over each other while readers read: a reader gets one whole
    version or a miss, never bytes of both."""
    tier = RedisTier(redis_server.url, chunk_size=512)
    versions = [bytes([v]) * 5000 for v in (1, 2)]
    tier.put(KEY, versions[0])
    stop = threading.Event()
    seen: list = []

    def writer(v):
        while not stop.is_set():
            tier.put(KEY, versions[v])

    def reader():
        while not stop.is_set():
            seen.append(tier.get(KEY))

    threads = [threading.Thread(target=writer, args=(v,)) for v in (0, 1)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert seen and all(s is None or s in versions for s in seen)
    assert any(s is not None for s in seen)
    # racing writers leak nothing: only the meta and the chunks of the generation it names
    with redis_server.client() as c:
        gen = c.hget(tier.meta_key(KEY), "gen").decode()
    expected = {tier.meta_key(KEY).encode()} | {tier.chunk_key(KEY, gen, i).encode() for i in range(10)}
    assert set(redis_keys(redis_server)) == expected
    assert tier.get(KEY) in versions


def test_redis_down_is_a_miss_with_a_rate_limited_warning(redis_server, caplog):
    tier = RedisTier(redis_server.url, retry_after_s=0.2, warn_every_s=60)
    tier.put(KEY, b"cached")
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger="expert_store.tiers.redis")
    t0 = time.perf_counter()
    for _ in range(3):
        assert tier.get(KEY) is None
        tier.put("m/other.blob", b"x")  # no-op, no exception
        tier.delete(KEY)
        assert not tier.contains(KEY)
        time.sleep(0.25)  # past the back-off: every round really tries again
    assert time.perf_counter() - t0 < 5
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1  # rate limited
    s = tier.stats()
    assert s["errors"] >= 3 and s["misses"] == 3
    redis_server.start()  # empty again: nothing persisted
    time.sleep(0.25)
    tier.put(KEY, b"again")
    assert tier.get(KEY) == b"again" and tier.stats()["available"]


def test_tiered_store_survives_redis_going_away_and_repopulates(redis_server, tmp_path):
    redis_tier = RedisTier(redis_server.url, chunk_size=256, retry_after_s=0.1)
    store = TieredStore(NvmeTier(tmp_path), redis=redis_tier, memory=MemoryTier(0))
    blobs = {f"m/experts/L000/E{e:03d}.bf16.blob": os.urandom(1000 + e) for e in range(4)}
    for key, data in blobs.items():
        store.put(key, data)
    assert all(redis_tier.contains(k) for k in blobs)
    for key, data in blobs.items():
        assert store.get(key) == data
    assert store.stats()["redis"]["hits"] == 4 and store.stats()["nvme"]["hits"] == 0

    redis_server.kill()  # mid-run crash
    for key, data in blobs.items():
        assert store.get(key) == data  # served from NVMe
    s = store.stats()
    assert s["nvme"]["hits"] == 4 and s["redis"]["errors"] >= 1

    redis_server.start()  # comes back empty
    time.sleep(0.15)
    for key, data in blobs.items():
        assert store.get(key) == data  # NVMe hit, promoted into Redis again
    assert all(redis_tier.contains(k) for k in blobs)
    before = store.stats()["redis"]["hits"]
    for key, data in blobs.items():
        assert store.get(key) == data
    assert store.stats()["redis"]["hits"] == before + 4


def test_unreachable_host_costs_one_short_timeout(tmp_path):
    """A Redis URL nobody listens on: puts and gets answer fast, then the tier backs off."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = TieredStore(NvmeTier(tmp_path), redis=RedisTier(f"redis://127.0.0.1:{port}", retry_after_s=30))
    t0 = time.perf_counter()
    store.put(KEY, b"x" * 10)
    for _ in range(20):
        assert store.get(KEY) == b"x" * 10
    assert time.perf_counter() - t0 < 2.0
    assert store.stats()["redis"]["errors"] == 1  # backed off after the first failure


def test_cluster_round_trip_one_blob_one_slot(redis_cluster):
    tier = RedisTier(redis_cluster.url, chunk_size=1000)
    assert tier.cluster
    blobs = {f"m/experts/L{l:03d}/E{e:03d}.int8.blob": os.urandom(4321 + l + e) for l in range(3) for e in range(4)}
    for key, data in blobs.items():
        tier.put(key, data)
    for key, data in blobs.items():
        assert tier.get(key) == data
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url.replace("redis+cluster", "redis"))
    try:
        slots_by_blob: dict[str, set[int]] = {}
        nodes_used = set()
        for server in redis_cluster.servers:
            with server.client() as c:
                for k in c.keys("*"):
                    blob = k.decode().split("{", 1)[1].split("}", 1)[0]
                    slots_by_blob.setdefault(blob, set()).add(client.keyslot(k))
                    nodes_used.add(server.port)
        assert set(slots_by_blob) == set(blobs)
        assert all(len(slots) == 1 for slots in slots_by_blob.values())  # one blob, one slot
        assert len(nodes_used) > 1  # and blobs spread over the cluster
        # a missing chunk on whatever node holds it: miss + cleanup there too
        key = next(iter(blobs))
        meta = client.hgetall(tier.meta_key(key))
        client.delete(tier.chunk_key(key, meta[b"gen"].decode(), 2))
        assert tier.get(key) is None
        assert client.exists(tier.meta_key(key)) == 0
        assert client.exists(tier.chunk_key(key, meta[b"gen"].decode(), 0)) == 0
        for key in blobs:
            tier.delete(key)
        assert sum(len(s.client().keys("*")) for s in redis_cluster.servers) == 0
    finally:
        client.close()
        tier.close()


def test_bad_redis_copy_is_dropped_and_nvme_serves(tmp_path, redis_server):
    write_model(tmp_path)
    store = ModelStore.open(tmp_path, redis_url=redis_server.url, ram_bytes=0, chunk_size=4096)
    try:
        key = fmt.expert_key(MODEL, 0, 0, "bf16")
        good = store.expert_blob(MODEL, 0, 0, "bf16")  # NVMe hit, promoted into Redis
        assert store.tiered.redis.contains(key)
        # Redis holds a self-consistent but wrong blob (e.g. from an older pack)
        store.tiered.redis.put(key, make_blob(0, 1, "bf16"))
        assert store.expert_blob(MODEL, 0, 0, "bf16") == good
        assert store.tiered.redis.get(key) == good  # the bad copy was replaced
        redis_server.stop()
        assert store.expert_blob(MODEL, 1, 1, "int8") == make_blob(1, 1, "int8")  # Redis gone: NVMe serves
    finally:
        store.close()
