"""Per-family config.json readers: a family is ModelConfig's switches set from its HF keys.

    switches = read_switches("qwen3_moe", cfg)   # kwargs of ModelConfig beyond the shared ones
    keys = hf_keys(config)                       # the family's own config.json keys (to_hf)

| family    | experts (count / ffn)                     | attention                           | router                       | MLP extras |
| --------- | ----------------------------------------- | ----------------------------------- | ---------------------------- | ---------- |
| mixtral   | num_local_experts / intermediate_size     | plain GQA, sliding_window           | renormalised top-k           | - |
| qwen3_moe | num_experts / moe_intermediate_size       | RMSNorm of q, k per head (hd)       | top-k, norm_topk_prob        | dense layers (mlp_only_layers, decoder_sparse_step) |
| qwen2_moe | num_experts / moe_intermediate_size       | q/k/v biases (qkv_bias)             | top-k, norm_topk_prob        | shared expert x sigmoid gate; dense layers |
| olmoe     | num_experts / intermediate_size           | RMSNorm of q, k over nh*hd / nkv*hd, clip_qkv | top-k, norm_topk_prob | - |
| deepseek_v3 | n_routed_experts / moe_intermediate_size | MLA: low-rank q and kv, compressed KV cache, decoupled (interleaved) RoPE, YaRN | sigmoid + e_score_correction_bias, group-limited top-k, norm_topk_prob, routed_scaling_factor | n_shared_experts ungated shared experts; first_k_dense_replace dense layers |
| gpt_oss   | num_local_experts / intermediate_size     | attention sinks, q/k/v/o biases, sliding_attention / full_attention layer_types, YaRN | router bias, softmax over the top-k logits (= renormalised top-k) | clamped SwiGLU with per-expert biases |

transformers' own defaults apply to absent keys (norm_topk_prob false, Qwen2-MoE qkv_bias true;
DeepSeek-V3's n_group 8, topk_group 4, routed_scaling_factor 2.5, one shared expert, the first 3
layers dense; GPT-OSS's sliding_window 128, attention biases, swiglu_alpha 1.702, swiglu_limit 7).
"""

from __future__ import annotations

from typing import Any, Mapping

from expert_store.families import EXPERT_FFN_KEY, EXPERTS_KEYS, moe_layers


def _first(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def required_keys(family: str) -> list[tuple[str, ...]]:
    """config.json keys (alternatives per entry) a checkpoint of `family` must have."""
    return [("vocab_size",), ("hidden_size",), ("num_hidden_layers",), ("num_attention_heads",),
            (EXPERT_FFN_KEY[family],), EXPERTS_KEYS[family]]


def read_switches(family: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig kwargs of `family` read from config.json `cfg`: expert count and width, the
    attention and router switches, shared expert and dense layers. ValueError (one line) for
    a variant the decoder does not implement."""
    out: dict[str, Any] = {
        "family": family,
        "intermediate_size": int(cfg[EXPERT_FFN_KEY[family]]),
        "num_local_experts": int(_first(cfg, EXPERTS_KEYS[family])),
    }
    if family == "mixtral":
        out["norm_topk_prob"] = True
        out["sliding_window"] = int(cfg["sliding_window"]) if cfg.get("sliding_window") else None
        return out
    if family == "deepseek_v3":
        return _deepseek_v3(cfg, out)
    if family == "gpt_oss":
        return _gpt_oss(cfg, out)
    out["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{family}: use_sliding_window is not supported (full attention only)")
    out["sliding_window"] = None
    if family in ("qwen2_moe", "qwen3_moe"):
        L = int(cfg["num_hidden_layers"])
        moe = set(moe_layers(cfg, family, L))
        out["dense_layers"] = tuple(l for l in range(L) if l not in moe)
        if out["dense_layers"]:
            out["dense_intermediate_size"] = int(cfg.get("intermediate_size") or 0)
    if family == "qwen3_moe":
        out["qk_norm"] = "head"
        out["qkv_bias"] = out["o_bias"] = bool(cfg.get("attention_bias", False))
    elif family == "qwen2_moe":
        out["qkv_bias"] = bool(cfg.get("qkv_bias", True))
        out["shared_expert_intermediate_size"] = int(cfg.get("shared_expert_intermediate_size") or 0)
    elif family == "olmoe":
        out["qk_norm"] = "full"
        out["qkv_bias"] = out["o_bias"] = bool(cfg.get("attention_bias", False))
        out["clip_qkv"] = float(cfg["clip_qkv"]) if cfg.get("clip_qkv") is not None else None
    return out


def _deepseek_v3(cfg: Mapping[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    L = int(cfg["num_hidden_layers"])
    moe = set(moe_layers(cfg, "deepseek_v3", L))
    nope, rope = int(cfg.get("qk_nope_head_dim", 128)), int(cfg.get("qk_rope_head_dim", 64))
    out.update(
        attention="mla", head_dim=rope, qk_nope_head_dim=nope, v_head_dim=int(cfg.get("v_head_dim") or 128),
        num_key_value_heads=int(cfg["num_attention_heads"]),   # MLA: keys and values per head
        kv_lora_rank=int(cfg.get("kv_lora_rank", 512)),
        q_lora_rank=None if cfg.get("q_lora_rank", 1536) is None else int(cfg.get("q_lora_rank", 1536)),
        rope_interleave=bool(cfg.get("rope_interleave", True)),
        qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)),
        router_scores="sigmoid", score_correction_bias=True, norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        n_group=int(cfg.get("n_group", 8) or 1), topk_group=int(cfg.get("topk_group", 4) or 1),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 2.5)),
        shared_expert_intermediate_size=int(cfg.get("n_shared_experts", 1) or 0) * out["intermediate_size"],
        shared_expert_gated=False, sliding_window=None,
        dense_layers=tuple(l for l in range(L) if l not in moe))
    if out["dense_layers"]:
        out["dense_intermediate_size"] = int(cfg.get("intermediate_size") or 0)
    return out


def _gpt_oss(cfg: Mapping[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    L = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types") or ["sliding_attention" if (l + 1) % 2 else "full_attention" for l in range(L)]
    if len(types) != L or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise ValueError(f"gpt_oss: layer_types must be {L} of sliding_attention / full_attention, got {types!r}")
    bias = bool(cfg.get("attention_bias", True))
    out.update(
        norm_topk_prob=True, router_bias=True, attention_sinks=True, qkv_bias=bias, o_bias=bias,
        sliding_window=int(cfg.get("sliding_window", 128) or 0) or None,
        sliding_layers=tuple(l for l, t in enumerate(types) if t == "sliding_attention"),
        expert_act="swiglu_clamped", expert_bias=True,
        swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)), swiglu_limit=float(cfg.get("swiglu_limit", 7.0)))
    return out


def hf_keys(config: Any) -> dict[str, Any]:
    """The family's own config.json keys for ModelConfig `config` (what read_switches reads)."""
    family = config.family
    arch = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}[family]
    out: dict[str, Any] = {"architectures": [arch], "model_type": family,
                           "num_experts_per_tok": config.num_experts_per_tok}
    if family == "deepseek_v3":
        moe = config.moe_layers
        out.update(n_routed_experts=config.num_local_experts, moe_intermediate_size=config.intermediate_size,
                   intermediate_size=config.dense_intermediate_size or config.intermediate_size,
                   first_k_dense_replace=moe[0], n_shared_experts=config.shared_expert_intermediate_size
                   // config.intermediate_size, kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank,
                   qk_rope_head_dim=config.head_dim, qk_nope_head_dim=config.qk_nope_head_dim,
                   v_head_dim=config.v_head_dim, rope_interleave=config.rope_interleave,
                   attention_bias=config.o_bias, norm_topk_prob=config.norm_topk_prob, n_group=config.n_group,
                   topk_group=config.topk_group, routed_scaling_factor=config.routed_scaling_factor)
        return out
    if family == "gpt_oss":
        out.update(num_local_experts=config.num_local_experts, intermediate_size=config.intermediate_size,
                   sliding_window=config.sliding_window, attention_bias=config.o_bias,
                   layer_types=["sliding_attention" if config.layer_window(l) is not None else "full_attention"
                                for l in range(config.num_hidden_layers)],
                   swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit)
        return out
    if family == "mixtral":
        out.update(intermediate_size=config.intermediate_size, num_local_experts=config.num_local_experts,
                   sliding_window=config.sliding_window)
        return out
    out.update(num_experts=config.num_local_experts, norm_topk_prob=config.norm_topk_prob, use_sliding_window=False)
    if family == "olmoe":
        out.update(intermediate_size=config.intermediate_size, attention_bias=config.o_bias,
                   clip_qkv=config.clip_qkv)
        return out
    out.update(moe_intermediate_size=config.intermediate_size, decoder_sparse_step=1,
               mlp_only_layers=list(config.dense_layers),
               intermediate_size=config.dense_intermediate_size or config.intermediate_size)
    if family == "qwen3_moe":
        out["attention_bias"] = config.o_bias
    else:
        out.update(qkv_bias=config.qkv_bias, shared_expert_intermediate_size=config.shared_expert_intermediate_size)
    return out
