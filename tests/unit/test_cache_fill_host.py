"""ExpertCache.fill_host: the pinned host tier filled on several threads, evicting nothing.

Against a real store directory (tiny Mixtral checkpoint, 3 layers x 4 experts, packed at bf16 and
int8). The packer stored the bf16 blobs lz4-coded ("bf16-planes+lz4": received into one host slot,
decoded into a second) and the int8 ones uncoded ("none": used where they landed); the tests
assert which codec they got, so both host paths are covered. A host tier of exactly L*E experts:
- fill_host(threads=4 and 16) brings every expert in, none evicted, also with more threads than
  half the free host slots (16; the tier has 12 + 4 staging slots); the store link takes 20 ms a
  blob, so the fetches of a wave are in flight together;
- the raw payload in each host slot is the blob's decoded payload, and `get` (served from the
  host tier, no store fetch) gives the weights of the blob decoded on its own;
- experts already resident are skipped and kept; more keys than the tier holds -> ValueError.
"""

from __future__ import annotations

import time

import pytest
import torch

from checkpoints import make_packed_store
from decoder.experts.cache import ExpertCache
from decoder.experts.provider import ExpertSource, decode_expert_blob
from decoder.model.config import ModelConfig
from expert_store import format as blob_format
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

L, E = 3, 4
KEYS = [(l, e) for l in range(L) for e in range(E)]
CODEC = {"bf16": "bf16-planes+lz4", "int8": "none"}
LINK_S = 0.02


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    store = make_packed_store(tmp_path_factory.mktemp("fill-host"), precisions=("bf16", "int8"), group_size=32,
                              hidden=64, ffn=96, layers=L, experts=E, seed=5)
    with StoreClient.open(str(store)) as c:
        yield c


class SlowLinkSource(ExpertSource):
    """The real store behind a link that takes LINK_S per blob, so the loads of a wave are all in
    flight together (as with 88 MB blobs)."""

    def fetch(self, layer, expert, out=None, priority="demand"):
        time.sleep(LINK_S)
        return super().fetch(layer, expert, out=out, priority=priority)


def make_source(client, precision):
    m = client.manifest("tiny")
    return SlowLinkSource(client=client, model="tiny", config=ModelConfig.from_hf(m.config), manifest=m,
                          precision=precision, dtype=torch.float32, device="cpu")


def make_cache(client, precision, host_experts):
    """A cache whose host tier holds exactly `host_experts` experts (all GPU slots, one loader)."""
    probe = ExpertCache(make_source(client, precision), host_cache_bytes=0)
    slot = probe.host_slot_bytes
    probe.close()
    cache = ExpertCache(make_source(client, precision), gpu_slots=[E] * L, host_cache_bytes=host_experts * slot)
    assert cache.host_capacity == host_experts
    return cache


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_packed_codecs(client, precision):
    for l, e in KEYS:
        header, _ = blob_format.read_header(client.fetch_expert("tiny", l, e, precision))
        assert header.codec == CODEC[precision], (l, e, header.codec)


@pytest.mark.parametrize("threads", [4, 16])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_fill_host_loads_every_key_without_eviction(client, precision, threads):
    cache = make_cache(client, precision, L * E)
    try:
        assert cache.fill_host(KEYS, threads=threads) == L * E
        assert sorted(cache.host_resident()) == KEYS
        st = cache.stats()
        assert st["evictions_host"] == 0
        assert st["host_resident"] == L * E
        assert st["tiers"]["store"]["loads"] == L * E           # one fetch each, no reload
        assert st["prefetch_tiers"]["host"]["misses"] == L * E  # counted as prefetch lookups
        assert st["tiers"]["gpu"]["loads"] == 0                 # the host tier only
        free_before = len(cache.host.free)

        # the host slots hold each blob's decoded raw payload
        for l, e in KEYS:
            blob = client.fetch_expert("tiny", l, e, precision)
            _, raw = blob_format.decode_raw(blob)
            h = cache.host.entries[(l, e)]
            assert h.header.codec == CODEC[precision]
            slot = cache.host_pool[h.slot, h.raw_offset:h.raw_offset + h.header.raw_size]
            assert bytes(slot.numpy()) == bytes(raw), (l, e)

        # get() is served from the host tier and gives the blob's weights
        cache.reset_stats()
        for l in range(L):
            cache.begin_token()
            cache.prepare(l, range(E))
            for e in range(E):
                got = cache.get(l, e).materialize(torch.float32)
                want = decode_expert_blob(client.fetch_expert("tiny", l, e, precision), dtype=torch.float32)
                for name in ("w1", "w3", "w2"):
                    assert torch.equal(getattr(got, name), getattr(want, name)), (l, e, name)
            cache.release(l, range(E))
        st = cache.stats()
        assert st["tiers"]["host"]["hits"] == L * E and st["tiers"]["host"]["misses"] == 0
        assert st["tiers"]["store"]["loads"] == 0 and st["evictions_host"] == 0
        assert len(cache.host.free) == free_before             # no slot leaked by the fill
    finally:
        cache.close()


def test_fill_host_skips_resident_keys(client):
    cache = make_cache(client, "bf16", L * E)
    try:
        first = KEYS[::2]
        assert cache.fill_host(first + first, threads=4) == len(first)  # duplicates count once
        assert cache.fill_host(list(reversed(KEYS)), threads=4) == L * E - len(first)
        assert sorted(cache.host_resident()) == KEYS
        st = cache.stats()
        assert st["evictions_host"] == 0 and st["tiers"]["store"]["loads"] == L * E
        assert cache.fill_host(KEYS) == 0
    finally:
        cache.close()


def test_fill_host_more_keys_than_capacity(client):
    cache = make_cache(client, "bf16", L * E - 1)
    try:
        with pytest.raises(ValueError, match="do not fit the host tier of 11"):
            cache.fill_host(KEYS, threads=4)
        assert cache.host_resident() == [] and cache.stats()["tiers"]["store"]["loads"] == 0
        with pytest.raises(ValueError, match="no expert"):
            cache.fill_host([(L, 0)])
        assert cache.fill_host(KEYS[:-1], threads=4) == L * E - 1   # exactly the capacity fits
        assert cache.stats()["evictions_host"] == 0
    finally:
        cache.close()
