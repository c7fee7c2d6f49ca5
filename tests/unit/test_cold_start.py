"""A decoder's cold start (decoder/experts/cold_start.py) on the CPU against a real store
directory: the fill order follows the calibration profile's popularity, the background fill
brings exactly those experts into a partial host tier (bit for bit the store's), and a stopped
fill starts no load."""

from __future__ import annotations

import threading

import pytest
import torch

from checkpoints import make_packed_store
from decoder.experts.cache import ExpertCache
from decoder.experts.cold_start import fill_order
from decoder.experts.provider import ExpertSource, decode_expert_blob
from decoder.model.config import ModelConfig
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

L, E = 3, 4


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    store = make_packed_store(tmp_path_factory.mktemp("cold"), precisions=("bf16",), hidden=64, ffn=96,
                              layers=L, experts=E, seed=3)
    with StoreClient.open(str(store)) as c:
        yield c


def make_cache(client, host_experts, profile):
    m = client.manifest("tiny")
    src = ExpertSource(client=client, model="tiny", config=ModelConfig.from_hf(m.config), manifest=m,
                       precision="bf16", dtype=torch.float32, device="cpu")
    probe = ExpertCache(src, gpu_slots=[1] * L, host_cache_bytes=0)
    slot = probe.host_slot_bytes
    probe.close()
    return ExpertCache(src, gpu_slots=[1] * L, host_cache_bytes=host_experts * slot, profile=profile)


def test_fill_order_ranks_each_layer_by_popularity():
    profile = {"popularity": [[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.2, 0.8]]}
    assert fill_order(range(L), E, profile, 5) == [(0, 1), (1, 0), (2, 3), (0, 2), (1, 1)]
    assert fill_order([0, 2], E, None, 3) == [(0, 0), (2, 0), (0, 1)]          # no profile: expert order
    assert fill_order(range(L), E, {"popularity": [[1.0]]}, 2) == [(0, 0), (1, 0)]   # a profile of another shape
    assert len(fill_order(range(L), E, profile, 99)) == L * E


def test_background_fill_brings_the_most_wanted_experts(client):
    profile = {"popularity": [[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.2, 0.8]]}
    cache = make_cache(client, 5, profile)
    try:
        fill = cache.start_host_fill(threads=2)
        assert fill is not None and fill.wait(60)
        st = cache.stats()["host_fill"]
        assert st["state"] == "done" and st["done"] == st["to_fetch"] == 5 and st["error"] is None
        assert st["gbps"] > 0
        assert sorted(cache.host_resident()) == sorted([(0, 1), (1, 0), (2, 3), (0, 2), (1, 1)])
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
        for l, e in cache.host_resident():   # served from the host tier, equal to the store's expert
            cache.begin_token()
            cache.prepare(l, [e])
            y = cache.get(l, e)(x)
            cache.release(l, [e])
            assert torch.equal(y, decode_expert_blob(client.fetch_expert("tiny", l, e, "bf16"))(x))
        s = cache.stats()
        assert s["tiers"]["store"]["lookups"] == 0 and s["tiers"]["host"]["hits"] == 5   # no use asked the store
        assert s["prefetch_tiers"]["store"]["lookups"] == 5                             # the fill did
    finally:
        cache.close()


def test_a_stopped_fill_starts_no_load_and_no_host_tier_means_no_fill(client):
    cache = make_cache(client, 4, None)
    try:
        stop = threading.Event()
        stop.set()
        assert cache.fill_host([(0, 0), (1, 0)], threads=2, stop=stop) == 0
        assert cache.host_resident() == [] and cache.host.fill_progress == {"done": 0, "total": 2}
    finally:
        cache.close()
    none = make_cache(client, 0, None)
    try:
        assert none.start_host_fill() is None and none.stats()["host_fill"] is None
    finally:
        none.close()
