"""Prefetcher: predictions, precision/recall bookkeeping, adaptive lookahead, cache interplay."""

from __future__ import annotations

import time

import pytest
import torch

from checkpoints import make_mixtral_checkpoint
from decoder.experts.cache import ExpertCache
from decoder.experts.prefetch import Prefetcher
from decoder.experts.provider import ExpertSource
from decoder.model.config import ModelConfig
from decoder.model.transformer import topk_route
from expert_store.client import StoreClient
from expert_store.pack import pack_checkpoint
from expert_store.tiers import NvmeTier

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
    root = tmp_path_factory.mktemp("pf")
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", hidden=32, ffn=48, layers=L, experts=E, seed=3)
    pack_checkpoint(ckpt, NvmeTier(root / "store"), model="tiny", precisions=("bf16",), progress=False)
    with StoreClient.open(str(root / "store")) as c:
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
    pf = Prefetcher(routers(), prov, top_k=2, max_lookahead=3, clock=clock)
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
