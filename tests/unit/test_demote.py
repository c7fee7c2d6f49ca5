"""GPU evictions written back to a partial host tier (decoder/experts/demote.py), on the CPU
against a real store directory: what is written back is served again without a store fetch,
bit for bit the store's expert, and the host tier keeps what the GPU does not hold.
"""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_packed_store
from decoder.experts.cache import ExpertCache
from decoder.experts.host_tier import HostEntry
from decoder.experts.provider import ExpertSource, decode_expert_blob
from decoder.model.config import ModelConfig
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

L, E = 3, 4


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    store = make_packed_store(tmp_path_factory.mktemp("demote"), precisions=("bf16", "int8"), group_size=32,
                              hidden=64, ffn=96, layers=L, experts=E, seed=11)
    with StoreClient.open(str(store)) as c:
        yield c


def make_cache(client, precision="bf16", host_experts=2, device="cpu", **kw):
    m = client.manifest("tiny")
    src = ExpertSource(client=client, model="tiny", config=ModelConfig.from_hf(m.config), manifest=m,
                       precision=precision, dtype=torch.float32, device=device)
    probe = ExpertCache(src, gpu_slots=[1] * L, host_cache_bytes=0)
    slot = probe.host_slot_bytes
    probe.close()
    return ExpertCache(src, host_cache_bytes=host_experts * slot, **kw)


def use(cache, layer, expert, x=None):
    cache.begin_token()
    cache.prepare(layer, [expert])
    w = cache.get(layer, expert)        # waits for the load
    y = w(x) if x is not None else None
    cache.release(layer, [expert])
    return y


@pytest.mark.parametrize("demote", [True, False])
def test_an_evicted_expert_comes_back_from_the_host_tier(client, demote):
    # layer 0 keeps 2 experts on the GPU, the host tier 2: using 0 1 2 3 evicts 1 from the GPU
    # when the host tier no longer holds it (it dropped 1 for 2, which the GPU held)
    cache = make_cache(client, gpu_slots=[2, 1, 1], demote_evictions=None if demote else False)
    try:
        assert (cache.demoter is not None) == demote
        for e in (0, 1, 2, 3):
            use(cache, 0, e)
        s = cache.stats()
        assert s["tiers"]["store"]["lookups"] == 4
        if demote:
            assert s["demotions"] == 1 and (0, 1) in cache.host_resident()
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
        y = use(cache, 0, 1, x)
        ref = decode_expert_blob(client.fetch_expert("tiny", 0, 1, "bf16"))(x)
        assert torch.equal(y, ref)
        s = cache.stats()
        if demote:
            assert s["tiers"]["store"]["lookups"] == 4 and s["demoted_used"] == 1   # no store fetch
        else:
            assert s["tiers"]["store"]["lookups"] == 5 and s["demotions"] == 0
    finally:
        cache.close()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_random_trace_serves_the_store_experts_with_fewer_fetches(client, precision):
    # a seeded trace over every layer: each expert served equals the store's; written-back
    # experts save store fetches against the same trace without write-back
    rng = random.Random(5)
    trace = [(rng.randrange(L), min(E - 1, int(rng.expovariate(0.9)))) for _ in range(120)]
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    refs = {(l, e): decode_expert_blob(client.fetch_expert("tiny", l, e, precision))(x)
            for l in range(L) for e in range(E)}
    fetches = {}
    for demote in (True, False):
        cache = make_cache(client, precision, host_experts=4, gpu_slots=[2, 2, 2], demote_evictions=demote)
        try:
            for l, e in trace:
                assert torch.equal(use(cache, l, e, x), refs[(l, e)]), (demote, l, e)
            s = cache.stats()
            fetches[demote] = s["tiers"]["store"]["lookups"]
            if demote:
                assert s["demotions"] > 0 and s["demoted_used"] > 0
                # what the host tier holds beside the GPU: at most what it had to keep
                assert len(cache.host_resident()) <= cache.host_capacity
        finally:
            cache.close()
    assert fetches[True] < fetches[False], fetches


def test_host_tier_evicts_what_the_gpu_holds_first(client):
    cache = make_cache(client, gpu_slots=[1, 1, 1], demote_evictions=False)
    try:
        use(cache, 0, 0)
        use(cache, 0, 1)          # GPU layer 0 {1}, host {(0, 0), (0, 1)}
        use(cache, 1, 0)          # host full: (0, 0) is older, but the GPU holds (0, 1): it goes
        assert sorted(cache.host_resident()) == [(0, 0), (1, 0)]
        use(cache, 2, 3)          # the GPU holds both (1, 0) and (2, 3); (0, 0) stays
        assert sorted(cache.host_resident()) == [(0, 0), (2, 3)]
        assert cache.location(0, 0) == "host" and cache.location(0, 1) == "gpu"
    finally:
        cache.close()


def test_write_back_needs_raw_slots(client):
    with pytest.raises(ValueError, match="raw GPU slots"):
        make_cache(client, "int8", gpu_slots=[1, 1, 1], dense_slots=True, demote_evictions=True)
    cache = make_cache(client, "int8", gpu_slots=[1, 1, 1], dense_slots=True)
    try:
        assert cache.demoter is None     # the default leaves dense slots alone
    finally:
        cache.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cuda_write_back_through_staging_gives_the_same_outputs(client, precision):
    # on CUDA: device staging buffer, copy stream, the demoter thread's D2H; the same seeded
    # trace with and without write-back gives bit-identical outputs, and written-back experts
    # are found again (each write-back drained before the next use, so the counts are exact)
    rng = random.Random(5)
    trace = [(rng.randrange(L), min(E - 1, int(rng.expovariate(0.9)))) for _ in range(120)]
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)).cuda()
    outs, stats = {}, {}
    for demote in (True, False):
        cache = make_cache(client, precision, host_experts=4, device="cuda", gpu_slots=[2, 2, 2],
                           dense_slots=False, demote_evictions=demote)
        try:
            assert cache.cuda and (cache.demoter is not None) == demote
            outs[demote] = []
            for l, e in trace:
                outs[demote].append(use(cache, l, e, x))
                if demote:
                    assert cache.demoter.drain()
            torch.cuda.synchronize()
            stats[demote] = cache.stats()
        finally:
            cache.close()
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
    assert stats[True]["demotions"] > 0 and stats[True]["demoted_used"] > 0
    assert stats[True]["tiers"]["store"]["lookups"] < stats[False]["tiers"]["store"]["lookups"]


def test_fill_host_beside_gpu_keeps_what_the_gpu_does_not_hold(client):
    # after the GPU took layer 0's experts 0 and 1, the host tier (3 experts) is filled in the
    # given order with the next ones the GPU does not hold, evicting its copies of 0 and 1
    cache = make_cache(client, host_experts=3, gpu_slots=[2, 1, 1])
    try:
        use(cache, 0, 0)
        use(cache, 0, 1)
        order = [(0, 0), (0, 1), (0, 2), (1, 3), (0, 3), (2, 0)]
        assert cache.fill_host_beside_gpu(order, threads=2) == [(0, 2), (1, 3), (0, 3)]
        assert sorted(cache.host_resident()) == [(0, 2), (0, 3), (1, 3)]
        assert sorted(cache.resident(0)) == [0, 1]
    finally:
        cache.close()


def test_a_second_copy_of_an_expert_never_leaks_its_slot(client):
    # a GPU eviction written back while the same expert is fetched gives two copies: the one in
    # the LRU stays, the other is transient and its slot returns once its copy ended (a second
    # entry overwriting the first would lose the first's slot for good: the server hung on it)
    cache = make_cache(client, host_experts=2, gpu_slots=[1, 1, 1], demote_evictions=False)
    try:
        cache.fill_host([(0, 0)], threads=1)
        host = cache.host
        with cache._lock:
            first = host.entries[(0, 0)]
            free_before = len(host.free)
            dup = host._admit((0, 0), HostEntry(host.take_slot(), first.header, 0, refs=1))
            assert not dup.resident and host.entries[(0, 0)] is first
            host.release((0, 0), dup)
            assert len(host.free) == free_before
    finally:
        cache.close()


@pytest.mark.parametrize("demote", [True, False])
def test_gpu_and_host_tiers_hold_every_expert_they_can(client, demote):
    # layer 0: 2 GPU slots + a host tier of 2 = its 4 experts. Once the host tier holds the two
    # the GPU does not, cycling through all four never asks the store: each GPU miss comes from
    # the host tier, and the expert it evicts takes the place of the one copied to the GPU
    cache = make_cache(client, host_experts=2, gpu_slots=[2, 1, 1], demote_evictions=demote)
    try:
        use(cache, 0, 0)
        use(cache, 0, 1)
        cache.fill_host_beside_gpu([(0, e) for e in range(E)], threads=1)
        assert sorted(cache.host_resident()) == [(0, 2), (0, 3)]
        before = cache.stats()["tiers"]["store"]["lookups"]
        for e in [2, 3, 0, 1] * 3:
            use(cache, 0, e)
        s = cache.stats()
        fetched = s["tiers"]["store"]["lookups"] - before
        if demote:
            assert fetched == 0 and s["demoted_used"] == 10   # all but the two the fill brought
            assert len(cache.host_resident()) == 2 and not set(cache.host_resident()) & {(0, e) for e in cache.resident(0)}
        else:
            assert fetched > 0
    finally:
        cache.close()


def test_a_transient_gpu_copy_does_not_count_as_held(client):
    # a prefill needs all 4 of layer 0's experts with 2 GPU slots: 2 and 3 go to transient
    # buffers that are dropped when the layer ends. While they live the host tier must not give
    # up its copies of them for a store fetch of another layer, but a copy the GPU keeps in a
    # pool slot, else those experts would be in neither tier afterwards and come from the store
    cache = make_cache(client, host_experts=4, gpu_slots=[2, 1, 1], scratch_slots=0)
    try:
        use(cache, 0, 0)
        use(cache, 0, 1)
        cache.fill_host_beside_gpu([(1, 3), (0, 2), (0, 3)], threads=1)   # host: (1,3) (0,2) (0,3)
        cache.begin_token()
        cache.prepare(0, [0, 1, 2, 3])
        for e in range(E):
            cache.get(0, e)
        assert cache.stats()["transient_loads"] == 2
        cache.prepare(2, [0])     # a store fetch into the free host slot: the GPU keeps (2, 0) in its slot
        cache.get(2, 0)
        cache.release(2, [0])
        cache.prepare(1, [0])     # a store fetch into a full host tier: the copy of (2, 0) goes
        cache.get(1, 0)
        cache.release(1, [0])
        cache.release(0, [0, 1, 2, 3])
        assert sorted(cache.host_resident()) == [(0, 2), (0, 3), (1, 0), (1, 3)]
        before = cache.stats()["tiers"]["store"]["lookups"]
        for e in (2, 3):
            use(cache, 0, e)
        assert cache.stats()["tiers"]["store"]["lookups"] == before
    finally:
        cache.close()
