"""The remote path hides the store (issue 14): a real `expert-store serve` with injected latency
behind an ExpertCache whose host tier holds part of the experts.

- store fetches into the host tier for predicted host-tier misses (`prefetch_host`): they happen,
  a later GPU load finds them there (`host_prefetch_useful`), a load of an expert whose fetch is in
  flight waits for it instead of fetching it twice; in a FetchPool they are "background" requests,
  bounded in flight, behind demand;
- the prefetcher's store lookahead follows the measured store fetch time against the layer's
  compute time (a fake clock gives the compute time; the store latency is real), reaching into
  the next token on a slow store;
- cost-aware gating prices an expert whose only copy is in the store above one in the host tier;
- a low-gate-weight miss crosses the wire at int4 only when allowed, and only for an expert the
  host tier does not hold (`low_precision_misses="store"`).

Decisions and counters are asserted, never durations.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from checkpoints import make_packed_store
from service_procs import StoreServerProcess, wait_until

from decoder import Engine
from decoder.experts.cache import ExpertCache
from decoder.experts.provider import ExpertSource, decode_expert_blob
from decoder.gating import CostAwareGating
from decoder.model.config import ModelConfig
from expert_store.client import StoreClient
from expert_store.fetch_pool import FetchPool

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)
L, E = 4, 8
MODEL = "tiny"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_packed_store(tmp_path_factory.mktemp("store-prefetch"), precisions=("bf16", "int4"), group_size=32,
                             hidden=64, ffn=96, layers=L, experts=E, seed=5)


@pytest.fixture
def store(store_dir, tmp_path, request):
    latency = getattr(request, "param", 0)
    server = StoreServerProcess(store_dir, "--ram-bytes", "0", "--inject-latency-ms", str(latency),
                                log_dir=tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def source(client, precision="bf16"):
    m = client.manifest(MODEL)
    return ExpertSource(client=client, model=MODEL, config=ModelConfig.from_hf(m.config), manifest=m,
                        precision=precision, dtype=torch.float32)


def make_cache(client, host_experts: int, **kw) -> ExpertCache:
    probe = ExpertCache(source(client), gpu_slots=[1] * L, host_cache_bytes=0)
    slot = probe.host_slot_bytes
    probe.close()
    return ExpertCache(source(client), gpu_slots=[2] * L, host_cache_bytes=slot * host_experts, **kw)


def use(cache, layer, expert, x):
    cache.prepare(layer, [expert])
    y = cache.get(layer, expert)(x)
    cache.release(layer, [expert])
    return y


def test_host_tier_prefetch_fetched_once_and_used(store):
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    with StoreClient.open(store.address) as client:
        cache = make_cache(client, host_experts=8, host_prefetch=1)
        try:
            assert cache.host_prefetch == 1
            assert cache.location(2, 5) == "store"
            # on the GPU already, or in the host tier: nothing to fetch
            use(cache, 0, 1, x)
            assert cache.prefetch_host(0, [1]) == 0
            n0 = cache.stats()["tiers"]["store"]["loads"]
            assert cache.prefetch_host(2, [5, 6], [0.9, 0.5]) == 2
            assert cache.prefetch_host(2, [5]) == 0          # queued already
            assert cache.wait_host_prefetch(60)
            s = cache.stats()
            assert s["host_prefetch_requests"] == 2 and s["host_prefetch_loads"] == 2, s
            assert s["tiers"]["store"]["loads"] == n0 + 2
            assert cache.location(2, 5) == cache.location(2, 6) == "host"
            assert cache.resident(2) == []                      # the host tier only, not the GPU
            # the GPU load finds it in the host tier: no store fetch, a prefetch used
            y = use(cache, 2, 5, x)
            s = cache.stats()
            assert s["tiers"]["store"]["loads"] == n0 + 2 and s["host_prefetch_useful"] == 1, s
            assert torch.equal(y, decode_expert_blob(client.fetch_expert(MODEL, 2, 5, "bf16"))(x))
            assert cache.prefetch_host(2, [5, 6]) == 0          # both in a tier now
        finally:
            cache.close()


@pytest.mark.parametrize("store", [300], indirect=True)
def test_load_waits_for_host_prefetch_in_flight(store):
    torch.manual_seed(1)
    x = torch.randn(2, 64)
    with StoreClient.open(store.address, deadline_s=30) as client:
        cache = make_cache(client, host_experts=8, host_prefetch=1)
        try:
            n0 = cache.stats()["tiers"]["store"]["loads"]
            assert cache.prefetch_host(3, [2]) == 1
            assert wait_until(lambda: (3, 2) in cache.host.fetching, timeout=30)
            use(cache, 3, 2, x)                                 # the demand load waits for that fetch
            s = cache.stats()
            assert s["host_prefetch_waited"] == 1 and s["tiers"]["store"]["loads"] == n0 + 1, s
            assert s["host_prefetch_loads"] == 1 and s["host_prefetch_useful"] == 1
        finally:
            cache.close()


@pytest.mark.parametrize("store", [300], indirect=True)
def test_fetch_pool_background_bounded_behind_demand(store):
    with FetchPool(store.address, MODEL, workers=2, slots=8, background_limit=1) as pool:
        bg = [pool.submit(1, e, "bf16", priority="background") for e in range(4)]
        seen_bg = []

        def snapshot():
            refs = [r for r in pool.inflight().values()]
            seen_bg.append(sum(1 for r in refs if r[0] == 1))
            return refs

        assert wait_until(lambda: len(snapshot()) >= 1, timeout=30)
        demand = pool.submit(2, 0, "bf16", priority="demand")
        # the second worker takes the demand, never a second background request
        assert wait_until(lambda: (2, 0, "bf16") in snapshot(), timeout=30)
        demand.result(timeout=60)
        for f in bg:
            f.result(timeout=60)
            snapshot()
        assert max(seen_bg) == 1, seen_bg
        assert pool.stats()["completed"] == 5


class StepClock:
    """A fake clock for the prefetcher: every reading is `step` seconds after the last, so the
    time between two MoE inputs (its layer time, before the stalls are taken off) is `step`."""

    def __init__(self, step: float) -> None:
        self.t = itertools.count()
        self.step = step

    def __call__(self) -> float:
        return next(self.t) * self.step


def run_store_lookahead(address: str, tokens: int = 10, gpu: bool = True) -> tuple[dict, dict]:
    with StoreClient.open(address, deadline_s=30) as client:
        probe = ExpertCache(source(client), gpu_slots=[1] * L, host_cache_bytes=0)
        slot, gslot = probe.host_slot_bytes, probe.slot_bytes
        probe.close()
        with Engine.from_store(client, MODEL, gating="topk", gpu_cache_bytes=(2 * L + 2) * gslot,
                               host_cache_bytes=slot * (L * E // 2), cache_options={"host_prefetch": 1},
                               prefetch_options={"clock": StepClock(0.1), "gpu": gpu}) as eng:
            eng.generate("Once upon a time", max_tokens=tokens)
            pf = eng.prefetchers[0]
            return eng.stats(), pf.stats()


def test_store_lookahead_follows_store_latency(store_dir, tmp_path):
    """A layer 'computes' 100 ms (the fake clock, minus the real stalls): a store that answers in
    a few ms needs its fetches started one layer ahead, one that takes 400 ms at least 4: the
    bound (the model's 4 layers), reaching into the next token."""
    fast_srv = StoreServerProcess(store_dir, "--ram-bytes", "0", log_dir=tmp_path / "fast").start()
    try:
        fast, fast_pf = run_store_lookahead(fast_srv.address)
    finally:
        fast_srv.stop()
    slow_srv = StoreServerProcess(store_dir, "--ram-bytes", "0", "--inject-latency-ms", "400",
                                  log_dir=tmp_path / "slow").start()
    try:
        slow, slow_pf = run_store_lookahead(slow_srv.address, tokens=6)
    finally:
        slow_srv.stop()
    for pf in (fast_pf, slow_pf):
        assert pf["max_store_lookahead"] == L
        assert sum(pf["store_lookahead_hist"].values()) > 0
    # the rule, on what each run measured: k_store = ceil(t_store / t_compute), in [1, L]
    assert fast_pf["store_fetch_s"] < fast_pf["layer_compute_s"] <= 0.1, fast_pf
    assert slow_pf["store_fetch_s"] >= 0.4 and slow_pf["layer_compute_s"] <= 0.1, slow_pf
    fh, sh = fast_pf["store_lookahead_hist"], slow_pf["store_lookahead_hist"]
    # before the compute time is measured (the first MoE input) k_store is 1; then the fast store
    # stays at 1 and the slow one goes to the bound
    assert set(fh) == {1}, fh
    assert sh.get(L, 0) >= sum(sh.values()) - 2, sh
    # fetches into the host tier were started, on the slow store also for the next token's layers
    assert slow_pf["store_prefetches"] > 0 and slow_pf["store_prefetches_next_token"] > 0, slow_pf
    # those for the next token are checked against its routing (a step in between, prefill, is
    # only the first)
    assert slow_pf["store_next_token_checked"] > 0, slow_pf
    assert 0.0 <= slow_pf["store_next_token_precision"] <= 1.0
    p = slow["provider"]
    assert p["host_prefetch_requests"] >= slow_pf["store_prefetches"]
    assert p["host_prefetch_loads"] > 0


def test_store_lookahead_without_gpu_prefetch(store_dir, tmp_path):
    """gpu=False (the decoder's default on a link-bound GPU): no prefetch copies into GPU slots,
    yet predicted host-tier misses still start store fetches, as far ahead as the store's
    latency needs."""
    srv = StoreServerProcess(store_dir, "--ram-bytes", "0", "--inject-latency-ms", "400",
                             log_dir=tmp_path / "slow").start()
    try:
        st, pf = run_store_lookahead(srv.address, tokens=6, gpu=False)
    finally:
        srv.stop()
    assert pf["prefetches_issued"] == 0 and pf["predicted"] == 0, pf
    assert pf["store_prefetches"] > 0 and pf["store_prefetches_next_token"] > 0, pf
    assert st["provider"]["host_prefetch_loads"] > 0
    assert st["provider"]["prefetch_requests"] == 0


@pytest.mark.parametrize("store", [100], indirect=True)
def test_cost_aware_prices_store_only_experts_higher(store):
    """The same expert-2 weight: kept when that expert is in the host tier, dropped when its
    only copy is in the (100 ms) store, whose measured fetch time is its price."""
    torch.manual_seed(2)
    x = torch.randn(1, 64)
    with StoreClient.open(store.address, deadline_s=30) as client:
        cache = make_cache(client, host_experts=8, host_prefetch=0)
        try:
            for e in range(4):        # measure the store and host costs: into the host tier, then to the GPU
                use(cache, 1, e, x)   # two GPU slots per layer: (1, 0) and (1, 1) left them
            assert cache.location(1, 0) == "host" and cache.location(1, 7) == "store"
            assert cache.load_cost("store") > 10 * cache.load_cost("host") > 0
            g = CostAwareGating(2, L, [1.0] * L, budget=0.01, provider=cache, loss_bound=1e9)
            assert g.scale("store") > 10 * g.scale("host")
            w2 = 0.15                 # F w2^2 = 0.0225: above T x host's scale, below T x the store's
            drops, _ = g.decide_rows(1, [[3.0, 0.0, 1 - w2, w2]])       # expert 0: in the host tier
            assert drops == [0]
            drops, _ = g.decide_rows(1, [[3.0, 7.0, 1 - w2, w2]])       # expert 7: only in the store
            assert drops == [1]
            assert g.stats()["expert2_location"] == {"host": 1, "store": 1}
        finally:
            cache.close()


def test_low_precision_over_the_wire_only_when_allowed(store):
    torch.manual_seed(3)
    x = torch.randn(2, 64)
    with StoreClient.open(store.address) as client:
        cache = make_cache(client, host_experts=8, host_prefetch=0, miss_precision="int4",
                           low_precision_misses="store")
        try:
            use(cache, 2, 0, x)
            use(cache, 2, 1, x)
            use(cache, 2, 2, x)        # (2, 0) evicted from the GPU, still in the host tier
            assert cache.location(2, 0) == "host" and cache.location(2, 5) == "store"
            low0 = cache.stats()["tiers"]["gpu-int4"]["loads"]
            # not allowed: a store-only miss comes at full precision
            ref5 = decode_expert_blob(client.fetch_expert(MODEL, 2, 5, "bf16"))(x)
            assert torch.equal(use(cache, 2, 5, x), ref5)
            s = cache.stats()
            assert s["tiers"]["gpu-int4"]["loads"] == low0 and s["low_precision_store_misses"] == 0
            # allowed (the gating's hint for low-weight experts): only the store-only one goes int4
            cache.allow_low_precision(2, [0, 6])
            ref0 = decode_expert_blob(client.fetch_expert(MODEL, 2, 0, "bf16"))(x)
            ref6 = decode_expert_blob(client.fetch_expert(MODEL, 2, 6, "int4"))(x)
            cache.prepare(2, [0, 6])
            y0, y6 = cache.get(2, 0)(x), cache.get(2, 6)(x)
            cache.release(2, [0, 6])
            assert torch.equal(y0, ref0)                       # from the host tier, full precision
            assert torch.allclose(y6, ref6, rtol=1e-4, atol=1e-4)   # int4 over the wire
            s = cache.stats()
            assert s["tiers"]["gpu-int4"]["loads"] == low0 + 1 and s["low_precision_store_misses"] == 1, s
            assert s["low_precision_misses"] == "store"
        finally:
            cache.close()


def test_host_prefetch_default_only_for_a_partial_host_tier(store):
    """On by default only where it can help: a host tier that keeps some experts but not all
    (the store-remote case); a full host tier (every expert in host memory) or none has no store
    fetches for predictions, and its prefetcher no store lookahead (its predictions stay as before)."""
    from decoder.experts.prefetch import Prefetcher

    with StoreClient.open(store.address) as client:
        for experts, want in ((0, 0), (L * E // 2, 1), (L * E, 0)):
            cache = make_cache(client, host_experts=experts)
            try:
                assert cache.host_prefetch == want, (experts, cache.host_capacity)
                pf = Prefetcher([torch.zeros(E, 64)] * L, cache)
                assert pf.max_store_lookahead == (L if want else 0)
                assert [pf.static_distance(l) for l in range(L)] == ([L] * L if want else [3, 2, 1, 0])
            finally:
                cache.close()
