"""Model code against transformers' MixtralForCausalLM, in memory (no store): config parsing,
full-sequence and KV-cache forward, batching, gating hooks, training and HF round trip."""

from __future__ import annotations

import json

import pytest
import torch

import transformers
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from decoder.experts.provider import ExpertWeights, ResidentExperts  # noqa: E402
from decoder.model.config import ModelConfig  # noqa: E402
from decoder.model.transformer import (  # noqa: E402
    Gating, MoEObserver, TopKGating, Transformer, load_balancing_loss, topk_route)

torch.set_num_threads(1)


def hf_model(seed: int = 0, std: float = 0.2, **kw) -> MixtralForCausalLM:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                initializer_range=std, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    torch.manual_seed(seed)
    # the eager experts loop is the reference (grouped_mm needs 16-byte strides: no odd sizes)
    m = MixtralForCausalLM(MixtralConfig(**base, experts_implementation="eager")).eval()
    with torch.no_grad():  # non-trivial norms so every weight matters
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def ours_from(hf: MixtralForCausalLM, **kw) -> Transformer:
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    m = Transformer(cfg, **kw).eval()
    m.load_hf_state_dict(hf.state_dict())
    return m


CONFIGS = {
    "gqa2-e4-top2": {},
    "mha-e3-top1": dict(num_key_value_heads=4, num_local_experts=3, num_experts_per_tok=1),
    "mqa-e8-top2-odd": dict(hidden_size=36, intermediate_size=19, num_attention_heads=6, num_key_value_heads=1,
                            num_local_experts=8, vocab_size=53, num_hidden_layers=3),
    "headdim-tied": dict(head_dim=12, tie_word_embeddings=True),
    "window": dict(sliding_window=5),
}


# --- config -------------------------------------------------------------------------------------
def test_config_rope_styles_and_defaults():
    old = {"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 4,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_local_experts": 2, "rope_theta": 500.0}
    c = ModelConfig.from_hf(old)
    assert c.rope_theta == 500.0 and c.head_dim == 4 and c.num_key_value_heads == 2 and c.num_experts_per_tok == 2
    new = dict(old, rope_parameters={"rope_type": "default", "rope_theta": 123.0}, head_dim=16,
               tie_word_embeddings=True, eos_token_id=[2, 7])
    new.pop("rope_theta")
    c = ModelConfig.from_hf(new)
    assert (c.rope_theta, c.head_dim, c.tie_word_embeddings, c.eos_token_ids) == (123.0, 16, True, (2, 7))
    # to_hf round trip, and transformers accepts it
    again = ModelConfig.from_hf(json.loads(json.dumps(c.to_hf())))
    assert again == c
    MixtralConfig(**{k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type")})


@pytest.mark.parametrize("cfg,needle", [
    ({"model_type": "llama", "vocab_size": 10}, "not a Mixtral-layout checkpoint"),
    ({"architectures": ["GPT2LMHeadModel"]}, "not a Mixtral-layout checkpoint"),
    ({"model_type": "mixtral", "vocab_size": 10}, "missing"),
    ({"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1,
      "num_attention_heads": 3, "num_key_value_heads": 2, "num_local_experts": 2}, "multiple"),
    ({"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1,
      "num_attention_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 3}, "exceeds"),
    ({"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1,
      "num_attention_heads": 2, "num_local_experts": 2, "rope_parameters": {"rope_type": "longrope"}}, "rope_type"),
    ([1, 2], "JSON object"),
])
def test_config_rejects(cfg, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf(cfg)


# --- forward against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_hf(name):
    hf = hf_model(**CONFIGS[name])
    ours = ours_from(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["gqa2-e4-top2", "window"])
def test_kv_cache_steps_match_full_forward(name):
    hf = hf_model(**CONFIGS[name])
    ours = ours_from(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        ours.setup_caches(1, 16)
        chunks = [ours(ids[:, :7], torch.arange(7))]
        for p in range(7, 12):
            chunks.append(ours(ids[:, p:p + 1], torch.tensor([p])))
        got = torch.cat(chunks, dim=1)
    assert (got - ref).abs().max().item() < 1e-5


def test_batched_cache_with_per_row_positions():
    """Rows at different lengths in one batch ([B, S] input_pos) give each row's own logits."""
    hf = hf_model()
    ours = ours_from(hf)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 61, (1, 9), generator=g)
    b = torch.randint(0, 61, (1, 5), generator=g)
    with torch.no_grad():
        ref_a, ref_b = hf(a).logits, hf(b).logits
        ours.setup_caches(2, 16)
        # prefill both rows with their first 4 tokens, then row a catches up alone in row-major padding
        ours(torch.cat([a[:, :4], b[:, :4]]), torch.arange(4))
        # one step with different positions per row: row a at 4..5, row b at 4 then a pad write at 5
        step = ours(torch.cat([a[:, 4:6], torch.cat([b[:, 4:5], b[:, 4:5]], 1)]),
                    torch.tensor([[4, 5], [4, 4]]))
        assert (step[0] - ref_a[0, 4:6]).abs().max() < 1e-5
        assert (step[1, 0] - ref_b[0, 4]).abs().max() < 1e-5
        # continue row a only, at position 6.. while row b idles on its last position
        out = ours(torch.cat([a[:, 6:7], b[:, 4:5]]), torch.tensor([[6], [4]]))
        assert (out[0, 0] - ref_a[0, 6]).abs().max() < 1e-5
        assert (out[1, 0] - ref_b[0, 4]).abs().max() < 1e-5


def test_bfloat16_matches_hf_bfloat16():
    hf = hf_model()
    ours = ours_from(hf).to(torch.bfloat16)
    hf = hf.to(torch.bfloat16)
    ids = torch.randint(0, 61, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        out = ours(ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()


# --- gating and hooks ------------------------------------------------------------------------------
class FirstOnly(Gating):
    """Top-1 of the Mixtral router expressed as k=2 with an empty (-1) second slot."""
    name = "first-only"

    def route(self, layer, router_logits):
        w, idx = topk_route(router_logits, 2)
        w = torch.stack([torch.ones_like(w[:, 0]), torch.zeros_like(w[:, 1])], -1)
        idx = torch.stack([idx[:, 0], torch.full_like(idx[:, 1], -1)], -1)
        return w, idx


def test_gating_with_empty_slots_equals_top1_reference():
    hf1 = hf_model(num_experts_per_tok=1)
    ours = ours_from(hf1, gating=FirstOnly())
    ids = torch.randint(0, 61, (1, 11))
    with torch.no_grad():
        assert (ours(ids) - hf1(ids).logits).abs().max() < 1e-5


class Recorder(MoEObserver):
    def __init__(self):
        self.inputs, self.routes = [], []

    def on_moe_input(self, layer, x):
        self.inputs.append((layer, tuple(x.shape)))

    def on_routing(self, layer, router_logits, weights, idx):
        self.routes.append((layer, tuple(router_logits.shape), tuple(idx.shape)))


def test_observers_and_router_weight():
    hf = hf_model(num_hidden_layers=3)
    ours = ours_from(hf)
    rec = Recorder()
    ours.add_observer(rec)
    with torch.no_grad():
        ours(torch.randint(0, 61, (2, 5)))
    assert rec.inputs == [(l, (10, 32)) for l in range(3)]
    assert rec.routes == [(l, (10, 4), (10, 2)) for l in range(3)]
    assert torch.equal(ours.router_weight(2), hf.model.layers[2].mlp.gate.weight)
    ours.remove_observer(rec)


def test_expert_weights_matches_hf_expert():
    hf = hf_model()
    ours = ours_from(hf)
    x = torch.randn(7, 32)
    w = ours.experts.get(1, 3)
    assert isinstance(w, ExpertWeights)
    ex = hf.model.layers[1].mlp.experts
    gate, up = torch.nn.functional.linear(x, ex.gate_up_proj[3]).chunk(2, dim=-1)
    ref = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, ex.down_proj[3])
    with torch.no_grad():
        assert (w(x) - ref).abs().max() < 1e-6
        # bf16 weights are cast to the input dtype
        wb = ExpertWeights(w.w1.to(torch.bfloat16), w.w3.to(torch.bfloat16), w.w2.to(torch.bfloat16))
        assert wb(x).dtype == torch.float32


# --- training --------------------------------------------------------------------------------------
def test_training_forward_backward_and_aux_loss():
    hf = hf_model(router_aux_loss_coef=0.02)
    ours = ours_from(hf).train()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    logits, router_logits = ours(ids, return_router_logits=True)
    aux = load_balancing_loss(router_logits, 4, 2)
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
    assert abs(aux.item() - ref.aux_loss.item()) < 1e-5
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1)) + 0.02 * aux
    loss.backward()
    assert ours.experts.w1[0].grad is not None and ours.experts.w1[0].grad.abs().sum() > 0
    assert ours.experts.w2[1].grad.abs().sum() > 0
    assert ours.layers[0].block_sparse_moe.gate.weight.grad.abs().sum() > 0
    assert ours.embed_tokens.weight.grad.abs().sum() > 0
    # one optimizer step changes the loss
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    opt.step()
    with torch.no_grad():
        after = ours(ids)
    assert not torch.allclose(after, logits.detach())


def test_init_and_hf_roundtrip(tmp_path):
    """A model trained here saves as an HF checkpoint that MixtralForCausalLM loads identically."""
    from safetensors.torch import save_file

    cfg = ModelConfig.from_hf(hf_model(tie_word_embeddings=True).config.to_dict())
    ours = Transformer(cfg)
    ours.init_weights(std=0.1, seed=7)
    assert isinstance(ours.experts, ResidentExperts)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    save_file(ours.hf_state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf = MixtralForCausalLM.from_pretrained(str(tmp_path), experts_implementation="eager").eval()
    ids = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        assert (hf(ids).logits - ours.eval()(ids)).abs().max() < 1e-5


def test_topk_gating_default_and_missing_cache_error():
    hf = hf_model()
    ours = ours_from(hf)
    assert isinstance(ours.gating, TopKGating) and ours.gating.top_k == 2
    with pytest.raises(RuntimeError, match="setup_caches"):
        ours(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="context"):
        ours.setup_caches(1, 65)
