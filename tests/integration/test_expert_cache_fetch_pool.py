"""ExpertCache(fetch_workers=N): the host tier is a FetchPool arena filled by N receiving
processes; served weights equal the store's experts, demand and prefetch both go through the
pool, and close() leaves no shared memory or process behind. Against a store directory (the
workers read it in-process) and a real `expert-store serve --workers 2` on loopback."""

from __future__ import annotations

import os
import time

import psutil
import pytest
import torch

from checkpoints import make_packed_store
from decoder.experts.cache import ExpertCache
from decoder.experts.host_tier import store_target
from decoder.experts.provider import ExpertSource, decode_expert_blob
from decoder.model.config import ModelConfig
from expert_store.client import StoreClient
from service_procs import StoreServerProcess

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)
L, E = 3, 4


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_packed_store(tmp_path_factory.mktemp("cache-pool"), precisions=("bf16", "int8"), group_size=32,
                             hidden=64, ffn=96, layers=L, experts=E, seed=11)


def source(client, precision):
    m = client.manifest("tiny")
    return ExpertSource(client=client, model="tiny", config=ModelConfig.from_hf(m.config), manifest=m,
                        precision=precision, dtype=torch.float32)


def gone(pids) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("remote,precision", [(False, "int8"), (True, "bf16")])
def test_host_tier_filled_by_fetch_processes(store_dir, tmp_path, remote, precision):
    server = StoreServerProcess(store_dir, "--workers", "2", log_dir=tmp_path).start() if remote else None
    try:
        with StoreClient.open(server.address if remote else str(store_dir)) as client:
            assert store_target(client) == (client.target if remote else str(store_dir.resolve()))
            cache = ExpertCache(source(client, precision), gpu_slots=[1, 2, 1], host_cache_bytes=1 << 20,
                                fetch_workers=2)
            pool = cache.host.fetch_pool
            try:
                assert pool is not None and len(pool.worker_pids()) == 2 and cache.workers >= 2
                assert cache.host_pool.shape == (pool.slots, pool.slot_bytes)
                assert cache.pinned is torch.cuda.is_available()
                cache.prefetch(1, [0, 1, 2, 3])
                x = torch.randn(5, 64)
                for l in range(L):
                    for e in range(E):
                        cache.prepare(l, [e])
                        got = cache.get(l, e)(x)
                        cache.release(l, [e])
                        ref = decode_expert_blob(client.fetch_expert("tiny", l, e, precision))(x)
                        assert torch.equal(got, ref), (l, e)
                cache.wait_idle(timeout=60)
                st = cache.stats()
                assert pool.stats()["completed"] == st["tiers"]["store"]["loads"] > 0
                assert pool.stats()["failed"] == 0
            finally:
                cache.close()
            assert not os.path.exists(f"/dev/shm/{pool.shm_name}")
            assert gone(pool.all_worker_pids)
    finally:
        if server is not None:
            server.stop()


def test_demand_misses_striped_over_the_fetch_processes(tmp_path):
    """fetch_demand_parts=3: each demand miss's store fetch is received in byte ranges by several
    processes (a prefetch stays one request), and the weights served equal the store's."""
    store = make_packed_store(tmp_path / "wide", precisions=("bf16",), hidden=128, ffn=512, layers=2, experts=4,
                              seed=12)
    with StoreServerProcess(store, "--workers", "2", log_dir=tmp_path) as server, \
            StoreClient.open(server.address) as client:
        with pytest.raises(ValueError, match="give fetch_workers"):
            ExpertCache(source(client, "bf16"), gpu_slots=[1, 1], host_cache_bytes=8 << 20, fetch_demand_parts=3)
        cache = ExpertCache(source(client, "bf16"), gpu_slots=[1, 1], host_cache_bytes=8 << 20, fetch_workers=3,
                            fetch_demand_parts=3, fetch_options={"min_part_bytes": 64 << 10})
        pool = cache.host.fetch_pool
        try:
            cache.prefetch(1, [0, 1])
            cache.wait_idle(timeout=60)
            g = torch.Generator().manual_seed(5)
            x = torch.randn(3, 128, generator=g)
            for l in range(2):
                for e in range(4):
                    cache.prepare(l, [e])
                    got = cache.get(l, e)(x)
                    cache.release(l, [e])
                    assert torch.equal(got, decode_expert_blob(client.fetch_expert("tiny", l, e, "bf16"))(x)), (l, e)
            cache.wait_idle(timeout=60)
            st, ps = cache.stats(), pool.stats()
            demand, prefetched = st["tiers"]["store"]["lookups"], st["prefetch_tiers"]["store"]["lookups"]
            assert demand == 7 and prefetched == 1    # layer 1's expert 0 came by prefetch (one GPU slot a layer)
            assert ps["striped"] == demand and ps["parts"] >= 2 * demand and ps["failed"] == 0
            assert ps["completed"] == demand + prefetched
        finally:
            cache.close()
        # fetch_fill_parts: a fill's fetches are striped too (and demand misses are not, by default)
        cache = ExpertCache(source(client, "bf16"), gpu_slots=[1, 1], host_cache_bytes=8 << 20, fetch_workers=3,
                            fetch_fill_parts=4, fetch_options={"min_part_bytes": 64 << 10})
        pool = cache.host.fetch_pool
        try:
            keys = [(l, e) for l in range(2) for e in range(3)]
            assert cache.fill_host(keys, threads=2) == len(keys)
            ps = pool.stats()
            assert ps["striped"] == ps["completed"] == len(keys) and ps["parts"] >= 2 * len(keys)
            cache.prepare(1, [3])
            got = cache.get(1, 3)(x)
            cache.release(1, [3])
            assert torch.equal(got, decode_expert_blob(client.fetch_expert("tiny", 1, 3, "bf16"))(x))
            for l, e in keys:
                cache.prepare(l, [e])
                assert torch.equal(cache.get(l, e)(x), decode_expert_blob(client.fetch_expert("tiny", l, e, "bf16"))(x))
                cache.release(l, [e])
            assert pool.stats()["striped"] == len(keys)     # the demand miss (1, 3) came whole
            assert cache.stats()["tiers"]["host"]["hits"] == len(keys)
        finally:
            cache.close()


def test_a_demand_miss_promotes_the_fill_fetch_it_waits_for(tmp_path):
    """A striped fill queues its blobs' parts in the FetchPool; a demand miss of a blob still
    queued there waits for that fetch (not a second one) and moves it ahead of the fill."""
    import threading

    store = make_packed_store(tmp_path / "wide", precisions=("bf16",), hidden=128, ffn=512, layers=2, experts=4,
                              seed=13)
    with StoreServerProcess(store, "--workers", "1", "--inject-latency-ms", "400", log_dir=tmp_path) as server, \
            StoreClient.open(server.address) as client:
        cache = ExpertCache(source(client, "bf16"), gpu_slots=[1, 1], host_cache_bytes=8 << 20, fetch_workers=1,
                            fetch_fill_parts=2, fetch_options={"min_part_bytes": 64 << 10})
        try:
            keys = [(l, e) for l in range(2) for e in range(4)]
            fill = threading.Thread(target=cache.fill_host, args=(keys,), kwargs={"threads": 8})
            fill.start()
            last = keys[-1]
            deadline = time.monotonic() + 30
            while last not in cache.host.pool_futures and time.monotonic() < deadline:
                time.sleep(0.01)
            assert last in cache.host.pool_futures        # queued behind the rest of the fill
            x = torch.randn(2, 128, generator=torch.Generator().manual_seed(3))
            cache.prepare(*last[:1], [last[1]])
            got = cache.get(*last)(x)
            cache.release(last[0], [last[1]])
            assert torch.equal(got, decode_expert_blob(client.fetch_expert("tiny", *last, "bf16"))(x))
            fill.join(60)
            st = cache.stats()
            assert st["host_fetch_promoted"] == 1 and st["host_prefetch_waited"] == 1
            assert cache.host.fetch_pool.stats()["promoted"] == 1
            assert cache.host.fetch_pool.stats()["completed"] == len(keys)   # no second fetch of `last`
        finally:
            cache.close()
