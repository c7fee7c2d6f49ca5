"""The MoE checkpoint families the store imports and the decoder runs, and the layout facts
both sides read from an HF ``config.json``: which layers hold routed experts, how many
experts a layer has, how wide one expert is and how many a token uses.

A family is named by its HF ``model_type``. The store needs only these facts to split a
checkpoint into expert blobs and a dense part; the decoder's ``ModelConfig`` reads the rest
(attention and router variants). Plain dicts in, no torch: the store's serving path imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# model_type -> architecture class names that identify the family when model_type is absent
FAMILIES: dict[str, tuple[str, ...]] = {
    "mixtral": ("MixtralForCausalLM",),
    "qwen2_moe": ("Qwen2MoeForCausalLM",),
    "qwen3_moe": ("Qwen3MoeForCausalLM",),
    "olmoe": ("OlmoeForCausalLM",),
    "deepseek_v3": ("DeepseekV3ForCausalLM",),
    "gpt_oss": ("GptOssForCausalLM",),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)
# other model_types that ship a family's architecture unchanged (Kimi-K2 is DeepSeek-V3's)
ALIASES: dict[str, str] = {"kimi_k2": "deepseek_v3"}


class UnsupportedFamilyError(ValueError):
    """config.json names a model that is not one of FAMILIES."""


def supported_list() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def family_of(config: Mapping[str, Any]) -> str:
    """The family (an HF model_type of FAMILIES) of a config.json dict; UnsupportedFamilyError
    (one line, naming the supported model_types) for anything else."""
    model_type = config.get("model_type")
    archs = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    if model_type in FAMILIES:
        return model_type
    if model_type in ALIASES and any(a in FAMILIES[ALIASES[model_type]] for a in archs):
        return ALIASES[model_type]
    if model_type is None:
        for family, names in FAMILIES.items():
            if any(a in names or (family == "mixtral" and a.startswith("Mixtral")) for a in archs):
                return family
    what = model_type if model_type is not None else (",".join(archs) if archs else "unknown")
    raise UnsupportedFamilyError(
        f"not a Mixtral-layout checkpoint or another supported MoE family (model_type={what!r}, "
        f"architectures={archs!r}); supported model_type: {supported_list()}")


@dataclass(frozen=True)
class ExpertLayout:
    """Where the routed experts of a checkpoint are, from its config alone."""

    family: str
    num_layers: int
    num_experts: int            # routed experts per MoE layer
    expert_ffn: int             # intermediate width of one routed expert
    top_k: int
    moe_layers: tuple[int, ...]  # layers with a router and routed experts; the others are dense MLPs


# config.json keys of the routed-expert count (first present wins) and of one expert's ffn width
EXPERTS_KEYS: dict[str, tuple[str, ...]] = {
    "mixtral": ("num_local_experts",),
    "qwen2_moe": ("num_experts", "num_local_experts"),
    "qwen3_moe": ("num_experts", "num_local_experts"),
    "olmoe": ("num_experts", "num_local_experts"),
    "deepseek_v3": ("n_routed_experts", "num_local_experts"),
    "gpt_oss": ("num_local_experts",),
}
# num_experts_per_tok when config.json has none: transformers' default of the family's config class
DEFAULT_TOP_K: dict[str, int] = {"mixtral": 2, "qwen2_moe": 4, "qwen3_moe": 8, "olmoe": 8, "deepseek_v3": 8, "gpt_oss": 4}
EXPERT_FFN_KEY: dict[str, str] = {
    "mixtral": "intermediate_size",
    "qwen2_moe": "moe_intermediate_size",
    "qwen3_moe": "moe_intermediate_size",
    "olmoe": "intermediate_size",
    "deepseek_v3": "moe_intermediate_size",
    "gpt_oss": "intermediate_size",
}


def moe_layers(config: Mapping[str, Any], family: str, num_layers: int) -> tuple[int, ...]:
    """Layers with routed experts. Qwen2/3-MoE: layer l unless it is in ``mlp_only_layers`` or
    (l + 1) % ``decoder_sparse_step`` != 0 (those are dense MLPs); DeepSeek-V3: l >=
    ``first_k_dense_replace`` (transformers' default 3); the others: every layer."""
    if family == "deepseek_v3":
        first = _int(config, "first_k_dense_replace")
        return tuple(range(3 if first is None else first, num_layers))
    if family not in ("qwen2_moe", "qwen3_moe"):
        return tuple(range(num_layers))
    step = _int(config, "decoder_sparse_step") or 1
    dense_only = set(config.get("mlp_only_layers") or [])
    return tuple(l for l in range(num_layers) if l not in dense_only and (l + 1) % step == 0)


def _int(config: Mapping[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = config.get(k)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"config.json: {k} must be an integer, got {v!r}")
            return v
    return None


def _need(config: Mapping[str, Any], family: str, *keys: str) -> int:
    v = _int(config, *keys)
    if v is None or v <= 0:
        raise ValueError(f"{family} config.json has no positive int {' / '.join(keys)} (got {v!r})")
    return v


def check_weight_format(config: Mapping[str, Any], family: str) -> None:
    """ValueError (one line) for a checkpoint whose weights ship quantized in a format the
    store does not import. Imported (pack dequantizes them into bf16): GPT-OSS's MXFP4 experts
    and DeepSeek-V3's block-scaled fp8 weights, the formats those models are released in."""
    quant = config.get("quantization_config")
    if not quant:
        return
    method = quant.get("quant_method", "?") if isinstance(quant, Mapping) else "?"
    if (family, method) in (("gpt_oss", "mxfp4"), ("deepseek_v3", "fp8")):
        return
    raise ValueError(f"{family} checkpoint ships {method}-quantized weights (quantization_config); "
                     f"only bf16/fp16/fp32 checkpoints are imported: dequantize it first")


def expert_layout(config: Mapping[str, Any]) -> ExpertLayout:
    """The routed-expert layout of a config.json dict (UnsupportedFamilyError / ValueError).

    mixtral: every layer is MoE, ``num_local_experts`` of ``intermediate_size``.
    qwen2_moe / qwen3_moe: ``num_experts`` (transformers 5 also writes ``num_local_experts``) of
    ``moe_intermediate_size``; layer l is MoE unless it is in ``mlp_only_layers`` or
    (l + 1) % ``decoder_sparse_step`` != 0 (those are dense MLPs of ``intermediate_size``).
    olmoe: every layer is MoE, ``num_experts`` of ``intermediate_size``.
    deepseek_v3: ``n_routed_experts`` of ``moe_intermediate_size`` from layer
    ``first_k_dense_replace`` on (the first layers are dense MLPs of ``intermediate_size``).
    gpt_oss: every layer is MoE, ``num_local_experts`` of ``intermediate_size``.
    """
    family = family_of(config)
    check_weight_format(config, family)
    layers = _need(config, family, "num_hidden_layers")
    experts = _need(config, family, *EXPERTS_KEYS[family])
    ffn = _need(config, family, EXPERT_FFN_KEY[family])
    moe = moe_layers(config, family, layers)
    top_k = _int(config, "num_experts_per_tok")
    if top_k is None:
        top_k = DEFAULT_TOP_K[family]
    if not 0 < top_k <= experts:
        raise ValueError(f"config.json: num_experts_per_tok must be in 1..{experts}, got {top_k}")
    if not moe:
        raise ValueError(f"{family} config.json has no MoE layer (mlp_only_layers / decoder_sparse_step)")
    return ExpertLayout(family, layers, experts, ffn, top_k, moe)
