"""AdapMoE gating at top-k > 2: a token's tail (lowest weights first) goes while the estimated
loss F_l * W^2 of the dropped weight W stays under T, at least one expert kept; the same rule
uniform (W < threshold), cost-aware (per tail expert's location), on the family's own router
weights (DeepSeek-V3's sigmoid scores) and through the decode step."""

from __future__ import annotations

import pytest
import torch

from decoder import Engine
from decoder.gating import AdaptiveGating, CostAwareGating, CountingTopK, UniformThresholdGating
from decoder.model.config import ModelConfig
from decoder.model.transformer import Transformer
from decoder.routing import topk_route

torch.set_num_threads(1)


def _logits(T=300, E=16, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g) * scale


def reference_drops(w0: torch.Tensor, keep_dropping) -> list[int]:
    """Per token, the longest tail m (1..k-1) with keep_dropping(W_m) for it and every shorter one."""
    out = []
    for row in w0.double().tolist():
        n, W = 0, 0.0
        for m in range(1, len(row)):
            W += row[-m]
            if not keep_dropping(W):
                break
            n = m
        out.append(n)
    return out


def check_routing(w, i, w0, i0, drops):
    """Kept experts as top-k's, dropped ones -1 / 0, kept weights renormalised, unchanged rows exact."""
    k = w0.shape[1]
    for t, n in enumerate(drops):
        assert torch.equal(i[t, :k - n], i0[t, :k - n]) and torch.all(i[t, k - n:] == -1)
        assert torch.all(w[t, k - n:] == 0)
        if n == 0:
            assert torch.equal(w[t], w0[t])
        else:
            kept = w0[t, :k - n]
            torch.testing.assert_close(w[t, :k - n], kept / kept.sum())


@pytest.mark.parametrize("k", [3, 4, 8])
def test_adaptive_drops_the_longest_tail_under_the_budget(k):
    logits = _logits(seed=k)
    w0, i0 = topk_route(logits, k)
    F, T = 3.0, 0.02
    g = AdaptiveGating(k, 1, [F], budget=T)
    w, i = g.route(0, logits)
    drops = reference_drops(w0, lambda W: F * W * W < T)
    assert 0 < sum(drops) and any(n == 0 for n in drops) and any(0 < n < k - 1 for n in drops)
    check_routing(w, i, w0, i0, drops)
    s = g.stats()
    n = torch.tensor(drops, dtype=torch.float64)
    assert s["decisions"] == len(drops)
    assert s["experts_per_token"] == pytest.approx(k - float(n.mean()))
    assert s["single_expert_ratio"] == pytest.approx(float((n == k - 1).double().mean()))
    # estimated loss: F * W^2 of each token's dropped weight
    tails = [sum(row[k - d:]) for row, d in zip(w0.double().tolist(), drops)]
    assert s["est_loss_per_token"] == pytest.approx(sum(F * W * W for W in tails) / len(drops), rel=1e-5)


def test_budget_zero_is_top_k_and_a_huge_budget_keeps_one_expert():
    logits = _logits(T=40, E=16, seed=9)
    w0, i0 = topk_route(logits, 6)
    w, i = AdaptiveGating(6, 1, [1.0], budget=0.0).route(0, logits)
    assert torch.equal(w, w0) and torch.equal(i, i0)
    w, i = CountingTopK(6, 1).route(0, logits)
    assert torch.equal(w, w0) and torch.equal(i, i0)
    g = AdaptiveGating(6, 1, [1.0], budget=10.0)
    w, i = g.route(0, logits)
    assert torch.equal(i[:, 0], i0[:, 0]) and torch.all(i[:, 1:] == -1)
    assert torch.equal(w[:, 0], torch.ones(40)) and torch.all(w[:, 1:] == 0)
    assert g.stats()["single_expert_ratio"] == 1.0 and g.stats()["experts_per_token"] == 1.0


def test_uniform_drops_the_tail_while_its_weight_is_under_the_threshold():
    logits = _logits(seed=4)
    w0, i0 = topk_route(logits, 4)
    g = UniformThresholdGating(4, 2, threshold=0.3)
    for layer in range(2):                        # the same threshold in every layer
        w, i = g.route(layer, logits)
        check_routing(w, i, w0, i0, reference_drops(w0, lambda W: W < 0.3))


class Where:
    """Expert locations from a table; no load costs (the gating scales T by its fallback:
    0 on the GPU, 1 for a host miss, store_cost_ratio for a store miss)."""

    def __init__(self, where):
        self.where = where

    def location(self, layer, expert):
        return self.where.get(expert, "store")


def test_cost_aware_walks_the_tail_by_each_experts_location():
    E, k, F, T, ratio = 16, 4, 2.0, 0.004, 10.0
    where = {e: ("gpu" if e < 4 else "host" if e < 10 else "store") for e in range(E)}
    g = CostAwareGating(k, 2, [F, F], budget=T, provider=Where(where), loss_bound=0.05, store_cost_ratio=ratio)
    scale = {"gpu": 0.0, "host": 1.0, "store": ratio}
    logits = [_logits(seed=s) for s in (21, 22)]
    w0 = [topk_route(x, k) for x in logits]
    seen_partial = seen_capped = 0
    for t in range(300):                          # decode: one token per forward, both layers
        acc = 0.0
        for layer in range(2):
            ws, ids = w0[layer][0][t].double().tolist(), w0[layer][1][t].tolist()
            n, W, est_n = 0, 0.0, 0.0
            for m in range(1, k):
                e = ids[k - m]
                W += ws[k - m]
                loc = "gpu" if e == ids[0] else where[e]
                est = F * W * W
                if not (est < T * scale[loc] and acc + est <= 0.05):
                    seen_capped += est < T * scale[loc]
                    break
                n, est_n = m, est
            acc += est_n
            seen_partial += 0 < n < k - 1
            _, i = g.route(layer, logits[layer][t:t + 1])
            assert i[0].tolist() == ids[:k - n] + [-1] * n, (t, layer)
    assert seen_partial > 0 and seen_capped > 0
    s = g.stats()
    assert s["capped_by_bound"] == seen_capped
    assert set(s["expert2_location"]) == {"gpu", "host", "store"}


def _deepseek_like(seed: int) -> Transformer:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_local_experts=8,
                      num_experts_per_tok=4, family="deepseek_v3", router_scores="sigmoid",
                      score_correction_bias=True, norm_topk_prob=True, n_group=2, topk_group=1,
                      routed_scaling_factor=2.5)
    m = Transformer(cfg)
    m.init_weights(std=0.3, seed=seed)
    with torch.no_grad():
        m.layers[0].block_sparse_moe.gate.e_score_correction_bias.copy_(
            torch.randn(8, generator=torch.Generator().manual_seed(seed + 1)) * 0.3)
    return m.eval()


def test_a_sigmoid_router_is_judged_on_its_own_weights():
    """DeepSeek-V3: the gating picks by the biased, group-limited choice and decides on the
    picked experts' sigmoid scores renormalised, the weights the block then applies (x the
    routed scaling factor, renormalised over the kept experts)."""
    m = _deepseek_like(seed=3)
    moe = m.layers[0].block_sparse_moe
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, w_full, i_full = moe.route(x, CountingTopK(4, 1))
        F, T = 1.0, 0.03
        _, w, i = moe.route(x, AdaptiveGating(4, 1, [F], budget=T))
    dec = w_full / w_full.sum(dim=-1, keepdim=True)                  # the decision weights
    drops = reference_drops(dec, lambda W: F * W * W < T)
    assert 0 < sum(drops) < 3 * 50
    for t, n in enumerate(drops):
        assert i[t].tolist() == i_full[t, :4 - n].tolist() + [-1] * n
        kept = w_full[t, :4 - n]
        torch.testing.assert_close(w[t, :4 - n], 2.5 * kept / kept.sum())


def _stepped(family: str, seed: int) -> Transformer:
    switches = {"qwen3_moe": dict(qk_norm="head"), "olmoe": dict(qk_norm="full", norm_topk_prob=False)}[family]
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=8,
                      num_experts_per_tok=4, max_position_embeddings=64, family=family, **switches)
    m = Transformer(cfg)
    m.init_weights(std=0.3, seed=seed)
    T = 0.05 if cfg.norm_topk_prob else 0.02
    m.gating = AdaptiveGating(4, 2, [1.0, 3.0], budget=T, renormalize=cfg.norm_topk_prob)
    return m.eval()


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_top_k_adaptive_decisions_through_the_decode_step_equal_the_eager_ones(family):
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(6))
    eager = Engine.from_model(_stepped(family, seed=1), decode_step="eager")
    step = Engine.from_model(_stepped(family, seed=1), decode_step="step")
    torch.testing.assert_close(step.decode_logits(ids), eager.decode_logits(ids), rtol=1e-4, atol=1e-4)
    assert step._step is not None and step._step.whole_steps == 12
    a, b = eager.stats()["gating_stats"], step.stats()["gating_stats"]
    assert 1.0 < a["experts_per_token"] < 4.0
    for key in ("decisions", "experts_per_token", "single_expert_ratio"):
        assert a[key] == pytest.approx(b[key])
    assert a["est_loss_per_token"] == pytest.approx(b["est_loss_per_token"], rel=1e-5)


def test_cost_aware_top_k_decides_from_the_steps_read(tmp_path):
    """Cost-aware at top-4 through the layered decode step: it walks each token's tail on the
    host from the step's one read per layer and writes the shortened routing back; the same
    decisions, locations and logits as the eager path."""
    from checkpoints import make_packed_store
    from expert_store.client import StoreClient

    store = make_packed_store(tmp_path, precisions=("int8",), group_size=32, hidden=64, ffn=48, layers=3,
                              experts=8, top_k=4, seed=12)
    ids = torch.randint(0, 320, (16,), generator=torch.Generator().manual_seed(7))
    runs = {}
    for mode in ("eager", "step"):
        with StoreClient.open(str(store)) as client, Engine.from_store(
                client, "tiny", precision="int8", decode_step=mode, gpu_cache_bytes=0, host_cache_bytes=1 << 20,
                cache_options={"gpu_slots": [4, 5, 4], "dense_slots": True}, gating="cost-aware", budget=0.02,
                prefetch=False, gating_options={"sensitivity": [1.0, 0.5, 2.0]}) as eng:
            eng.provider.load_cost = lambda loc: {"gpu": 0.0, "host": 1e-3, "store": 4e-3}[loc]
            logits = eng.decode_logits(ids)
            runs[mode] = (logits, eng.stats(), eng._step)
    (a, sa, _), (b, sb, st) = runs["eager"], runs["step"]
    assert st is not None and st.layered_steps == 16
    ga, gb = sa["gating_stats"], sb["gating_stats"]
    assert 1.0 < ga["experts_per_token"] < 4.0 - 3 * ga["single_expert_ratio"] - 1e-9   # partial tails too
    assert ga["expert2_location"].get("host", 0) > 0 and ga["expert2_location"].get("gpu", 0) > 0
    for key in ("decisions", "experts_per_token", "single_expert_ratio", "expert2_location", "capped_by_bound"):
        assert gb[key] == ga[key], key
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert sb["routing"] == sa["routing"]


FAMILY_SWITCHES = {
    "mixtral": dict(family="mixtral", norm_topk_prob=True),
    "qwen3_moe": dict(family="qwen3_moe", qk_norm="head", norm_topk_prob=True),
    "qwen2_moe": dict(family="qwen2_moe", qkv_bias=True, norm_topk_prob=False, shared_expert_intermediate_size=20),
    "olmoe": dict(family="olmoe", qk_norm="full", norm_topk_prob=False),
    "deepseek_v3": dict(family="deepseek_v3", router_scores="sigmoid", score_correction_bias=True, norm_topk_prob=True,
                        n_group=2, topk_group=1, routed_scaling_factor=2.5, shared_expert_intermediate_size=16,
                        shared_expert_gated=False),
    "gpt_oss": dict(family="gpt_oss", router_bias=True, expert_act="swiglu_clamped", expert_bias=True,
                    swiglu_limit=1.0, norm_topk_prob=True),
}


@pytest.mark.parametrize("family", sorted(FAMILY_SWITCHES))
def test_calibrated_adaptive_gating_for_every_family(family):
    """calibrate -> profile -> adaptive gating at the profile's 25% budget: on the calibration
    text it drops ~25% of the droppable expert uses (3 per token at top-4), partial tails
    included, and its estimated loss is F_l * W^2 of what it dropped."""
    from decoder.calibrate import build_profile, calibrate_model, validate_profile
    from decoder.gating import make_gating

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=8,
                      num_experts_per_tok=4, max_position_embeddings=64, **FAMILY_SWITCHES[family])
    m = Transformer(cfg)
    m.init_weights(std=0.3, seed=5)
    m.eval()
    windows = [torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    prof = validate_profile(build_profile("t", calibrate_model(m, windows), cfg, text_file=None, seq_len=32), 2, 8)
    assert all(f > 0 for f in prof["sensitivity"])
    g = make_gating("adaptive", config=cfg, profile=prof)
    assert g.budget == prof["budget_for_single_ratio"]["0.25"]
    m.gating = g
    with torch.no_grad():
        for w in windows:
            m(w[None, :-1])                   # the positions calibration counted (each but the last)
    s = g.stats()
    dropped = 4 - s["experts_per_token"]
    assert dropped / 3 == pytest.approx(0.25, abs=0.04)
    assert s["single_expert_ratio"] < dropped / 3          # some tokens drop 1 or 2, not 3
    assert s["est_loss_per_token"] > 0


def test_an_unrenormalised_router_is_judged_on_the_probability_that_goes():
    """Qwen2-MoE / OLMoE (norm_topk_prob off): the decision weights are the top-k's softmax
    probabilities (W = the probability mass dropped, dy = -W ybar_D) and the kept experts keep
    their probabilities, as the block weighs them; make_gating follows the config."""
    from decoder.gating import make_gating
    from decoder.routing import selected_probs

    logits = _logits(seed=13)
    p0, i0 = topk_route(logits, 4, renormalize=False)
    F, T = 2.0, 0.01
    g = AdaptiveGating(4, 1, [F], budget=T, renormalize=False)
    w, i = g.route(0, logits)
    drops = reference_drops(p0, lambda W: F * W * W < T)
    assert drops != reference_drops(p0 / p0.sum(-1, keepdim=True), lambda W: F * W * W < T)
    for t, n in enumerate(drops):
        assert i[t].tolist() == i0[t, :4 - n].tolist() + [-1] * n
    assert torch.equal(w, selected_probs(logits, i))
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=8, num_local_experts=16, num_experts_per_tok=4,
                      family="olmoe", norm_topk_prob=False)
    assert make_gating("adaptive", config=cfg, budget=T, sensitivity=[F]).renormalize is False
