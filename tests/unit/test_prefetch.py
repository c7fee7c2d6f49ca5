"""Prefetcher: predictions, precision/recall bookkeeping, adaptive lookahead, cache interplay."""

from __future__ import annotations

import time

import pytest
import torch

from checkpoints import make_packed_store
from decoder.experts.cache import ExpertCache
from decoder.experts.prefetch import Prefetcher
from decoder.experts.provider import ExpertSource
from decoder.model.config import ModelConfig
from decoder.model.transformer import topk_route
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)
H, E, L = 16, 6, 4


def routers(seed=0, same=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, H, generator=g)
    return [W if same else torch.randn(E, H, generator=g) for _ in range(L)]


def test_identical_routers_predict_perfectly():
    pf = Prefetcher(routers(same=True), None, top_k=2, lookahead=2)
    x = torch.randn(1, H)
    for step in range(3):
        for l in range(L):
            pf.on_moe_input(l, x)
            w, idx = topk_route(x @ pf.routers[l].T, 2)
            pf.on_routing(l, None, w, idx)
    s = pf.stats()
    assert s["precision"] == 1.0 and s["recall"] == 1.0 and s["token_recall"] == 1.0
    # layer 0 is never predicted; layer 1 only from distance 1; layers 2, 3 from both distances
    assert s["per_layer"][0]["predicted"] == 0
    assert s["per_distance"][1]["predicted"] == 3 * 3 * 2 and s["per_distance"][2]["predicted"] == 3 * 2 * 2
    assert pf.accuracy_by_layer(1) == [0.0, 1.0, 1.0, 1.0]


def test_precision_recall_against_manual_count():
    R = routers(seed=1)
    pf = Prefetcher(R, None, top_k=2, lookahead=1)
    g = torch.Generator().manual_seed(2)
    tp = pred = used = 0
    tok_tp = tok_used = 0
    for step in range(20):
        T = 1 if step % 2 else 3
        xs = [torch.randn(T, H, generator=g) for _ in range(L)]
        for l in range(L):
            pf.on_moe_input(l, xs[l])
            w, idx = topk_route(xs[l] @ R[l].T, 2)
            if step % 3 == 0:                     # some tokens use one expert (adaptive gating)
                idx = idx.clone()
                idx[:, 1] = -1
            pf.on_routing(l, None, w, idx)
            if l >= 1:
                _, pidx = topk_route(xs[l - 1] @ R[l].T, 2)
                p = set(pidx.flatten().tolist())
                u = set(idx[idx >= 0].tolist())
                tp += len(p & u); pred += len(p); used += len(u)
                for t in range(T):
                    ut = set(idx[t][idx[t] >= 0].tolist())
                    tok_tp += len(ut & set(pidx[t].tolist())); tok_used += len(ut)
    s = pf.stats()
    assert s["hits"] == tp and s["predicted"] == pred and s["used"] == used
    assert s["precision"] == pytest.approx(tp / pred) and s["recall"] == pytest.approx(used and tp / used)
    assert s["token_recall"] == pytest.approx(tok_tp / tok_used)
    assert 0 < s["precision"] < 1


def test_renorm_uses_target_layer_norm_weight():
    R = routers(same=True)
    norms = [torch.full((H,), 1.0 + l) for l in range(L)]
    x = torch.randn(1, H)
    pf = Prefetcher(R, None, top_k=2, lookahead=1, norm_weights=norms, renorm=True)
    _, _, idx = pf._predict(0, 1, x)
    # layer 1's input is the same stream with norm weight 2 instead of 1: logits scale by 2
    assert idx == topk_route((2 * x) @ R[1].T, 2)[1].tolist()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    store = make_packed_store(tmp_path_factory.mktemp("pf"), hidden=32, ffn=48, layers=L, experts=E, seed=3)
    with StoreClient.open(str(store)) as c:
        m = c.manifest("tiny")
        yield ExpertSource(client=c, model="tiny", config=ModelConfig.from_hf(m.config), manifest=m)


class SlowSource(ExpertSource):
    """The real source behind a slow link (every fetch takes `delay` seconds longer)."""

    delay = 0.0

    def fetch(self, layer, expert, out=None, priority="demand"):
        time.sleep(self.delay)
        return super().fetch(layer, expert, out=out, priority=priority)


def test_prefetches_reach_the_cache_and_lookahead_adapts(source):
    slow = SlowSource(client=source.client, model="tiny", config=source.config, manifest=source.manifest)
    slow.delay = 0.05
    cache = ExpertCache(slow, gpu_slots=[E] * L, host_cache_bytes=0)
    R = [torch.randn(E, 32) for _ in range(L)]
    pf = Prefetcher(R, cache, top_k=2, max_lookahead=3)
    try:
        # measured store cost (~50 ms) >> layer time (~5 ms): look 3 layers ahead. k is bounded by
        # the layers left, so only layer 0 can look 3 ahead, and only once the first load (~50 ms)
        # has been measured: enough steps that a later layer 0 sees it
        for step in range(8):
            cache.begin_token()
            for l in range(L):
                x = torch.randn(1, 32)
                pf.on_moe_input(l, x)
                time.sleep(0.005)
        assert cache.load_cost("store") > 0.04
        assert pf.stats()["lookahead_hist"].get(3, 0) >= 1
        assert cache.wait_idle(30)
        s = cache.stats()
        assert s["prefetch_loads"] > 0 and s["prefetch_requests"] >= s["prefetch_loads"]
        assert pf.stats()["prefetches_issued"] == s["prefetch_requests"]
        # everything is on the GPU now: loading costs nothing, one layer ahead is enough
        for l in range(L):
            for e in range(E):
                cache.prefetch(l, [e])
        assert cache.wait_idle(30)
        before = dict(pf.stats()["lookahead_hist"])
        cache.begin_token()
        for l in range(L):
            pf.on_moe_input(l, torch.randn(1, 32))
        after = pf.stats()["lookahead_hist"]
        assert after.get(1, 0) - before.get(1, 0) == L - 1
    finally:
        cache.close()


def test_fixed_lookahead_and_disabled(source):
    R = [torch.randn(E, 32) for _ in range(L)]
    cache = ExpertCache(source, gpu_slots=[E] * L, host_cache_bytes=0)
    try:
        pf = Prefetcher(R, cache, top_k=2, lookahead=2)
        cache.begin_token()
        pf.on_moe_input(0, torch.randn(1, 32))
        assert cache.wait_idle()
        assert {l for l in range(L) if cache.resident(l)} == {1, 2}
        off = Prefetcher(R, cache, top_k=2, enabled=False)
        off.on_moe_input(2, torch.randn(1, 32))
        assert off.stats()["prefetches_issued"] == 0
    finally:
        cache.close()


def test_lookahead_rule():
    rule = Prefetcher.lookahead_rule
    assert rule(0.050, 0.002, 3, 3) == 3                 # 25 layers' worth, capped by max_lookahead
    assert rule(0.050, 0.002, 8, 2) == 2                 # ... and by the layers left
    assert rule(0.050, 0.030, 3, 3) == 2                 # ceil(50 / 30)
    assert rule(0.050, 0.050, 3, 3) == 1
    assert rule(0.010, 0.030, 3, 3) == 1                 # load hidden behind one layer
    assert rule(0.0, 0.030, 3, 3) == 1                   # on the GPU already
    assert rule(0.050, None, 3, 3) == 1                  # nothing measured yet
    assert rule(0.050, 0.0, 3, 3) == 3                   # the layer only waited


class _FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class _TimedProvider:
    """A provider whose load cost and stall counter the test sets (what ExpertCache exposes)."""

    def __init__(self, t_load):
        self.t_load, self.stall = t_load, 0.0
        self.prefetched = []

    def prefetch(self, layer, experts, scores=None):
        self.prefetched.append(layer)

    def location(self, layer, expert):
        return "store"

    def load_cost(self, location):
        return self.t_load

    def stall_seconds(self):
        return self.stall


def _run_steps(pf, provider, clock, steps, compute_s, stall_s):
    """Each layer computes for compute_s and is blocked stall_s waiting for its experts.
    -> the lookahead chosen at each layer of the last step."""
    ks = []
    for _ in range(steps):
        ks = []
        for l in range(L):
            before = dict(pf.stats()["lookahead_hist"])
            pf.on_moe_input(l, torch.randn(1, H))
            after = pf.stats()["lookahead_hist"]
            ks += [k for k in after if after[k] != before.get(k, 0)]
            clock.t += compute_s + stall_s
            provider.stall += stall_s
    return ks


@pytest.mark.parametrize("stall_s", [0.0, 0.1])
def test_adaptive_lookahead_uses_compute_time_without_stalls(stall_s):
    # load 50 ms, compute 30 ms: k = ceil(50/30) = 2 whether or not each layer also waits 100 ms
    # for its experts (the wall time per layer, 130 ms, would give k = 1)
    clock, prov = _FakeClock(), _TimedProvider(t_load=0.050)
    pf = Prefetcher(routers(), prov, top_k=2, max_lookahead=3, clock=clock)
    ks = _run_steps(pf, prov, clock, 3, compute_s=0.030, stall_s=stall_s)
    assert ks == [2, 2, 1]                               # layer 2 has one layer left
    s = pf.stats()
    assert s["layer_compute_s"] == pytest.approx(0.030)
    assert s["layer_time_s"] == pytest.approx(0.030 + stall_s)


def test_adaptive_lookahead_on_a_stalling_slow_store():
    # the failure mode of timing whole layers: 50 ms loads, 2 ms compute, 50 ms stalls per layer
    clock, prov = _FakeClock(), _TimedProvider(t_load=0.050)
    pf = Prefetcher(routers(), prov, top_k=2, max_lookahead=3, clock=clock, policy="all")
    assert _run_steps(pf, prov, clock, 1, compute_s=0.002, stall_s=0.050) == [1, 2, 1]  # layer 0: unmeasured
    prov.prefetched.clear()
    assert _run_steps(pf, prov, clock, 1, compute_s=0.002, stall_s=0.050) == [3, 2, 1]  # bounded by layers left
    assert sorted(prov.prefetched) == [1, 2, 2, 3, 3, 3]  # every remaining layer prefetched from layer 0
    # the cache is fast now: one layer ahead is enough again (the EWMA keeps the compute time)
    prov.t_load = 0.001
    assert _run_steps(pf, prov, clock, 1, compute_s=0.002, stall_s=0.0) == [1, 1, 1]
    # a stall counter going backwards never yields a negative or inflated compute time
    pf.on_moe_input(0, torch.randn(1, H))
    clock.t += 0.002
    prov.stall = 0.0
    pf.on_moe_input(1, torch.randn(1, H))
    assert pf.stats()["layer_compute_s"] == pytest.approx(0.002)


def test_budget_policy_on_a_stalling_slow_store():
    # the same slow store under the default link budget: a 50 ms load does not fit in a 2 ms layer,
    # so each MoE input issues one expert, and the nearest layer's top pick wins (w1 >= w / d)
    clock, prov = _FakeClock(), _TimedProvider(t_load=0.050)
    pf = Prefetcher(routers(), prov, top_k=2, max_lookahead=3, clock=clock)
    assert pf.policy == "budget"
    _run_steps(pf, prov, clock, 1, compute_s=0.002, stall_s=0.050)
    # the first step's layer 0 ran before any compute time was measured (up to top_k per target
    # layer then, depending on the random input): count the measured step only
    prov.prefetched.clear()
    pf.reset_stats()
    assert _run_steps(pf, prov, clock, 1, compute_s=0.002, stall_s=0.050) == [3, 2, 1]  # k is unchanged
    assert sorted(prov.prefetched) == [1, 2, 3]
    assert pf.stats()["issued_max_per_input"] == 1


# --- link-budget policy on a provider double with known locations and costs ----------------------

class _LinkProvider:
    """The provider interface the prefetcher reads (what ExpertCache exposes): per-expert location,
    per-location load cost, the stall counter and the GPU-resident experts; records prefetch calls."""

    def __init__(self, cost=None, where="host"):
        self.cost = {"gpu": 0.0, "host": 0.00165, "store": 0.005, **(cost or {})}
        self.where = where
        self.loc: dict[tuple[int, int], str] = {}
        self.stall = 0.0
        self.calls: list[tuple[int, list[int], list[float]]] = []

    def prefetch(self, layer, experts, scores=None):
        self.calls.append((layer, list(experts), list(scores)))

    def location(self, layer, expert):
        return self.loc.get((layer, expert), self.where)

    def load_cost(self, location):
        return self.cost[location]

    def stall_seconds(self):
        return self.stall

    def resident(self, layer):
        return [e for e in range(E) if self.location(layer, e) == "gpu"]


def _logit_routers(logits):
    """routers whose logits on x = ones(H) are logits[j] (a dict expert -> logit; others -inf-ish)."""
    out = []
    for j in range(L):
        W = torch.zeros(E, H)
        W[:, 0] = -20.0
        for e, v in logits.get(j, {}).items():
            W[e, 0] = v
        out.append(W)
    return out


def _pair(w1, a, b):
    """top-2 logits whose renormalised weights are (w1, 1 - w1) for experts a, b."""
    import math
    return {a: 0.0, b: -math.log(w1 / (1 - w1))}


X1 = torch.ones(1, H)


def _warm(pf, clock, compute_s):
    """One step of layers with a measured compute time (stalls 0); the calls of the next step count."""
    for l in range(L):
        pf.on_moe_input(l, X1)
        clock.t += compute_s


def _step(pf, prov, clock, compute_s):
    """-> the prefetch calls made at each layer of one step."""
    per_layer = []
    for l in range(L):
        prov.calls.clear()
        pf.on_moe_input(l, X1)
        per_layer.append(list(prov.calls))
        clock.t += compute_s
    return per_layer


def _weights(calls):
    return sorted(((j, e), round(s, 6)) for j, es, ss in calls for e, s in zip(es, ss))


def test_budget_caps_the_experts_issued_per_layer():
    R = _logit_routers({j: _pair(0.55, 2 * (j % 3), 2 * (j % 3) + 1) for j in range(L)})
    for compute_s, n in [(0.002, 1), (0.0034, 2), (0.0052, 3), (0.0001, 1)]:
        clock, prov = _FakeClock(), _LinkProvider()
        pf = Prefetcher(R, prov, top_k=2, lookahead=3, clock=clock)
        _warm(pf, clock, compute_s)
        pf.reset_stats()                                   # the first layer of the warm-up was unmeasured
        per_layer = _step(pf, prov, clock, compute_s)
        # 1.65 ms per host-tier expert: floor(t_compute / t_load) of them, at least one
        for l, calls in enumerate(per_layer[:-1]):
            cands = 2 * min(3, L - 1 - l)
            assert sum(len(es) for _, es, _ in calls) == min(n, cands), (compute_s, l, calls)
            assert [j for j, _, _ in calls] == sorted({j for j, _, _ in calls})   # one call per target, nearest first
        assert per_layer[-1] == []
        s = pf.stats()
        assert s["issued_max_per_input"] == min(n, 6)
        assert s["prefetches_issued"] == sum(s["issued_per_layer"])
    # a store-tier expert costs more than a host-tier one: 3.4 ms buys 2 host loads but 1 store load
    clock, prov = _FakeClock(), _LinkProvider(where="store")
    pf = Prefetcher(R, prov, top_k=2, lookahead=3, clock=clock)
    _warm(pf, clock, 0.0034)
    assert sum(len(es) for _, es, _ in _step(pf, prov, clock, 0.0034)[0]) == 1


def test_budget_ranks_by_weight_over_distance():
    # layer 1: (0.7, 0.3), layer 2: (0.9, 0.1): ranked 1/e0 0.7 > 2/e2 0.45 > 1/e1 0.3 > 2/e3 0.05
    R = _logit_routers({1: _pair(0.7, 0, 1), 2: _pair(0.9, 2, 3), 3: _pair(0.6, 4, 5)})
    clock, prov = _FakeClock(), _LinkProvider()
    pf = Prefetcher(R, prov, top_k=2, lookahead=2, min_score=0.0, clock=clock)
    _warm(pf, clock, 0.0034)                                   # two host loads per layer
    calls = _step(pf, prov, clock, 0.0034)[0]
    assert [(j, es) for j, es, _ in calls] == [(1, [0]), (2, [2])]
    assert _weights(calls) == [((1, 0), 0.7), ((2, 2), 0.45)]
    # a nearer second choice beats a farther first one once it outweighs it: (0.52, 0.48) vs 0.9/2
    R = _logit_routers({1: _pair(0.52, 0, 1), 2: _pair(0.9, 2, 3), 3: _pair(0.6, 4, 5)})
    clock, prov = _FakeClock(), _LinkProvider()
    pf = Prefetcher(R, prov, top_k=2, lookahead=2, min_score=0.0, clock=clock)
    _warm(pf, clock, 0.0034)
    calls = _step(pf, prov, clock, 0.0034)[0]
    assert [(j, es) for j, es, _ in calls] == [(1, [0, 1])]
    assert _weights(calls) == [((1, 0), 0.52), ((1, 1), 0.48)]


def test_budget_skips_resident_and_low_score_experts():
    R = _logit_routers({1: _pair(0.6, 0, 1), 2: _pair(0.8, 2, 3), 3: _pair(0.75, 4, 5)})
    clock, prov = _FakeClock(), _LinkProvider()
    prov.loc[(1, 0)] = "gpu"                                   # layer 1's top pick is on the GPU
    pf = Prefetcher(R, prov, top_k=2, lookahead=2, clock=clock)
    assert pf.min_score == 0.3
    _warm(pf, clock, 0.010)                                    # budget for 6 host loads: only the filters bind
    calls = _step(pf, prov, clock, 0.010)
    # from layer 0: not (1, 0) (resident), not (2, 3) (weight 0.2 < 0.3); from layer 1: not (3, 5) (0.25)
    assert [(j, es) for j, es, _ in calls[0]] == [(1, [1]), (2, [2])]
    assert [(j, es) for j, es, _ in calls[1]] == [(2, [2]), (3, [4])]
    s = pf.stats()
    assert s["dropped_resident"] >= 2 and s["dropped_low_score"] >= 2
    # min_score 0 lets the weak second choices through
    clock, prov = _FakeClock(), _LinkProvider()
    pf = Prefetcher(R, prov, top_k=2, lookahead=2, min_score=0.0, clock=clock)
    _warm(pf, clock, 0.010)
    calls = _step(pf, prov, clock, 0.010)
    assert [(j, sorted(es)) for j, es, _ in calls[0]] == [(1, [0, 1]), (2, [2, 3])]
    # every expert of the next layer on the GPU: only the layer after it is issued
    for e in range(E):
        prov.loc[(1, e)] = "gpu"
    prov.calls.clear()
    pf.on_moe_input(0, X1)
    assert [(j, sorted(es)) for j, es, _ in prov.calls] == [(2, [2, 3])]
    # ... and with both lookahead layers on the GPU nothing is predicted or issued
    for e in range(E):
        prov.loc[(2, e)] = "gpu"
    prov.calls.clear()
    skipped = pf.stats()["skipped_resident"]
    pf.on_moe_input(0, X1)
    assert prov.calls == [] and pf.stats()["skipped_resident"] == skipped + 1


def test_budget_before_compute_time_is_measured():
    # first step: no compute time yet -> adaptive k = 1 and top_k at distance 1, as the "all" policy
    R = _logit_routers({1: _pair(0.6, 0, 1), 2: _pair(0.6, 2, 3), 3: _pair(0.6, 4, 5)})
    clock, prov = _FakeClock(), _LinkProvider()
    pf = Prefetcher(R, prov, top_k=2, clock=clock)
    prov.calls.clear()
    pf.on_moe_input(0, X1)
    assert [(j, sorted(es)) for j, es, _ in prov.calls] == [(1, [0, 1])]
    # a fixed lookahead asks for k layers: top_k for each
    clock, prov = _FakeClock(), _LinkProvider()
    pf = Prefetcher(R, prov, top_k=2, lookahead=2, clock=clock)
    pf.on_moe_input(0, X1)
    assert [(j, sorted(es)) for j, es, _ in prov.calls] == [(1, [0, 1]), (2, [2, 3])]


def test_policy_all_reproduces_every_prediction():
    # the old behaviour: for each distance d <= k, one call with all predicted experts, weights / d
    R = routers(seed=5)
    clock, prov = _FakeClock(), _LinkProvider(cost={"host": 0.005})
    prov.loc[(2, 0)] = "gpu"                                   # "all" does not filter
    pf = Prefetcher(R, prov, top_k=2, max_lookahead=3, clock=clock, policy="all")
    g = torch.Generator().manual_seed(6)
    for step in range(4):
        for l in range(L):
            T = 1 + (step % 2)
            x = torch.randn(T, H, generator=g)
            before = dict(pf.stats()["lookahead_hist"])
            prov.calls.clear()
            pf.on_moe_input(l, x)
            clock.t += 0.002
            if l + 1 >= L:
                assert prov.calls == []
                continue
            after = pf.stats()["lookahead_hist"]
            (k,) = [k for k in after if after[k] != before.get(k, 0)]
            preds = pf._predict_many(l, x, min(3, L - 1 - l))
            want = [(l + d, experts, [s / d for s in scores])
                    for d, (experts, scores, _) in enumerate(preds, 1) if d <= k]
            assert prov.calls == want
            if step:
                assert k == min(3, L - 1 - l)                   # ceil(5 / 2) = 3, bounded by layers left
    with pytest.raises(ValueError):
        Prefetcher(R, prov, policy="some")


def test_issued_precision_and_recall():
    # the prediction statistics count every distance; the issued ones only what reached the cache
    R = _logit_routers({1: _pair(0.6, 0, 1), 2: _pair(0.8, 2, 3), 3: _pair(0.6, 4, 5)})
    clock, prov = _FakeClock(), _LinkProvider()
    pf = Prefetcher(R, prov, top_k=2, lookahead=2, clock=clock)
    _warm(pf, clock, 0.002)                                    # one host load per layer
    pf.reset_stats()
    used = {0: [0, 1], 1: [0, 5], 2: [2, 3], 3: [4, 1]}
    for l in range(L):
        prov.calls.clear()
        pf.on_moe_input(l, X1)
        pf.on_routing_host(l, [used[l]])
        clock.t += 0.002
    s = pf.stats()
    # issued: (1, 0) from layer 0, (2, 2) from layer 1, (3, 4) from layer 2 -> all used
    assert s["issued_per_layer"] == [0, 1, 1, 1] and s["prefetches_issued"] == 3
    assert s["issued_hits"] == 3 and s["issued_precision"] == 1.0
    # used by the predicted target layers 1..3: 6 experts, 3 of them prefetched
    assert s["issued_recall"] == pytest.approx(3 / 6)
    # predictions: layer 1 {0,1} vs {0,5}; layer 2 twice {2,3} vs {2,3}; layer 3 twice {4,5} vs {4,1}
    assert s["predicted"] == 2 + 4 + 4 and s["hits"] == 1 + 4 + 2
    assert s["precision"] == pytest.approx(7 / 10)
    assert s["issued_per_input"] == pytest.approx(1.0)


def test_without_gpu_prefetch_nothing_is_predicted_for_the_gpu_tier():
    """gpu=False: the captured step computes no predictions for GPU slots (static_distance 0
    without a store lookahead) and the eager hooks predict nothing; with gpu=True the same
    prefetcher reaches its lookahead."""
    on = Prefetcher(routers(seed=3), None, top_k=2, lookahead=2)
    off = Prefetcher(routers(seed=3), None, top_k=2, lookahead=2, gpu=False)
    assert [on.static_distance(l) for l in range(L)] == [2, 2, 1, 0]
    assert [off.static_distance(l) for l in range(L)] == [0] * L
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(4))
    for pf in (on, off):
        for l in range(L):
            pf.on_moe_input(l, x)
            assert (pf.predict_device(l, x) is None) is (pf is off or l == L - 1)
            w, idx = topk_route(x @ pf.routers[l].T, 2)
            pf.on_routing(l, None, w, idx)
    assert on.stats()["predicted"] > 0 and on.stats()["gpu"] is True
    assert off.stats()["predicted"] == 0 and off.stats()["gpu"] is False
