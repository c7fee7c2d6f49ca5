"""Eviction and prefetch admission (decoder/experts/gpu_slots.EvictionPolicy), on routing traces
replayed through a slot simulator and through the real ExpertCache over a packed store.

The simulator keeps one layer's slots as the cache does: a lookup is a hit or a miss, a miss
takes a free slot or evicts the policy's victim among the experts the current token has not
used. Traces: a hot expert used every other token amid one-off experts (what recency alone
gets wrong), the routing the decoder records from a model, and prefetches of low and high
predicted use against experts with a known use rate.
"""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_packed_store
from decoder.engine import Engine
from decoder.experts.cache import ExpertCache
from decoder.experts.gpu_slots import EvictionPolicy
from decoder.experts.provider import ExpertSource
from decoder.model.config import ModelConfig
from decoder.routing import MoEObserver
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)


def simulate(trace: list[list[int]], slots: int, policy: EvictionPolicy, layer: int = 0) -> int:
    """Misses of one layer with `slots` slots over `trace` (the experts each token step uses)."""
    resident: list[int] = []              # least recently used first
    misses = 0
    for step, used in enumerate(trace):
        missed = []
        for e in used:                    # lookups first: hits become the most recent ...
            policy.use((layer, e), step)
            if e in resident:
                resident.remove(e)
                resident.append(e)
            else:
                missed.append(e)
        for e in missed:                  # ... then the misses load, in lookup order
            misses += 1
            if len(resident) >= slots:
                candidates = [(layer, r) for r in resident if r not in used]
                victim = policy.victim(candidates, step)
                resident.remove(victim[1])
            resident.append(e)
    return misses


def hot_and_one_offs(steps: int, seed: int = 0) -> list[list[int]]:
    """Expert 0 every other token; every token also uses a fresh expert from 1..30."""
    rng = random.Random(seed)
    return [([0] if t % 2 == 0 else []) + [rng.randrange(1, 31)] for t in range(steps)]


def test_lfru_keeps_a_hot_expert_that_lru_evicts():
    trace = hot_and_one_offs(400)
    lru = simulate(trace, 2, EvictionPolicy("lru"))
    lfru = simulate(trace, 2, EvictionPolicy("lfru", decay=0.5))
    hot_uses = sum(1 for t in trace if 0 in t)
    assert lfru < lru
    # with LFRU the hot expert misses once; LRU loses it whenever two one-offs come in a row
    assert lru - lfru > hot_uses // 4


def test_lfru_with_steep_decay_is_lru_and_the_victim_rules():
    trace = hot_and_one_offs(200, seed=3)
    assert simulate(trace, 3, EvictionPolicy("lfru", decay=60.0)) == simulate(trace, 3, EvictionPolicy("lru"))
    p = EvictionPolicy("lfru", decay=1.0)
    for step in range(10):
        p.use((0, 5), step)                 # used every step
    p.use((0, 7), 9)                        # used once, just now
    assert p.victim([(0, 5), (0, 7)], 10) == (0, 7)        # frequency beats recency here
    assert EvictionPolicy("lru").victim([(0, 5), (0, 7)], 10) == (0, 5)
    assert p.victim([], 10) is None
    p.use((0, 5), 10)
    p.use((0, 5), 10)                       # twice in one step counts once
    assert p.crf((0, 5), 10) == pytest.approx(sum(0.5 ** i for i in range(11)))
    with pytest.raises(ValueError, match="unknown eviction"):
        EvictionPolicy("fifo")


def test_admission_weighs_predicted_use_against_reuse():
    p = EvictionPolicy("lru", decay=1.0, admission=True)
    for step in range(20):
        p.use((0, 1), step)                 # steady: about one use per step
    p.use((0, 2), 0)                        # once, 20 steps ago
    assert p.reuse((0, 1), 20) == pytest.approx(1.0, abs=1e-3)
    assert p.reuse((0, 2), 20) < 1e-5
    assert not p.admit(0.9, (0, 1), 20)     # a 90% guess does not replace a sure reuse
    assert p.admit(0.1, (0, 2), 20)         # a 10% guess beats an expert gone cold
    assert p.admit(None, (0, 1), 20)        # unknown precision: no opinion
    assert EvictionPolicy("lru").admit(0.0, (0, 1), 20)     # admission off


# --- on recorded routing, through the real cache -------------------------------------------------
L, E = 3, 8


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_packed_store(tmp_path_factory.mktemp("evict"), precisions=("bf16",), hidden=64, ffn=96,
                             layers=L, experts=E, seed=21)


class Recorder(MoEObserver):
    def __init__(self) -> None:
        self.trace: list[list[list[int]]] = [[] for _ in range(L)]

    def on_routing_host(self, layer, rows):
        self.trace[layer].append(sorted({e for r in rows for e in r if e >= 0}))


def test_the_cache_evicts_what_the_policy_chooses_on_recorded_routing(store_dir):
    """Decode with 3 of 8 slots per layer under each policy: the cache's demand misses per
    layer equal the simulator's on the routing the decoder recorded (the cache's victims are
    the policy's), and each policy's count is what it is for that trace."""
    ids = torch.randint(0, 320, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    results = {}
    for kind in ("lru", "lfru"):
        with StoreClient.open(str(store_dir)) as c:
            with Engine.from_store(c, "tiny", gpu_cache_bytes=0, host_cache_bytes=1 << 22, prefetch=False,
                                   decode_step="eager", cache_options={"gpu_slots": [3] * L, "scratch_slots": 0,
                                                                       "eviction": kind}) as eng:
                rec = Recorder()
                eng.model.add_observer(rec)
                eng.decode_logits(ids)
                st = eng.stats()
                results[kind] = (st["tiers"]["gpu"]["misses"], rec.trace)
    for kind, (misses, trace) in results.items():
        expected = sum(simulate(trace[l], 3, EvictionPolicy(kind), layer=l) for l in range(L))
        assert misses == expected, kind
    assert results["lru"][1] == results["lfru"][1]          # the same routing under both


def test_a_prefetch_is_refused_when_its_victim_is_likelier_to_be_reused(store_dir):
    with StoreClient.open(str(store_dir)) as c:
        m = c.manifest("tiny")
        src = ExpertSource(client=c, model="tiny", config=ModelConfig.from_hf(m.config), manifest=m)
        cache = ExpertCache(src, gpu_slots=[2] * L, host_cache_bytes=0, scratch_slots=0, admission=True,
                            eviction_decay=1.0)
        try:
            for _ in range(12):             # experts 0 and 1 of layer 0: used every token
                cache.begin_token()
                cache.prepare(0, [0, 1])
                cache.get(0, 0), cache.get(0, 1)
                cache.release(0, [0, 1])
            cache.begin_token()
            cache.prefetch(0, [5], scores=[0.9], uses=[0.5])
            assert cache.wait_idle()
            s = cache.stats()
            assert s["prefetch_refused"] == 1 and sorted(cache.resident(0)) == [0, 1]
            cache.prefetch(0, [6], scores=[0.9], uses=[None])    # unknown: admitted
            assert cache.wait_idle()
            assert cache.stats()["prefetch_refused"] == 1 and 6 in cache.resident(0)
        finally:
            cache.close()


def test_predictions_skip_a_layer_that_rarely_misses(store_dir):
    """With every expert of layers 1-2 resident after a warm-up, their miss rates fall to 0 and
    the prefetcher stops predicting for them (skip_miss_rate); layer 0 -> 1 predictions resume
    while layer 1 keeps missing (quota 2 of 8 there)."""
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(12)).tolist()
    out = {}
    for skip in (None, 0.05):
        with StoreClient.open(str(store_dir)) as c:
            with Engine.from_store(c, "tiny", gpu_cache_bytes=0, host_cache_bytes=1 << 22, decode_step="eager",
                                   prefetch=True, prefetch_options={"skip_miss_rate": skip, "policy": "all",
                                                                    "lookahead": 1},
                                   cache_options={"gpu_slots": [E, 2, E], "scratch_slots": 0}) as eng:
                eng.decode_logits(ids)
                out[skip] = (eng.stats()["prefetch"], [eng.provider.miss_rate(l) for l in range(L)])
    (pf_on, rates), (pf_skip, _) = out[None], out[0.05]
    assert pf_on["skipped_low_miss"] == 0
    assert rates[1] > 0.05 and rates[2] < 0.05
    # layer 1 predicts layer 2, which stopped missing: skipped; layer 0 -> 1 keeps predicting
    assert pf_skip["skipped_low_miss"] > 0
    assert 0 < pf_skip["prefetches_issued"] < pf_on["prefetches_issued"]
