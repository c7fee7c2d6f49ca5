"""ModelConfig: the one config dataclass of the Mixtral-layout decoder, read from an HF config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

# model_type values whose checkpoints share Mixtral's layout (attention + router + w1/w3/w2 SiLU experts).
MIXTRAL_MODEL_TYPES = ("mixtral",)
MIXTRAL_ARCHITECTURES = ("MixtralForCausalLM",)


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
        """Build from an HF config.json dict (transformers 4.x `rope_theta` or 5.x `rope_parameters`).

        Raises ValueError with a one-line reason when the checkpoint is not Mixtral-layout.
        """
        if not isinstance(cfg, Mapping):
            raise ValueError(f"config.json must be a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type not in MIXTRAL_MODEL_TYPES and not any(a in MIXTRAL_ARCHITECTURES for a in archs):
            what = model_type or (",".join(archs) if archs else "unknown")
            raise ValueError(f"not a Mixtral-layout checkpoint (model_type={what!r}); "
                             f"supported model_type: {', '.join(MIXTRAL_MODEL_TYPES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_local_experts") if cfg.get(k) is None]
        if missing:
            raise ValueError(f"Mixtral config is missing {', '.join(missing)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (Mixtral experts use silu)")

        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")
        if rope_params is None and cfg.get("rope_scaling") is not None:
            rope_params = cfg["rope_scaling"]
        if isinstance(rope_params, Mapping):
            rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
            if rope_type not in (None, "default"):
                raise ValueError(f"unsupported rope_type {rope_type!r} (only the default RoPE)")
            if rope_params.get("rope_theta") is not None:
                rope_theta = rope_params["rope_theta"]
        if rope_theta is None:
            rope_theta = 1e6  # MixtralConfig.default_theta

        n_heads = int(cfg["num_attention_heads"])
        n_kv = cfg.get("num_key_value_heads") or n_heads
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // n_heads
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        known = {f.name for f in dataclasses.fields(cls)} | {
            "rope_parameters", "rope_scaling", "eos_token_id", "num_key_value_heads", "head_dim"}
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(n_kv),
            head_dim=int(head_dim),
            num_local_experts=int(cfg["num_local_experts"]),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096 * 32)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=(int(cfg["sliding_window"]) if cfg.get("sliding_window") else None),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict that `MixtralConfig` (transformers 4.x and 5.x) loads."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            sliding_window=self.sliding_window,
            bos_token_id=self.bos_token_id,
            eos_token_id=(self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)),
            router_aux_loss_coef=self.router_aux_loss_coef,
            hidden_act="silu",
        )
        out.setdefault("torch_dtype", "float32")
        return out
