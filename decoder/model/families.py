"""Per-family config.json readers: a family is ModelConfig's switches set from its HF keys.

    switches = read_switches("qwen3_moe", cfg)   # kwargs of ModelConfig beyond the shared ones
    keys = hf_keys(config)                       # the family's own config.json keys (to_hf)

| family    | experts (count / ffn)                     | attention                           | router                       | MLP extras |
| --------- | ----------------------------------------- | ----------------------------------- | ---------------------------- | ---------- |
| mixtral   | num_local_experts / intermediate_size     | plain GQA, sliding_window           | renormalised top-k           | - |
| qwen3_moe | num_experts / moe_intermediate_size       | RMSNorm of q, k per head (hd)       | top-k, norm_topk_prob        | dense layers (mlp_only_layers, decoder_sparse_step) |
| qwen2_moe | num_experts / moe_intermediate_size       | q/k/v biases (qkv_bias)             | top-k, norm_topk_prob        | shared expert x sigmoid gate; dense layers |
| olmoe     | num_experts / intermediate_size           | RMSNorm of q, k over nh*hd / nkv*hd, clip_qkv | top-k, norm_topk_prob | - |

transformers' own defaults apply to absent keys (norm_topk_prob false, Qwen2-MoE qkv_bias true).
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


def hf_keys(config: Any) -> dict[str, Any]:
    """The family's own config.json keys for ModelConfig `config` (what read_switches reads)."""
    family = config.family
    arch = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}[family]
    out: dict[str, Any] = {"architectures": [arch], "model_type": family,
                           "num_experts_per_tok": config.num_experts_per_tok}
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
