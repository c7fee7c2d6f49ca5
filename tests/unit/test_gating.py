"""Gating: topk reference, adaptive T=0 == topk exactly, uniform/adaptive/cost-aware decisions."""
import pytest
import torch

from decoder.gating import (AdaptiveGating, CostAwareGating, TopK, UniformThresholdGating, make_gating)
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
        w, i = TopK(2, 3).route(0, logits)
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


def test_all_dropped_returns_single_column():
    logits = _logits(T=1, seed=1)
    w, i = AdaptiveGating(2, 1, [1.0], budget=10.0).route(0, logits)
    assert w.shape == (1, 1) and i.shape == (1, 1) and float(w[0, 0]) == 1.0
    assert int(i[0, 0]) == int(torch.argmax(logits[0]))


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


def test_cost_aware_budget_follows_tier_cost_and_loss_bound():
    E = 8
    logits = _logits(T=400, E=E, seed=5)
    w0, i0 = topk_route(logits, 2)
    est = 1.0 * w0[:, 1].double() ** 2
    where = {0: "gpu", 1: "gpu", 2: "host", 3: "host"}
    prov = FixedCosts(where, {"gpu": 0.0, "host": 1e-3, "store": 5e-3})
    T = 0.01
    g = CostAwareGating(2, 1, [1.0], budget=T, provider=prov, loss_bound=1e9)
    seen = {"gpu": 0, "host": 0, "store": 0}
    for t in range(400):  # decode: one token per forward
        _, i = g.route(0, logits[t:t + 1])
        loc = where.get(int(i0[t, 1]), "store")
        scale = {"gpu": 0.0, "host": 1.0, "store": 5.0}[loc]
        want = bool(est[t] < T * scale)
        seen[loc] += want
        assert (i.shape[1] == 1) == want, (t, loc)
    assert seen["host"] > 0 and seen["store"] > seen["host"] and seen["gpu"] == 0
    assert g.stats()["expert2_location"]["gpu"] > 0
    # in a batch, an expert 2 that is some other token's expert 1 is loaded anyway: kept
    _, i = CostAwareGating(2, 1, [1.0], budget=1.0, provider=FixedCosts({}, prov.costs)).route(0, logits)
    first = set(i0[:, 0].tolist())
    assert all((int(i[t, 1]) == -1) == (int(i0[t, 1]) not in first) for t in range(400))


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
