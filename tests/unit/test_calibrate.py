"""Calibration: F_l from autograd equals an independent finite-difference computation; profile
schema checks; windows."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import make_packed_store
from decoder import Engine
from decoder.calibrate import (PROFILE_SCHEMA, PROFILE_VERSION, build_profile, calibrate_model, token_windows,
                               validate_profile)
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)
L, E = 2, 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    store = make_packed_store(tmp_path_factory.mktemp("calib"), hidden=32, ffn=48, layers=L, experts=E, seed=21)
    with StoreClient.open(str(store)) as c:
        with Engine.from_store(c, "tiny", dtype=torch.float64, prefetch=False) as eng:
            yield eng


def finite_difference_sensitivity(model, ids, eps=1e-2):
    """F_l = mean_t 0.5 * (dLoss/d eps)^2 for the perturbation out_l[t] += eps * (E1(x_t) - E2(x_t)),
    with dLoss/d eps by central differences (no autograd)."""
    import torch.nn.functional as F

    from decoder.model.transformer import MoEObserver

    class Rec(MoEObserver):
        x, route = {}, {}

        def on_moe_input(self, layer, x):
            self.x[layer] = x.detach().clone()

        def on_routing(self, layer, logits, w, idx):
            self.route[layer] = idx.detach().clone()

    rec = Rec()
    model.add_observer(rec)
    with torch.no_grad():
        model(ids[None])
    model.remove_observer(rec)
    S = ids.numel()
    out = []
    for l in range(L):
        deltas = []
        for t in range(S - 1):
            e1, e2 = (int(v) for v in rec.route[l][t])
            x = rec.x[l][t:t + 1]
            with torch.no_grad():
                deltas.append((model.experts.get(l, e1)(x) - model.experts.get(l, e2)(x))[0])
        total = 0.0
        for t in range(S - 1):
            def loss_at(scale):
                def hook(module, inputs, output):
                    output = output.clone()
                    output[0, t] += scale * deltas[t]
                    return output
                h = model.layers[l].block_sparse_moe.register_forward_hook(hook)
                try:
                    with torch.no_grad():
                        logits = model(ids[None])
                        return float(F.cross_entropy(logits[0, :-1], ids[1:], reduction="sum"))
                finally:
                    h.remove()
            d = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
            total += 0.5 * d * d
        out.append(total / (S - 1))
    return out


def test_sensitivity_matches_finite_differences(engine):
    ids = torch.tensor([1, 40, 7, 99, 3, 150, 22, 8, 61, 5], dtype=torch.long)
    measured = calibrate_model(engine.model, [ids], budget=1e-3)
    want = finite_difference_sensitivity(engine.model, ids)
    assert all(w > 0 for w in want)
    for got, ref in zip(measured["sensitivity"], want):
        assert got == pytest.approx(ref, rel=1e-3)   # FD noise: RMSNorm computes in float32
    assert measured["tokens"] == ids.numel() - 1
    # calibration leaves the model as it was: routing restored, no hooks, no grads kept
    assert type(engine.model.gating).__name__ == "TopKGating"
    assert all(not p.requires_grad or p.grad is None for p in engine.model.parameters())
    assert not any(m._forward_hooks for m in engine.model.modules())


def test_budget_ratios_and_profile(engine):
    windows = token_windows(list(range(3, 300, 3)), seq_len=32, max_tokens=90)
    assert [w.numel() for w in windows] == [32, 32, 26]
    m = calibrate_model(engine.model, windows)
    # the recorded single-expert ratio at the 25% budget is 25% over all decisions
    total = sum(m["single_expert_ratio"]) / L
    assert total == pytest.approx(0.25, abs=0.02)
    assert m["budget"] == m["budget_for_single_ratio"]["0.25"]
    assert len(m["prefetch_accuracy_by_distance"]) == 1   # L - 1 distances
    p = build_profile("tiny", m, engine.config, text_file="/x/y.txt", seq_len=32)
    assert p["schema"] == PROFILE_SCHEMA and p["version"] == PROFILE_VERSION and p["text_file"] == "y.txt"
    assert validate_profile(json.dumps(p), L, E)["tokens"] == m["tokens"]
    for bad, msg in [({**p, "version": 99}, "version"), ({**p, "schema": "x"}, "schema"),
                     ({**p, "sensitivity": [1.0]}, "sensitivity"), ({**p, "sensitivity": [-1.0, 1.0]}, "sensitivity")]:
        with pytest.raises(ValueError, match=msg):
            validate_profile(bad, L, E)
    with pytest.raises(ValueError, match="layers"):
        validate_profile(p, L + 1, E)
    with pytest.raises(ValueError):
        token_windows([1, 2, 3], seq_len=1, max_tokens=3)


# --- top-k > 2, every router variant --------------------------------------------------------
class DropTail:
    """Top-k routing with the last `n` experts of token `t` dropped and the rest renormalised
    (the gating's own transform), every other token untouched."""

    def __init__(self, k, t=None, n=0):
        self.k, self.t, self.n = k, t, n

    def route(self, layer, router_logits):
        from decoder.routing import topk_route

        w, i = topk_route(router_logits, self.k)
        if self.n and self.t is not None:
            i, w = i.clone(), w.clone()
            i[self.t, self.k - self.n:] = -1
            w[self.t, self.k - self.n:] = 0
            w[self.t] = w[self.t] / w[self.t].sum()
        return w, i


def family_model(family, seed):
    from decoder.model.config import ModelConfig
    from decoder.model.transformer import Transformer

    kw = {"qwen3_moe": dict(family="qwen3_moe", qk_norm="head", norm_topk_prob=True),
          "qwen2_moe": dict(family="qwen2_moe", qkv_bias=True, norm_topk_prob=False,
                            shared_expert_intermediate_size=20),
          "deepseek_v3": dict(family="deepseek_v3", router_scores="sigmoid", score_correction_bias=True,
                              norm_topk_prob=True, n_group=2, topk_group=1, routed_scaling_factor=2.5),
          "gpt_oss": dict(family="gpt_oss", router_bias=True, expert_act="swiglu_clamped", expert_bias=True,
                          swiglu_limit=1.0, norm_topk_prob=True)}[family]
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=4,
                      max_position_embeddings=32, **kw)
    m = Transformer(cfg)
    m.init_weights(std=0.4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters()):
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.double().eval()


def finite_difference_topk(model, ids, eps=1e-3):
    """F_l = mean over tokens t and tail sizes m of 0.5 * (dLoss/d eps)^2 for out_l[t] += eps * v,
    v = (MoE output with token t's m last experts dropped - with none dropped) / W_m (the dropped
    decision weight, decoder/gating.py): the
    direction taken from the MoE block itself (no algebra of calibrate's), the derivative by
    central differences (no autograd)."""
    import torch.nn.functional as F

    from decoder.routing import MoEObserver

    k = model.config.num_experts_per_tok

    class Rec(MoEObserver):
        x, w = {}, {}

        def on_moe_input(self, layer, x):
            self.x[layer] = x.detach().clone()

        def on_routing(self, layer, logits, w, idx):
            self.w[layer] = w.detach().clone()

    rec = Rec()
    model.add_observer(rec)
    with torch.no_grad():
        model(ids[None])
    model.remove_observer(rec)
    S = ids.numel()
    out = []
    for l in range(model.config.num_hidden_layers):
        moe = model.layers[l].block_sparse_moe
        x = rec.x[l][None]                                            # [1, S, H]
        with torch.no_grad():
            full = moe(x, model.experts, DropTail(k), [])[0]
        total = 0.0
        for t in range(S - 1):
            w = rec.w[l][t]
            for m in range(1, k):
                with torch.no_grad():
                    dropped = moe(x, model.experts, DropTail(k, t, m), [])[0]
                # the gating's decision weight: the dropped share when the family renormalises,
                # else the router weight that goes (sigmoid scores without the scaling factor)
                W = float(w[k - m:].sum() / (w.sum() if moe.renormalize else moe.scaling))
                v = (dropped[t] - full[t]) / W
                torch.testing.assert_close(dropped[:t], full[:t], rtol=0, atol=1e-12)   # only token t changed

                def loss_at(scale):
                    def hook(module, inputs, output):
                        output = output.clone()
                        output[0, t] += scale * v
                        return output
                    h = moe.register_forward_hook(hook)
                    try:
                        with torch.no_grad():
                            logits = model(ids[None])
                            return float(F.cross_entropy(logits[0, :-1], ids[1:], reduction="sum"))
                    finally:
                        h.remove()
                d = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
                total += 0.5 * d * d / (k - 1)
        out.append(total / (S - 1))
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_top_k_sensitivity_matches_finite_differences(family):
    """Top-4 of 8, each router variant: renormalised softmax (Qwen3-MoE), unrenormalised with a
    gated shared expert (Qwen2-MoE), sigmoid scores x routed scaling (DeepSeek-V3), router
    bias with biased clamped experts (GPT-OSS): calibrate's F_l (autograd, tail directions from
    the derivation) equals F_l from the blocks' own outputs and finite differences."""
    model = family_model(family, seed=31)
    ids = torch.tensor([1, 40, 7, 59, 3, 50, 22, 8], dtype=torch.long)
    measured = calibrate_model(model, [ids], budget=1e-3)
    want = finite_difference_topk(model, ids)
    assert all(w > 0 for w in want)
    for got, ref in zip(measured["sensitivity"], want):
        assert got == pytest.approx(ref, rel=1e-3)   # FD noise: RMSNorm and the router compute in float32
    # budgets are quantiles over every droppable expert use (k - 1 per token): 2 layers x 7 x 3
    m = calibrate_model(model, [ids])
    ratio = sum(m["single_expert_ratio"]) / 2
    assert m["budget"] == m["budget_for_single_ratio"]["0.25"] and 0.25 <= ratio < 0.25 + 2 / 42


def test_budget_for_a_perplexity_target(engine):
    """The quality budget drops the most experts whose perplexity stays within the target: the
    next point of the curve is past it (or the curve's end), and the decoder takes it as its
    default budget."""
    from decoder.calibrate import budget_for_quality, parse_rise, perplexity
    from decoder.gating import make_gating
    from decoder.routing import TopKGating

    V = engine.config.vocab_size
    ids = [(7 * i + 3) % V for i in range(200)]
    m = calibrate_model(engine.model, token_windows(ids, seq_len=32, max_tokens=100))
    held = token_windows(ids[100:], seq_len=32, max_tokens=96)
    curve = m["budget_curve"]
    assert [r for r, _ in curve] == pytest.approx([i / 20 for i in range(1, 20)])
    assert all(a[1] <= b[1] for a, b in zip(curve, curve[1:]))           # T grows with the ratio
    base = perplexity(engine.model, held, TopKGating(2))
    for rise in (0.0001, 0.02):   # this random model barely minds drops: a tight target too
        q = budget_for_quality(engine.model, held, m, rise)
        assert q["ppl_topk"] == pytest.approx(base)
        assert q["ppl_at_budget"] <= (1 + rise) * base
        i = next((i for i, (_, T) in enumerate(curve) if T == q["budget"]), None)
        if q["drop_ratio"] == 0.0:   # not even 5% of the drops within the target
            assert q["budget"] == 0.0
        else:
            assert i is not None
            if i + 1 < len(curve):   # one point further is past the target
                g = make_gating("adaptive", config=engine.config, budget=curve[i + 1][1], sensitivity=m["sensitivity"])
                assert perplexity(engine.model, held, g) > (1 + rise) * base
        assert len(q["evaluated"]) <= 5   # a bisection over 19 points
    p = build_profile("tiny", {**m, "budget_for_ppl_rise": {"0.02": q["budget"]}}, engine.config,
                      text_file=None, seq_len=32)
    validate_profile(p, L, E)
    g = make_gating("adaptive", config=engine.config, profile=p)
    assert g.budget == q["budget"]                                        # the decoder's default
    assert make_gating("adaptive", config=engine.config, profile=p, single_expert_ratio=0.25).budget == \
        m["budget_for_single_ratio"]["0.25"]
    with pytest.raises(ValueError, match="budget_for_ppl_rise"):
        validate_profile({**p, "budget_for_ppl_rise": {"2": 1.0}}, L, E)
    assert parse_rise("1%") == pytest.approx(0.01) and parse_rise("0.005") == 0.005
    import argparse
    for bad in ("x", "0", "150%"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rise(bad)
