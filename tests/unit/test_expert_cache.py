"""ExpertCache on the CPU against a real store directory (packed tiny Mixtral checkpoint).

Covers: weights served from slots equal the store's experts; per-tier lookups = hits + misses;
bytes per tier; LRU quotas; host LRU by byte budget; demand preempts prefetch; a speculative
load never evicts an expert the current token needs; live EWMA costs; error propagation.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from checkpoints import make_packed_store
from decoder.experts.cache import ExpertCache, build_provider
from decoder.experts.gpu_slots import plan_quotas
from decoder.experts.provider import ExpertSource, decode_expert_blob
from decoder.model.config import ModelConfig
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

L, E = 3, 4


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_packed_store(tmp_path_factory.mktemp("cache"), precisions=("bf16", "int8"), group_size=32,
                             hidden=64, ffn=96, layers=L, experts=E, seed=7)


@pytest.fixture(scope="module")
def client(store_dir):
    with StoreClient.open(str(store_dir)) as c:
        yield c


class SlowSource(ExpertSource):
    """The real source behind a slow link: every fetch takes `delay` seconds longer; the order of
    fetches (and their priority) is logged."""

    delay = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.log: list[tuple[tuple[int, int], str]] = []
        self.log_lock = threading.Lock()

    def fetch(self, layer, expert, out=None, priority="demand"):
        with self.log_lock:
            self.log.append(((layer, expert), priority))
        time.sleep(self.delay)
        return super().fetch(layer, expert, out=out, priority=priority)


def make_source(client, precision="bf16", cls=ExpertSource):
    m = client.manifest("tiny")
    return cls(client=client, model="tiny", config=ModelConfig.from_hf(m.config), manifest=m,
               precision=precision, dtype=torch.float32)


def check_tiers(stats):
    for name, t in stats["tiers"].items():
        assert t["hits"] + t["misses"] == t["lookups"], (name, t)
    for name, t in stats["prefetch_tiers"].items():
        assert t["hits"] + t["misses"] == t["lookups"], (name, t)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_slot_weights_equal_store_experts(client, precision):
    src = make_source(client, precision)
    cache = ExpertCache(src, gpu_slots=[1, 2, 1], host_cache_bytes=0)
    try:
        x = torch.randn(5, 64)
        for l in range(L):
            for e in range(E):
                cache.prepare(l, [e])
                got = cache.get(l, e)(x)
                cache.release(l, [e])
                ref = decode_expert_blob(client.fetch_expert("tiny", l, e, precision))(x)
                assert torch.equal(got, ref), (l, e)
        s = cache.stats()
        check_tiers(s)
        assert s["tiers"]["gpu"]["lookups"] == L * E and s["tiers"]["gpu"]["misses"] == L * E
        # every miss went to the store (no host tier); bytes are the blob sizes
        assert s["tiers"]["store"]["lookups"] == L * E == s["fetches"]
        sizes = sum(src.blob_size(l, e) for l in range(L) for e in range(E))
        assert s["bytes_fetched"] == sizes == s["tiers"]["host"]["bytes"]
        assert s["tiers"]["gpu"]["bytes"] == L * E * cache.raw_size
        # quotas hold: layer l keeps at most quota[l] experts
        assert [len(cache.resident(l)) for l in range(L)] == [1, 2, 1]
    finally:
        cache.close()


def test_lru_within_layer_and_host_tier(client):
    src = make_source(client)
    probe = ExpertCache(src, gpu_slots=[1] * L, host_cache_bytes=0)
    host_bytes = 2 * probe.host_slot_bytes  # room for two experts
    probe.close()
    cache = ExpertCache(src, gpu_slots=[2, 1, 1], host_cache_bytes=host_bytes)
    try:
        assert cache.host_capacity == 2
        def use(l, e):
            cache.begin_token()
            cache.prepare(l, [e])
            cache.get(l, e)
            cache.release(l, [e])
        use(0, 0); use(0, 1); use(0, 0); use(0, 2)   # LRU: 1 is evicted, not 0
        assert sorted(cache.resident(0)) == [0, 2]
        assert cache.resident(0)[-1] == 2
        # host holds the two most recent fetches (0,1) and (0,2); (0,0) was evicted from host
        assert sorted(cache.host_resident()) == [(0, 1), (0, 2)]
        assert cache.location(0, 1) == "host" and cache.location(0, 3) == "store"
        use(0, 1)                                     # GPU miss, host hit
        s = cache.stats()
        check_tiers(s)
        assert s["tiers"]["gpu"]["hits"] == 1 and s["tiers"]["gpu"]["misses"] == 4
        assert s["tiers"]["host"]["hits"] == 1 and s["tiers"]["host"]["misses"] == 3
        assert s["tiers"]["store"]["lookups"] == 3
        assert s["host_resident"] == 2
        assert s["load_cost_measured"]["store"] == 3 and s["load_cost_measured"]["host"] == 4
        assert 0 < cache.load_cost("host") < cache.load_cost("store")
        assert cache.load_cost("gpu") == 0.0
    finally:
        cache.close()


def test_speculative_load_never_evicts_needed_expert(client):
    cache = ExpertCache(make_source(client), gpu_slots=[1, 1, 1], host_cache_bytes=0)
    try:
        cache.begin_token()
        cache.prepare(0, [0])
        w = cache.get(0, 0)
        cache.prefetch(0, [1], [1.0])          # layer 0's only slot holds the pinned expert 0
        assert cache.wait_idle()
        assert cache.resident(0) == [0]
        assert cache.stats()["prefetch_dropped_no_slot"] == 1
        x = torch.randn(2, 64)
        assert torch.equal(cache.get(0, 0)(x), w(x))
        cache.release(0, [0])
        # a later layer: the expert prefetched for this token is protected from a second prefetch
        cache.prefetch(1, [2], [0.9])
        assert cache.wait_idle() and cache.resident(1) == [2]
        cache.prefetch(1, [3], [0.8])
        assert cache.wait_idle() and cache.resident(1) == [2]
        assert cache.stats()["prefetch_dropped_no_slot"] == 2
        # the next token: unpinned and untouched, so a prefetch may replace it
        cache.begin_token()
        cache.prefetch(0, [1], [1.0])
        assert cache.wait_idle() and cache.resident(0) == [1]
        # demand, though, may evict what this token prefetched (it is needed now)
        cache.prepare(1, [3])
        cache.get(1, 3)
        cache.release(1, [3])
        assert cache.resident(1) == [3]
        s = cache.stats()
        check_tiers(s)
        assert s["prefetch_loads"] == 2 and s["prefetch_unused_evicted"] == 1
    finally:
        cache.close()


def test_prefetch_hit_counts_as_useful(client):
    cache = ExpertCache(make_source(client), gpu_slots=[2, 2, 2], host_cache_bytes=0)
    try:
        cache.begin_token()
        cache.prefetch(1, [0, 3], [0.7, 0.3])
        assert cache.wait_idle()
        cache.prepare(1, [0, 1])
        cache.get(1, 0), cache.get(1, 1)
        cache.release(1, [0, 1])
        s = cache.stats()
        check_tiers(s)
        assert s["tiers"]["gpu"]["hits"] == 1 and s["tiers"]["gpu"]["misses"] == 1
        assert s["prefetch_useful"] == 1 and s["prefetch_loads"] == 2
        assert s["prefetch_tiers"]["gpu"]["lookups"] == 2 and s["prefetch_tiers"]["store"]["lookups"] == 2
    finally:
        cache.close()


def test_demand_preempts_prefetch(client):
    src = make_source(client, cls=SlowSource)
    src.delay = 0.15
    cache = ExpertCache(src, gpu_slots=[4, 4, 4], host_cache_bytes=0)
    try:
        src.log.clear()
        cache.begin_token()
        # six prefetches queue up behind a slow link ...
        cache.prefetch(1, [0, 1, 2, 3], [0.9, 0.8, 0.7, 0.6])
        cache.prefetch(2, [0, 1], [0.5, 0.4])
        time.sleep(0.05)                      # the loader is inside the first prefetch now
        # ... a demand load (queued by prepare, picked before any queued prefetch) ...
        cache.prepare(0, [2])
        # ... and one that get() runs at once on the caller's thread
        t0 = time.perf_counter()
        cache.get(0, 3)
        waited = time.perf_counter() - t0
        cache.get(0, 2)
        cache.release(0, [2, 3])
        assert waited < 3 * src.delay         # not behind the 5 queued prefetches (>= 0.75 s)
        assert cache.wait_idle()
        order = [k for k, _ in src.log]
        first_prefetch_done = 1
        # both demand fetches happen before every prefetch except the one already in flight
        assert set(order[:3]) == {(1, 0), (0, 2), (0, 3)}, order
        assert order.index((0, 2)) <= first_prefetch_done + 1 and order.index((0, 3)) <= first_prefetch_done + 1
        prios = dict(src.log)
        assert prios[(0, 2)] == "demand" and prios[(0, 3)] == "demand" and prios[(1, 1)] == "prefetch"
        s = cache.stats()
        check_tiers(s)
        assert s["demand_loads"] == 2 and s["prefetch_loads"] == 6 and s["stall_s"] > 0
    finally:
        cache.close()


def test_begin_token_cancels_stale_prefetches(client):
    src = make_source(client, cls=SlowSource)
    src.delay = 0.1
    cache = ExpertCache(src, gpu_slots=[4, 4, 4], host_cache_bytes=0)
    try:
        cache.begin_token()
        cache.prefetch(2, [0, 1, 2, 3], [0.9, 0.8, 0.7, 0.6])
        time.sleep(0.03)
        cache.begin_token()
        assert cache.wait_idle()
        s = cache.stats()
        assert s["prefetch_cancelled"] >= 2
        assert s["prefetch_loads"] + s["prefetch_cancelled"] == 4
    finally:
        cache.close()


def test_scratch_and_transient_slots_for_wide_layers(client):
    # prefill: one layer needs all 4 experts but owns 1 slot (+2 scratch): nothing blocks
    cache = ExpertCache(make_source(client), gpu_slots=[1, 1, 1], host_cache_bytes=0, scratch_slots=2)
    try:
        cache.begin_token()
        cache.prepare(0, [0, 1, 2, 3])
        x = torch.randn(3, 64)
        outs = [cache.get(0, e)(x) for e in range(4)]
        cache.release(0, [0, 1, 2, 3])
        assert len(cache.resident(0)) == 1       # trimmed back to the quota
        s = cache.stats()
        assert s["scratch_loads"] == 2 and s["transient_loads"] == 1
        assert len(cache._gpu_free) == cache.gpu_pool.shape[0] - 1
        for e in range(4):
            ref = decode_expert_blob(client.fetch_expert("tiny", 0, e, "bf16"))(x)
            assert torch.equal(outs[e], ref)
    finally:
        cache.close()


def test_plan_quotas_and_build_provider(client):
    src = make_source(client)
    cfg = src.config
    slot = 1000
    assert plan_quotas(cfg, slot, None, 2) == [E] * L
    assert plan_quotas(cfg, slot, L * E * slot, 2) == [E] * L
    q = plan_quotas(cfg, slot, 8 * slot, 2)
    assert sum(q) == 6 and all(1 <= s <= E for s in q)
    prof = {"prefetch_accuracy": [0.0, 1.0, 1.0], "single_expert_ratio": [0.0, 0.0, 0.0],
            "popularity": [[1, 1, 1, 1]] * L}
    # every layer keeps top_k = 2 slots (the budget allows it); the spare one goes to the layer
    # nothing predicts (decoder/cache_plan.py, objective "top-k")
    assert plan_quotas(cfg, slot, 8 * slot, 2, profile=prof) == [2, 2, 2]
    assert plan_quotas(cfg, slot, 9 * slot, 2, profile=prof) == [3, 2, 2]
    assert plan_quotas(cfg, slot, 9 * slot, 2, plan="popularity", profile=prof) == [3, 2, 2]
    with pytest.raises(ValueError, match="too small"):
        plan_quotas(cfg, slot, 4 * slot, 2)
    cache = build_provider(src, gpu_cache_bytes=None, host_cache_bytes=None)
    try:
        assert cache.quota == [E] * L and cache.scratch_slots == 0 and cache.host_capacity == 0
    finally:
        cache.close()


def test_fetch_error_reaches_get_and_cache_recovers(client):
    from expert_store.errors import Unavailable

    class FlakySource(SlowSource):
        """The real source whose link drops while `down` holds the (layer, expert)."""
        down: set = set()

        def fetch(self, layer, expert, out=None, priority="demand"):
            if (layer, expert) in self.down:
                raise Unavailable("link down")
            return super().fetch(layer, expert, out=out, priority=priority)

    src = make_source(client, cls=FlakySource)
    src.down = {(0, 1), (1, 2)}
    cache = ExpertCache(src, gpu_slots=[1, 1, 1], host_cache_bytes=0)
    try:
        with pytest.raises(ValueError):
            cache.get(0, E)                   # not an expert of this model
        free_before = len(cache._gpu_free)
        cache.prepare(0, [1])
        with pytest.raises(Unavailable):
            cache.get(0, 1)
        cache.release(0, [1])
        assert len(cache._gpu_free) == free_before and cache.resident(0) == []
        cache.prefetch(1, [2], [1.0])         # a failing prefetch is counted, not raised
        assert cache.wait_idle()
        src.down = set()
        cache.begin_token()
        cache.prepare(0, [1])
        cache.get(0, 1)
        cache.release(0, [1])
        assert cache.resident(0) == [1]
        s = cache.stats()
        assert s["errors"] == 2 and s["prefetch_errors"] == 1
        check_tiers(s)
    finally:
        cache.close()


def test_low_precision_on_miss_for_low_weight_experts(client):
    src = make_source(client, "bf16")
    cache = ExpertCache(src, gpu_slots=[1, 1, 1], host_cache_bytes=0, miss_precision="int8", low_slots=2)
    try:
        x = torch.randn(3, 64)
        cache.begin_token()
        cache.prepare(0, [0])
        cache.get(0, 0)
        cache.release(0, [0])
        cache.begin_token()
        cache.allow_low_precision(0, [0, 2])   # 0 is on the GPU at full precision: used as is
        cache.prepare(0, [0, 2])
        y0, y2 = cache.get(0, 0)(x), cache.get(0, 2)(x)
        cache.release(0, [0, 2])
        assert torch.equal(y0, decode_expert_blob(client.fetch_expert("tiny", 0, 0, "bf16"))(x))
        assert torch.equal(y2, decode_expert_blob(client.fetch_expert("tiny", 0, 2, "int8"))(x))
        assert cache.resident(0) == [0]         # the int8 copy did not take a full-precision slot
        for l, e in [(0, 2), (1, 3), (2, 1), (0, 2)]:   # LRU of 2 low slots: the last (0, 2) misses again
            cache.begin_token()
            cache.allow_low_precision(l, [e])
            cache.prepare(l, [e])
            cache.get(l, e)
            cache.release(l, [e])
        s = cache.stats()
        low = s["tiers"]["gpu-int8"]
        assert low["lookups"] == 5 and low["hits"] == 1 and low["misses"] == 4 and low["loads"] == 4
        check_tiers(s)
        # without the hint, a miss loads full precision
        cache.begin_token()
        cache.prepare(1, [3])
        assert torch.equal(cache.get(1, 3)(x), decode_expert_blob(client.fetch_expert("tiny", 1, 3, "bf16"))(x))
        cache.release(1, [3])
        with pytest.raises(ValueError):
            ExpertCache(src, gpu_slots=[1, 1, 1], miss_precision="int4")   # not in this store
    finally:
        cache.close()


def test_budgets_beyond_the_model_are_capped_and_allocation_failures_say_what(client, caplog):
    import logging

    from decoder.experts.gpu_slots import allocate

    src = make_source(client)
    with caplog.at_level(logging.INFO, logger="decoder.experts"):
        cache = ExpertCache(src, gpu_cache_bytes=64 << 30, host_cache_bytes=64 << 30)
    try:
        assert cache.host_capacity == L * E and cache.quota == [E] * L
        assert cache.host_pool.numel() < (L * E + 16) * cache.host_slot_bytes     # not 64 GiB
        assert any("host_cache_bytes" in r.getMessage() for r in caplog.records)
        assert any("gpu_cache_bytes" in r.getMessage() for r in caplog.records)
    finally:
        cache.close()
    with pytest.raises(MemoryError, match=r"cannot allocate 1125899906842624 bytes .* for the host expert tier"):
        allocate((1 << 40, 1024), torch.device("cpu"), "the host expert tier (host_cache_bytes)")
