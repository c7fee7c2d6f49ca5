"""Tiny random checkpoints of the non-Mixtral MoE families, written by transformers itself.

    from family_checkpoints import make_family_checkpoint
    ckpt = make_family_checkpoint(tmp_path / "q3", "qwen3_moe", hidden=64, experts=8, top_k=4)

builds the family's transformers model (`Qwen3MoeForCausalLM`, `Qwen2MoeForCausalLM`,
`OlmoeForCausalLM`, `DeepseekV3ForCausalLM`, `GptOssForCausalLM`) from a tiny config, re-draws every weight from a seeded generator with a
spread large enough that routing, q/k norms and biases matter (HF's init, std 0.02, leaves
routers near uniform), casts it to `dtype` (bfloat16 by default: a bf16 store blob then holds
exactly the checkpoint's expert weights, and a float32 reference computes on the same numbers
as the decoder) and saves it with `save_pretrained` (sharded when `shards > 1`), plus a
byte-level BPE `tokenizer.json`. transformers writes the experts as the families' hub
checkpoints ship them: per expert (`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`), or
for GPT-OSS fused (`mlp.experts.gate_up_proj [E, H, 2F]` with gate/up interleaved,
`down_proj [E, F, H]`, and their `_bias` tensors). DeepSeek-V3's e_score_correction_bias
(a buffer) and GPT-OSS's attention sinks are drawn too, large enough to change choices.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from checkpoints import make_tokenizer_json

FAMILY_CLASSES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
}


def make_family_checkpoint(out_dir: str | Path, family: str, *, hidden: int = 64, layers: int = 2,
                           experts: int = 8, top_k: int = 4, ffn: int = 48, heads: int = 4, kv_heads: int = 2,
                           head_dim: int | None = None, vocab: int = 300, seed: int = 0, shards: int = 1,
                           dtype: torch.dtype = torch.bfloat16, std: float = 0.08,
                           max_position_embeddings: int = 512, rope_theta: float = 10000.0,
                           **family_kw: Any) -> Path:
    """Write a random checkpoint of `family` to `out_dir` and return it. `ffn` is one routed
    expert's width; `family_kw` go to the family's config class verbatim (norm_topk_prob,
    shared_expert_intermediate_size, mlp_only_layers, intermediate_size of dense layers,
    attention_bias, qkv_bias, clip_qkv, ...)."""
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    kw: dict[str, Any] = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts=experts,
                              num_experts_per_tok=top_k, max_position_embeddings=max_position_embeddings,
                              rope_parameters=family_kw.pop("rope_parameters", None)
                              or {"rope_type": "default", "rope_theta": rope_theta},
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "deepseek_v3":   # MLA: every head has its own k/v (num_key_value_heads = heads)
        kw.update(n_routed_experts=kw.pop("num_experts"), moe_intermediate_size=ffn, num_key_value_heads=heads)
        kw.setdefault("intermediate_size", 2 * ffn)
    elif family == "gpt_oss":   # GptOssConfig's head_dim defaults to 64 whatever the hidden size
        kw.update(num_local_experts=kw.pop("num_experts"), intermediate_size=ffn, head_dim=hidden // heads)
    elif family == "olmoe":
        kw["intermediate_size"] = ffn
    else:
        kw["moe_intermediate_size"] = ffn
        kw.setdefault("intermediate_size", 2 * ffn)
        if family == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = family_kw.pop("shared_expert_intermediate_size", 0)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    kw.update(family_kw)
    config = cfg_cls(**kw)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted([*model.named_parameters(), *model.named_buffers()]):
            if not p.is_floating_point() or "rotary_emb" in name:
                continue
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") or name.endswith("_bias") or name.endswith(".sinks"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g) * (5 if name.endswith(".sinks") else 1))
            elif name.endswith(".gate.weight") or name.endswith(".router.weight"):
                p.copy_(1.0 * torch.randn(p.shape, generator=g) / math.sqrt(hidden))  # a decided router
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    model = model.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_kw: dict[str, Any] = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        save_kw["max_shard_size"] = max(1, math.ceil(total / shards))
    model.save_pretrained(out, safe_serialization=True, **save_kw)
    (out / "tokenizer.json").write_text(make_tokenizer_json(vocab))
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert (len(files) > 1) == (shards > 1), f"expected {'several' if shards > 1 else 'one'} shard(s), got {files}"
    return out


def load_reference(ckpt: str | Path):
    """The checkpoint loaded back by transformers' AutoModelForCausalLM in float32 (eval), set
    to generate exactly max_new_tokens (no EOS stop)."""
    from transformers import AutoModelForCausalLM

    # the eager expert loop: the grouped-GEMM kernel needs 16-byte aligned strides (odd sizes fail)
    m = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, experts_implementation="eager").eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m
