"""Gating: topk reference, adaptive T=0 == topk exactly, uniform/adaptive/cost-aware decisions."""
import pytest
import torch

from decoder.gating import (AdaptiveGating, CostAwareGating, CountingTopK, UniformThresholdGating, make_gating)
from decoder.model.config import ModelConfig
from decoder.model.transformer import topk_route


def _logits(T=64, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g) * 2


def test_adaptive_budget_zero_equals_topk_exactly():
    for seed in range(5):
        logits = _logits(seed=seed)
        w0, i0 = topk_route(logits, 2)
        for layer in range(3):
            w, i = AdaptiveGating(2, 3, [0.0, 1.0, 1e9], budget=0.0).route(layer, logits)
            assert torch.equal(w, w0) and torch.equal(i, i0)
        w, i = CountingTopK(2, 3).route(0, logits)
        assert torch.equal(w, w0) and torch.equal(i, i0)


def test_adaptive_rule_drops_exactly_when_F_w2sq_below_T():
    logits = _logits(T=200, seed=3)
    w0, i0 = topk_route(logits, 2)
    F, T = [4.0], 0.1
    g = AdaptiveGating(2, 1, F, budget=T)
    w, i = g.route(0, logits)
    drop = F[0] * w0[:, 1] ** 2 < T
    assert 0 < int(drop.sum()) < 200
    assert torch.equal(i[:, 0], i0[:, 0])
    assert torch.all(i[drop, 1] == -1) and torch.all(w[drop, 1] == 0) and torch.all(w[drop, 0] == 1)
    assert torch.equal(i[~drop], i0[~drop]) and torch.equal(w[~drop], w0[~drop])
    s = g.stats()
    assert s["decisions"] == 200
    assert s["single_expert_ratio"] == pytest.approx(float(drop.float().mean()))
    assert s["experts_per_token"] == pytest.approx(2 - float(drop.float().mean()))
    assert s["est_loss_per_token"] == pytest.approx(float((F[0] * w0[drop, 1] ** 2).sum()) / 200, rel=1e-5)


def test_all_dropped_leaves_one_expert_per_token():
    # decided on the device: the shape stays [T, k]; the dropped slot is id -1 with weight 0
    logits = _logits(T=3, seed=1)
    w, i = AdaptiveGating(2, 1, [1.0], budget=10.0).route(0, logits)
    assert w.shape == (3, 2) and i.shape == (3, 2)
    assert torch.equal(i[:, 1], torch.full((3,), -1)) and torch.equal(w[:, 1], torch.zeros(3))
    assert torch.equal(w[:, 0], torch.ones(3)) and torch.equal(i[:, 0], torch.argmax(logits, dim=-1))


def test_uniform_threshold_same_for_every_layer():
    logits = _logits(T=100, seed=2)
    w0, _ = topk_route(logits, 2)
    g = UniformThresholdGating(2, 2, threshold=0.3)
    for layer in range(2):
        _, i = g.route(layer, logits)
        assert torch.equal(i[:, 1] == -1, w0[:, 1] < 0.3)
    with pytest.raises(ValueError):
        UniformThresholdGating(2, 2, threshold=1.5)


class FixedCosts:
    """Where experts are and what loading them costs: a fixed table (the live cache is tested
    in tests/integration/test_adapmoe.py)."""

    def __init__(self, where, costs):
        self.where, self.costs = where, costs

    def location(self, layer, expert):
        return self.where.get(expert, "store")

    def load_cost(self, location):
        return self.costs[location]


def expected_scales(g, locs, costs):
    """CostAwareGating's documented rule replayed for one-token calls: scale = load_cost(loc) /
    min(mean, load_cost("host")), mean the load cost of the earlier experts 2 (0 on the GPU):
    plain mean of the first 1/g.mean_alpha, EWMA (weight g.mean_alpha) after;
    load_cost(loc) / load_cost("host") while there is no mean or it is 0."""
    mean, n, out = None, 0, []
    for loc in locs:
        if loc == "gpu":
            out.append(0.0)
        else:
            out.append(costs[loc] / (costs["host"] if not mean else min(mean, costs["host"])))
        n += 1
        mean = (mean or 0.0) + max(g.mean_alpha, 1 / n) * (costs[loc] - (mean or 0.0))
    return out


def test_cost_aware_budget_follows_tier_cost_and_loss_bound():
    # store misses dominate: the mean cost of an expert 2 exceeds one host copy, so T stays the
    # budget of a host copy and a store miss gets store / host = 5 (a slow link drops more)
    E = 8
    logits = _logits(T=400, E=E, seed=5)
    w0, i0 = topk_route(logits, 2)
    est = 1.0 * w0[:, 1].double() ** 2
    where = {0: "gpu", 1: "gpu", 2: "host", 3: "host"}
    prov = FixedCosts(where, {"gpu": 0.0, "host": 1e-3, "store": 5e-3})
    T = 0.01
    g = CostAwareGating(2, 1, [1.0], budget=T, provider=prov, loss_bound=1e9)
    locs = [where.get(int(i0[t, 1]), "store") for t in range(400)]
    scales = expected_scales(g, locs, prov.costs)
    seen = {"gpu": 0, "host": 0, "store": 0}
    for t in range(400):  # decode: one token per forward
        _, i = g.route(0, logits[t:t + 1])
        loc = locs[t]
        old = {"gpu": 0.0, "host": 1.0, "store": 5.0}[loc]    # load cost / one host copy
        assert scales[t] >= old and (t < 50 or scales[t] == old)   # mean above a host copy once warm
        want = bool(est[t] < T * scales[t])
        seen[loc] += want
        assert (int(i[0, -1]) == -1) == want, (t, loc)
    assert seen["host"] > 0 and seen["store"] > seen["host"] and seen["gpu"] == 0
    s = g.stats()
    assert s["expert2_location"]["gpu"] > 0
    assert s["expert2_mean_cost_s"] > prov.costs["host"] and s["budget_normaliser_s"] == prov.costs["host"]
    assert s["budget_scale_now"] == {"gpu": 0.0, "host": 1.0, "store": 5.0}
    # in a batch, an expert 2 that is some other token's expert 1 is loaded anyway: kept
    _, i = CostAwareGating(2, 1, [1.0], budget=1.0, provider=FixedCosts({}, prov.costs)).route(0, logits)
    first = set(i0[:, 0].tolist())
    assert all((int(i[t, 1]) == -1) == (int(i0[t, 1]) not in first) for t in range(400))


def test_cost_aware_half_on_gpu_spends_twice_T_on_host_misses():
    # every expert in the host tier, half of them also on the GPU: the mean cost of an expert 2
    # is ~half a host copy, so a host miss is dropped below ~2T and a GPU expert 2 never
    E, N = 8, 2000
    logits = _logits(T=N, E=E, seed=11)
    w0, i0 = topk_route(logits, 2)
    est = 2.0 * w0[:, 1].double() ** 2
    where = {e: ("gpu" if e < E // 2 else "host") for e in range(E)}
    prov = FixedCosts(where, {"gpu": 0.0, "host": 1e-3, "store": 5e-3})
    T = float(est.quantile(0.15))
    g = CostAwareGating(2, 1, [2.0], budget=T, provider=prov, loss_bound=1e9)
    locs = [where[int(i0[t, 1])] for t in range(N)]
    scales = expected_scales(g, locs, prov.costs)
    beyond_T = {"gpu": 0, "host": 0}     # dropped although F * w2^2 >= T (adaptive would keep it)
    dropped = {"gpu": 0, "host": 0}
    for t in range(N):
        _, i = g.route(0, logits[t:t + 1])
        d = int(i[0, -1]) == -1
        assert d == bool(est[t] < T * scales[t]), (t, locs[t], scales[t])
        dropped[locs[t]] += d
        beyond_T[locs[t]] += d and bool(est[t] >= T)
    assert dropped["gpu"] == 0 and beyond_T["host"] > 0
    host_scales = [sc for sc, loc in zip(scales[100:], locs[100:]) if loc == "host"]
    assert 1.6 < sum(host_scales) / len(host_scales) < 2.5          # ~ 1 / (fraction of misses)
    s = g.stats()
    assert s["expert2_location"]["gpu"] + s["expert2_location"]["host"] == N
    assert 0.3 < s["expert2_mean_cost_s"] / prov.costs["host"] < 0.7
    assert s["budget_normaliser_s"] == s["expert2_mean_cost_s"]
    assert 1.4 < s["budget_scale_now"]["host"] < 3.3 and s["budget_scale_now"]["gpu"] == 0.0
    assert 0.85 < s["mean_budget_scale"] < 1.2                      # the threshold averages ~T
    assert s["capped_by_bound"] == 0


def test_cost_aware_all_on_host_decides_as_adaptive():
    # nothing on the GPU, every expert one host copy away: scale 1, adaptive's decisions
    L, N = 3, 300
    x = _logits(T=N, seed=13)
    F = [1.0, 3.0, 0.5]
    prov = FixedCosts({e: "host" for e in range(8)}, {"gpu": 0.0, "host": 2e-3, "store": 9e-3})
    w0, _ = topk_route(x, 2)
    T = float(w0[:, 1].double().pow(2).quantile(0.4))
    g = CostAwareGating(2, L, F, budget=T, provider=prov, loss_bound=1e9)
    a = AdaptiveGating(2, L, F, budget=T)
    for t in range(N):
        for layer in range(L):
            wc, ic = g.route(layer, x[t:t + 1])
            wa, ia = a.route(layer, x[t:t + 1])
            assert torch.equal(ic, ia) and torch.equal(wc, wa), (t, layer)
    s, sa = g.stats(), a.stats()
    assert s["single_expert_ratio"] == sa["single_expert_ratio"] > 0
    assert s["budget_scale_now"]["host"] == 1.0 and s["mean_budget_scale"] == 1.0
    assert s["expert2_location"] == {"host": N * L}


def test_cost_aware_rare_misses_large_scale_capped_by_default_bound():
    # 7 of 8 experts on the GPU: a host miss gets a large scale, the default per-token bound
    # (L x T) keeps each token's estimated loss in check
    L, N, E = 4, 200, 8
    x = _logits(T=N, E=E, seed=17)
    where = {e: ("gpu" if e < 7 else "host") for e in range(E)}
    prov = FixedCosts(where, {"gpu": 0.0, "host": 1e-3, "store": 5e-3})
    w0, i0 = topk_route(x, 2)
    T = float(w0[:, 1].double().pow(2).quantile(0.1))
    g = CostAwareGating(2, L, [1.0] * L, budget=T, provider=prov)
    assert g.loss_bound == L * T
    for t in range(N):
        spent = 0.0
        for layer in range(L):
            _, i = g.route(layer, x[t:t + 1])
            if i.shape[1] == 1:
                assert int(i0[t, 1]) == 7                               # only the host misses
                spent += float(w0[t, 1]) ** 2
        assert spent <= L * T + 1e-12
    s = g.stats()
    assert s["budget_scale_now"]["host"] > 4                          # ~ 1 / (fraction of misses)
    assert s["capped_by_bound"] > 0 and s["single_expert_ratio"] > 0


def test_cost_aware_without_load_cost_uses_unit_costs():
    class LocationsOnly:
        def location(self, layer, expert):
            return {0: "gpu", 1: "gpu", 2: "host", 3: "host"}.get(expert, "store")

    x = _logits(T=300, seed=19)
    w0, i0 = topk_route(x, 2)
    est = w0[:, 1].double() ** 2
    T = float(est.quantile(0.05))
    g = CostAwareGating(2, 1, [1.0], budget=T, provider=LocationsOnly(), loss_bound=1e9, store_cost_ratio=4.0)
    for t in range(300):
        _, i = g.route(0, x[t:t + 1])
        scale = {"gpu": 0.0, "host": 1.0, "store": 4.0}[LocationsOnly().location(0, int(i0[t, 1]))]
        assert (int(i[0, -1]) == -1) == bool(est[t] < T * scale)
    s = g.stats()
    assert s["expert2_mean_cost_s"] is None and s["budget_scale_now"] == {"gpu": 0.0, "host": 1.0, "store": 4.0}


def test_cost_aware_per_token_loss_bound():
    prov = FixedCosts({}, {"gpu": 0.0, "host": 1e-3, "store": 5e-3})
    L, bound = 4, 0.05
    g = CostAwareGating(2, L, [1.0] * L, budget=1.0, provider=prov, loss_bound=bound)
    x = _logits(T=60, seed=9)
    w0, _ = topk_route(x, 2)
    for t in range(60):
        spent = 0.0
        for layer in range(L):
            _, i = g.route(layer, x[t:t + 1])
            if i.shape[1] == 1:
                spent += float(w0[t, 1]) ** 2
        assert spent <= bound + 1e-12
    s = g.stats()
    assert s["capped_by_bound"] > 0 and s["single_expert_ratio"] > 0


def test_make_gating_by_name():
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                      num_experts_per_tok=2)
    assert make_gating("topk", config=cfg).name == "topk"
    assert make_gating("uniform", config=cfg, budget=0.2).threshold == 0.2
    g = make_gating("adaptive", config=cfg, budget=0.5, profile={"sensitivity": [1.0, 2.0]})
    assert g.budget == 0.5 and g.sensitivity == [1.0, 2.0]
    with pytest.raises(ValueError, match="calibrat"):
        make_gating("adaptive", config=cfg, budget=0.5, profile=None)
    with pytest.raises(ValueError, match="unknown gating"):
        make_gating("nope", config=cfg)
    with pytest.raises(ValueError):
        make_gating("adaptive", config=cfg, budget=0.5, profile={"sensitivity": [1.0]})


def test_adaptive_takes_the_calibrated_budget_by_default():
    """Without --budget, adaptive and cost-aware gating use the budget calibrate stored for the
    target single-expert ratio (0.25 unless asked otherwise); without stored budgets, a
    one-line error naming the calibrate command."""
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                      num_experts_per_tok=2)
    prof = {"sensitivity": [1.0, 2.0], "budget": 0.02,
            "budget_for_single_ratio": {"0.1": 0.004, "0.25": 0.02, "0.5": 0.09}}
    assert make_gating("adaptive", config=cfg, profile=prof).budget == 0.02
    assert make_gating("adaptive", config=cfg, profile=prof, single_expert_ratio=0.5).budget == 0.09
    assert make_gating("adaptive", config=cfg, profile=prof, budget=0.3).budget == 0.3       # an override
    assert make_gating("cost-aware", config=cfg, profile=prof, provider=object()).budget == 0.02
    with pytest.raises(ValueError, match=r"calibrate --store STORE --model MODEL .* --upload"):
        make_gating("adaptive", config=cfg, profile={"sensitivity": [1.0, 2.0]})
    with pytest.raises(ValueError, match="ratios 0.1, 0.25, 0.5, not 0.3"):
        make_gating("adaptive", config=cfg, profile=prof, single_expert_ratio=0.3)
    with pytest.raises(ValueError, match="not both"):
        make_gating("adaptive", config=cfg, profile=prof, budget=0.1, single_expert_ratio=0.25)
    with pytest.raises(ValueError, match="not 'topk'"):
        make_gating("topk", config=cfg, single_expert_ratio=0.25)
