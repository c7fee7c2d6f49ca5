"""The prefetcher's loads go out behind the layer's own demand (issue_after_demand).

At layer l's MoE input the prefetcher predicts layers l+1.. and, with issue_after_demand (the
engine's default), holds those loads until the MoE block has asked the cache for layer l's own
experts: on one host->GPU link a prefetch copy that started first would delay that demand, and
a copy in flight cannot be pre-empted. Checked on a real Engine + ExpertCache over a packed
store: the cache's prepare/prefetch calls are recorded in the order the cache receives them.
"""

from __future__ import annotations

import pytest

from checkpoints import make_packed_store
from decoder.engine import Engine

L, E = 4, 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return str(make_packed_store(tmp_path_factory.mktemp("order"), hidden=32, ffn=48, layers=L, experts=E, seed=5))


def _calls(store, prefetch_options):
    """The cache calls of a few decode steps: ("prepare", layer) / ("prefetch", target layer)."""
    with Engine.from_store(store, "tiny", gpu_cache_bytes=None, host_cache_bytes=0, prefetch=True,
                           cache_options={"gpu_slots": [2] * L, "scratch_slots": 2},
                           prefetch_options=prefetch_options) as eng:
        cache = eng.provider
        log = []
        prepare, prefetch = cache.prepare, cache.prefetch

        def rec_prepare(layer, experts):
            log.append(("prepare", layer))
            return prepare(layer, experts)

        def rec_prefetch(layer, experts, scores=None):
            log.append(("prefetch", layer))
            return prefetch(layer, experts, scores)

        cache.prepare, cache.prefetch = rec_prepare, rec_prefetch
        eng.generate([1, 2, 3, 4, 5], max_tokens=6, temperature=0.0, stop_at_eos=False)
        stats = eng.stats()
    return log, stats


def test_prefetches_follow_the_layers_own_demand(store):
    log, stats = _calls(store, {"policy": "all", "min_score": 0.0})
    prefetches = [i for i, c in enumerate(log) if c[0] == "prefetch"]
    assert prefetches, "the prefetcher issued nothing: the test checks nothing"
    for i in prefetches:
        # the cache call just before a prefetch is the issuing layer's prepare (or another prefetch
        # of the same batch), never the prefetch of a layer whose demand is still to come
        prev = next(c for c in reversed(log[:i]) if c[0] == "prepare")
        assert prev[1] < log[i][1]
        j = i - 1
        while log[j][0] == "prefetch":
            j -= 1
        assert log[j] == prev
    assert stats["prefetch"]["issued_after_demand"] > 0


def test_without_it_prefetches_go_out_before_the_demand(store):
    log, _ = _calls(store, {"policy": "all", "min_score": 0.0, "issue_after_demand": False})
    # some prefetch for layer l+1 reached the cache before layer l's own prepare
    ahead = sum(1 for i, (kind, layer) in enumerate(log)
                if kind == "prefetch" and i + 1 < len(log) and log[i + 1] == ("prepare", layer - 1))
    assert ahead > 0
