"""ModelConfig: the one config dataclass of the decoder, read from an HF config.json.

A family (`family`, an HF model_type of expert_store.families) is this config's switches: the
attention variant (GQA with q/k norm per head or over the whole projection, projection biases,
q/k/v clipping, attention sinks, sliding-window layers; or DeepSeek's multi-head latent
attention), the router variant (softmax with or without renormalised top-k, or sigmoid scores
with group-limited top-k and a routed scaling factor; router biases), the experts' activation
(SiLU-GLU or GPT-OSS's clamped SwiGLU with biases), shared experts, dense layers and the RoPE
scaling (YaRN). decoder/model/families.py reads each family's config.json keys into them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from expert_store.families import SUPPORTED_MODEL_TYPES

QK_NORMS = (None, "head", "full")
ATTENTIONS = ("gqa", "mla")
ROUTER_SCORES = ("softmax", "sigmoid")
EXPERT_ACTS = ("silu", "swiglu_clamped")


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling (arXiv 2309.00071), as transformers reads `rope_parameters` with
    rope_type "yarn": frequencies blended between interpolated (/ factor) and original across
    the correction range [beta_fast, beta_slow] rotations, cos/sin scaled by `attention_factor`
    (None: 0.1 ln(factor) + 1, or the ratio of the mscale and mscale_all_dim terms when both are
    given). DeepSeek's attention also scales its softmax by mscale(factor, mscale_all_dim)^2."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @staticmethod
    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return self.get_mscale(self.factor, self.mscale) / self.get_mscale(self.factor, self.mscale_all_dim)
        return self.get_mscale(self.factor)

    def to_hf(self, rope_theta: float) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": "yarn", "rope_theta": rope_theta, "factor": self.factor,
                               "original_max_position_embeddings": self.original_max_position_embeddings,
                               "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "truncate": self.truncate}
        for k in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # ffn width of one expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    router_aux_loss_coef: float = 0.001
    # --- the family's switches (Mixtral's values by default) ---------------------------------
    family: str = "mixtral"              # "mixtral" | "qwen3_moe" | "qwen2_moe" | "olmoe"
    norm_topk_prob: bool = True          # renormalise the top-k router weights to sum 1
    qk_norm: str | None = None           # RMSNorm of q and k: None, "head" (over hd, Qwen3) or "full" (over nh*hd / nkv*hd, OLMoE)
    qkv_bias: bool = False               # q/k/v projections have biases (Qwen2-MoE)
    o_bias: bool = False                 # o projection has a bias (attention_bias of Qwen3-MoE / OLMoE)
    clip_qkv: float | None = None        # clamp q, k, v to [-c, c] after projection (OLMoE)
    shared_expert_intermediate_size: int = 0  # one always-on SiLU expert behind a sigmoid gate (Qwen2-MoE); 0 = none
    dense_intermediate_size: int = 0     # ffn width of the dense layers' MLP
    dense_layers: tuple[int, ...] = ()   # layers with a dense MLP instead of router + experts
    shared_expert_gated: bool = True     # the shared expert sits behind a sigmoid gate (Qwen2-MoE; not DeepSeek)
    rope_scaling: YarnScaling | None = None  # YaRN (DeepSeek-V3, GPT-OSS); None = plain RoPE
    # attention variants
    attention: str = "gqa"               # "gqa" | "mla" (DeepSeek's multi-head latent attention)
    q_lora_rank: int | None = None       # MLA: rank of the low-rank q projection (None: a full q_proj)
    kv_lora_rank: int = 0                # MLA: rank of the compressed kv latent (what the KV cache holds)
    qk_nope_head_dim: int = 0            # MLA: per-head q/k dims without RoPE; head_dim is the RoPE part
    v_head_dim: int = 0                  # MLA: per-head value dim
    rope_interleave: bool = False        # MLA: RoPE dims come as interleaved pairs (DeepSeek-V3)
    attention_sinks: bool = False        # a learned per-head logit in every softmax (GPT-OSS)
    sliding_layers: tuple[int, ...] | None = None  # layers with sliding_window (None: all, when it is set)
    # router variants
    router_scores: str = "softmax"       # "softmax" | "sigmoid" (DeepSeek-V3: sigmoid, group-limited top-k)
    router_bias: bool = False            # the router has a bias (GPT-OSS)
    score_correction_bias: bool = False  # e_score_correction_bias added to the scores for choosing only (DeepSeek-V3)
    n_group: int = 1                     # sigmoid router: experts in n_group groups, ...
    topk_group: int = 1                  # ... a token chooses among its topk_group best groups
    routed_scaling_factor: float = 1.0   # routed experts' weights are multiplied by this (DeepSeek-V3)
    # expert variants
    expert_act: str = "silu"             # "silu": down(silu(gate) * up); "swiglu_clamped": GPT-OSS
    expert_bias: bool = False            # per-expert gate/up/down biases (GPT-OSS; dense tensors in the store)
    swiglu_alpha: float = 1.702          # swiglu_clamped: down((clamp(up) + 1) * g * sigmoid(alpha * g)) ...
    swiglu_limit: float = 7.0            # ... with g = min(gate, limit), up clamped to [-limit, limit]
    # Everything else from config.json, verbatim (kept so to_hf() round-trips).
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "num_local_experts", "num_experts_per_tok", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"config: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"config: rope_theta must be positive, got {self.rope_theta!r}")
        if self.family not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config: family must be one of {', '.join(SUPPORTED_MODEL_TYPES)}, got {self.family!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"config: qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if any(not 0 <= l < self.num_hidden_layers for l in self.dense_layers):
            raise ValueError(f"config: dense_layers {self.dense_layers} outside 0..{self.num_hidden_layers - 1}")
        if len(self.dense_layers) == self.num_hidden_layers:
            raise ValueError("config: every layer is dense (no MoE layer)")
        if self.dense_layers and self.dense_intermediate_size <= 0:
            raise ValueError("config: dense layers need dense_intermediate_size > 0")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError("config: shared_expert_intermediate_size must be >= 0")
        for name, allowed in (("attention", ATTENTIONS), ("router_scores", ROUTER_SCORES),
                              ("expert_act", EXPERT_ACTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                v = getattr(self, name)
                if not isinstance(v, int) or v <= 0:
                    raise ValueError(f"config: MLA attention needs a positive {name}, got {v!r}")
        if self.num_local_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"config: {self.num_local_experts} experts in n_group={self.n_group} groups, "
                             f"topk_group={self.topk_group}: groups must divide the experts, 1 <= topk_group <= n_group")
        if self.router_scores == "sigmoid" and self.n_group > 1 and (
                self.num_local_experts // self.n_group < 2
                or self.topk_group * (self.num_local_experts // self.n_group) < self.num_experts_per_tok):
            raise ValueError("config: group-limited routing needs >= 2 experts per group and "
                             "topk_group x experts per group >= num_experts_per_tok")
        if self.sliding_layers is not None and any(not 0 <= l < self.num_hidden_layers for l in self.sliding_layers):
            raise ValueError(f"config: sliding_layers {self.sliding_layers} outside 0..{self.num_hidden_layers - 1}")

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention (None: full attention)."""
        if self.sliding_window is None or (self.sliding_layers is not None and layer not in self.sliding_layers):
            return None
        return self.sliding_window

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Layers with a router and routed experts, ascending."""
        return tuple(l for l in range(self.num_hidden_layers) if l not in self.dense_layers)

    # --- derived sizes ------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (w1, w3: [ffn, hidden]; w2: [hidden, ffn])."""
        return 3 * self.hidden_size * self.intermediate_size

    # --- HF conversion ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Build from an HF config.json dict (transformers 4.x `rope_theta` or 5.x `rope_parameters`)
        of any family of expert_store.families (decoder/model/families.py reads its switches).

        Raises ValueError with a one-line reason for another model (naming the supported
        model_types) or a variant of a family the decoder does not implement.
        """
        from expert_store.families import DEFAULT_TOP_K, check_weight_format, family_of
        from decoder.model.families import read_switches, required_keys

        if not isinstance(cfg, Mapping):
            raise ValueError(f"config.json must be a JSON object, got {type(cfg).__name__}")
        family = family_of(cfg)
        check_weight_format(cfg, family)
        missing = [" / ".join(keys) for keys in required_keys(family) if all(cfg.get(k) is None for k in keys)]
        if missing:
            raise ValueError(f"{family} config is missing {', '.join(missing)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} ({family} experts use silu)")
        switches = read_switches(family, cfg)

        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")
        if rope_params is None and cfg.get("rope_scaling") is not None:
            rope_params = cfg["rope_scaling"]
        rope_scaling = None
        if isinstance(rope_params, Mapping):
            rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
            if rope_type == "yarn":
                rope_scaling = _yarn(rope_params, cfg)
            elif rope_type not in (None, "default"):
                raise ValueError(f"unsupported rope_type {rope_type!r} (the default RoPE or yarn)")
            if rope_params.get("rope_theta") is not None:
                rope_theta = rope_params["rope_theta"]
        if rope_theta is None:  # transformers' defaults per family
            rope_theta = {"mixtral": 1e6, "gpt_oss": 150000.0}.get(family, 1e4)

        n_heads = int(cfg["num_attention_heads"])
        n_kv = cfg.get("num_key_value_heads") or n_heads
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // n_heads
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        known = {f.name for f in dataclasses.fields(cls)} | {
            "rope_parameters", "rope_scaling", "eos_token_id", "num_key_value_heads", "head_dim"}
        kwargs: dict[str, Any] = dict(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(n_kv),
            head_dim=int(head_dim),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or DEFAULT_TOP_K[family]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if family in ("qwen2_moe", "qwen3_moe", "deepseek_v3")
                                       else 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096 * 32)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
            extra={k: v for k, v in cfg.items() if k not in known},
        )
        kwargs.update(switches)   # a family's own reading wins (MLA's head_dim is its RoPE part)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict that the family's transformers config class (`MixtralConfig`,
        `Qwen3MoeConfig`, ...; transformers 4.x and 5.x) loads."""
        from decoder.model.families import hf_keys

        out: dict[str, Any] = dict(self.extra)
        out.update(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters=(self.rope_scaling.to_hf(self.rope_theta) if self.rope_scaling is not None
                             else {"rope_type": "default", "rope_theta": self.rope_theta}),
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=(self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)),
            router_aux_loss_coef=self.router_aux_loss_coef,
            hidden_act="silu",
            **hf_keys(self),
        )
        out.setdefault("torch_dtype", "float32")
        return out


def _yarn(params: Mapping[str, Any], cfg: Mapping[str, Any]) -> YarnScaling:
    """YarnScaling from a rope_parameters / rope_scaling dict (transformers' defaults for
    absent keys; factor None = max_position_embeddings / original_max_position_embeddings)."""
    orig = params.get("original_max_position_embeddings") or cfg.get("max_position_embeddings")
    if not orig:
        raise ValueError("yarn rope_parameters need original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        factor = float(cfg["max_position_embeddings"]) / float(orig)
    opt = lambda k: None if params.get(k) is None else float(params[k])  # noqa: E731
    return YarnScaling(factor=float(factor), original_max_position_embeddings=int(orig),
                       beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
                       mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
                       attention_factor=opt("attention_factor"), truncate=bool(params.get("truncate", True)))
