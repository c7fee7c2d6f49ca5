"""The prefetcher predicts each family's own top-k: router biases (GPT-OSS), sigmoid scores
chosen with correction biases in the best groups (DeepSeek-V3), unrenormalised softmax
(Qwen2-MoE); and its weight floor scales with top-k."""

from __future__ import annotations

import pytest
import torch

from decoder.experts.prefetch import Prefetcher, layer_routers, router_variant
from decoder.model.config import ModelConfig
from decoder.model.transformer import Transformer
from decoder.routing import TopKGating

torch.set_num_threads(1)

FAMILIES = {
    "gpt_oss": dict(family="gpt_oss", router_bias=True, expert_act="swiglu_clamped", expert_bias=True,
                    norm_topk_prob=True),
    "deepseek_v3": dict(family="deepseek_v3", router_scores="sigmoid", score_correction_bias=True,
                        norm_topk_prob=True, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "qwen2_moe": dict(family="qwen2_moe", norm_topk_prob=False),
}


def family_model(family: str, seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_local_experts=16,
                      num_experts_per_tok=4, **FAMILIES[family])
    m = Transformer(cfg)
    m.init_weights(std=0.3, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                           # biases large enough to change choices
        for l in range(3):
            gate = m.layers[l].block_sparse_moe.gate
            for b in (gate.bias, gate.e_score_correction_bias):
                if b is not None:
                    b.copy_(torch.randn(b.shape, generator=g))
    return m.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prediction_from_the_layers_own_input_is_its_routing(family):
    """Given layer j's own MoE input (no norm rescaling), the prediction for j is exactly the
    block's top-k, weighed as the block decides (its weights renormalised over the k)."""
    m = family_model(family, seed=3)
    routers, moe = layer_routers(m)
    pf = Prefetcher(routers, None, top_k=4, renorm=False, moe_layers=moe, router=router_variant(m))
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(4))
    for j in (1, 2):
        with torch.no_grad():
            _, w, idx = m.layers[j].block_sparse_moe.route(x, TopKGating(4))
        plain = Prefetcher(routers, None, top_k=4, renorm=False, moe_layers=moe)
        experts, scores, tok_idx = pf._predict_many(j - 1, x, 1)[0]
        assert tok_idx == idx.tolist()
        if family != "qwen2_moe":               # the routers' extra terms change the choice
            assert plain._predict_many(j - 1, x, 1)[0][2] != idx.tolist()
        for t in range(5):                      # one token at a time: the weights are its own
            e1, s1, _ = pf._predict_many(j - 1, x[t:t + 1], 1)[0]
            want = (w[t] / w[t].sum()).tolist()
            got = dict(zip(e1, s1))
            assert [got[e] for e in idx[t].tolist()] == pytest.approx(want, rel=1e-5)


def test_weight_floor_scales_with_top_k():
    routers = [torch.zeros(16, 8)] * 2
    assert Prefetcher(routers, None, top_k=2).score_floor == pytest.approx(0.3)
    assert Prefetcher(routers, None, top_k=1).score_floor == pytest.approx(0.3)
    assert Prefetcher(routers, None, top_k=4).score_floor == pytest.approx(0.15)
    assert Prefetcher(routers, None, top_k=8).score_floor == pytest.approx(0.075)
