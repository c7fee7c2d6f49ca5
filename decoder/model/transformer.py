"""The decoder in plain torch (gpt-fast style): one Transformer for every family of
expert_store.families, whose switches (ModelConfig) pick the attention variant (q/k norm per
head or over the projection, biases, clipping), the router variant (renormalised top-k or
plain probabilities) and the MLP extras (a gated shared expert, dense layers).

Module names mirror HF's (`model.` prefix dropped) so a dense state dict maps 1:1:
embed_tokens, layers.{l}.input_layernorm, layers.{l}.self_attn.{q,k,v,o}_proj,
layers.{l}.self_attn.{q,k}_norm, layers.{l}.post_attention_layernorm,
layers.{l}.block_sparse_moe.gate (HF's mlp.gate too), layers.{l}.block_sparse_moe.shared_expert
and .shared_expert_gate (HF's mlp.shared_expert*), layers.{l}.mlp.{gate,up,down}_proj (dense
layers), norm, lm_head.

Experts are not parameters of the MoE block: each block asks the model's `ExpertProvider`
for (layer, expert) (see decoder/experts/provider.py). Routing goes through a `Gating` object
(default `TopKGating` = the family's router) and observers see each MoE input and routing
decision (the prefetcher and the engine's statistics plug in there).

Shapes: B batch, S new tokens, T = B*S flattened tokens, H hidden, nh/nkv heads, hd head_dim,
E experts, k experts per token, V vocab, L cached length, Fs / Fd shared-expert / dense ffn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from decoder.experts.provider import ExpertProvider, ResidentExperts
from decoder.model.config import ModelConfig
from decoder.routing import (Gating, MoEObserver, TopKGating, overrides, selected_probs, topk_route,
                             wants_host_routing)

__all__ = ["Transformer", "TransformerBlock", "MoEBlock", "Attention", "KVCache", "RMSNorm", "Positions", "DenseMLP",
           "load_balancing_loss", "rope_cos_sin", "apply_rope", "apply_rope_signed", "sign_rotated_sin",
           # routing protocols (decoder/routing.py), importable from here too
           "Gating", "TopKGating", "MoEObserver", "topk_route", "wants_host_routing"]


def load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style auxiliary loss, identical to HF Mixtral's `load_balancing_loss_func`
    (no padding mask): E * sum_e (fraction of top-k assignments to e) * (mean router prob of e)."""
    logits = torch.cat([r.float() for r in router_logits], dim=0)  # [L*T, E]
    probs = F.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)                  # [L*T, k]
    assign = F.one_hot(selected, num_experts).float().sum(dim=1)    # [L*T, E]
    tokens_per_expert = assign.mean(dim=0)                          # [E]
    prob_per_expert = probs.mean(dim=0)                             # [E]
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., H]; normalise in float32, scale in x's dtype (as HF)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: [S] or [B, S] int -> cos, sin: [S, hd] or [B, S, hd]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))          # [hd/2]
    freqs = positions[..., None].float() * inv_freq             # [..., S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                     # [..., S, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, h, S, hd]; cos/sin: [S, hd] or [B, S, hd] (HF "rotate_half" layout)
    return apply_rope_signed(x, cos, sign_rotated_sin(sin))


def sign_rotated_sin(sin: torch.Tensor) -> torch.Tensor:
    # sin: [..., hd] -> [-sin[..., :hd/2], sin[..., hd/2:]]: rotate_half's sign folded into sin
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # x: [B, h, S, hd]; cos/sin_signed: [S, hd] or [B, S, hd] -> [B, h, S, hd]
    # x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x, hd/2) * sin_signed
    # (bit-identical: (-a) * b == a * (-b)), 4 ops instead of 7
    if cos.dim() == 3:
        cos, sin_signed = cos[:, None], sin_signed[:, None]      # [B, 1, S, hd]
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class KVCache(nn.Module):
    """Static per-layer cache: k/v [B, nkv, max_seq, hd]."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: [S] (shared by all rows) or [B, S]; k, v: [B, nkv, S, hd]
        # -> k, v: [B, nkv, length, hd] (cache prefix; later slots are masked by the caller)
        B = k.shape[0]
        if input_pos.dim() == 1:
            self.k_cache[:B, :, input_pos] = k
            self.v_cache[:B, :, input_pos] = v
        else:
            rows = torch.arange(B, device=k.device)[:, None]       # [B, 1]
            self.k_cache[rows, :, input_pos] = k.transpose(1, 2)  # indexed view: [B, S, nkv, hd]
            self.v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return self.k_cache[:B, :, :length], self.v_cache[:B, :, :length]


class Attention(nn.Module):
    """GQA attention with RoPE. Family variants (ModelConfig): `qk_norm` "head" = RMSNorm of q
    and k over each head's hd (Qwen3-MoE), "full" = over the whole projection nh*hd / nkv*hd
    (OLMoE), both before RoPE; `qkv_bias` / `o_bias` = projection biases; `clip_qkv` = clamp
    q, k, v to [-c, c] after projection and norm (OLMoE)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, nh, nkv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_head, self.n_kv, self.head_dim = nh, nkv, hd
        self.q_proj = nn.Linear(H, nh * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, nkv * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, nkv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, H, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)            # over [.., hd]
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(nh * hd, config.rms_norm_eps)       # over [.., nh*hd]
            self.k_norm = RMSNorm(nkv * hd, config.rms_norm_eps)      # over [.., nkv*hd]
        self.clip_qkv = config.clip_qkv
        self.kv_cache: KVCache | None = None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [B, S, H] -> q [B, nh, S, hd], k, v [B, nkv, S, hd] (before RoPE)
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)                 # [B, S, nh*hd], [B, S, nkv*hd] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, S, self.n_head, self.head_dim)                             # [B, S, nh, hd]
        k = k.view(B, S, self.n_kv, self.head_dim)                               # [B, S, nkv, hd]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(B, S, self.n_kv, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, pos: "Positions") -> torch.Tensor:
        # x: [B, S, H]
        B, S, _ = x.shape
        q, k, v = self._qkv(x)                                                     # [B, nh|nkv, S, hd]
        q, k = apply_rope_signed(q, pos.cos, pos.sin_signed), apply_rope_signed(k, pos.cos, pos.sin_signed)

        if pos.input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but caches are not set up: call setup_caches()")
            k, v = self.kv_cache.update(pos.input_pos, k, v, pos.length)            # [B, nkv, L, hd]

        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            k = k[:, :, None].expand(B, self.n_kv, rep, *k.shape[2:]).reshape(B, self.n_head, *k.shape[2:])
            v = v[:, :, None].expand(B, self.n_kv, rep, *v.shape[2:]).reshape(B, self.n_head, *v.shape[2:])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=pos.mask, is_causal=pos.is_causal,
                                           scale=self.head_dim ** -0.5)             # [B, nh, S, hd]
        y = y.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim)
        return self.o_proj(y)                                                       # [B, S, H]


class DenseMLP(nn.Module):
    """SiLU-gated MLP with HF's names: down(silu(gate(x)) * up(x)). A dense layer's MLP and
    Qwen2-MoE's shared expert (dense tensors in the store, always resident)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)   # [F, H]
        self.up_proj = nn.Linear(hidden, ffn, bias=False)     # [F, H]
        self.down_proj = nn.Linear(ffn, hidden, bias=False)   # [H, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., H] -> [..., H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Positions:
    """Everything position-dependent of one forward, computed once and shared by all layers."""

    cos: torch.Tensor                 # [S, hd] | [B, S, hd]
    sin_signed: torch.Tensor          # sin with its first half negated (see apply_rope_signed)
    input_pos: torch.Tensor | None    # None: full sequence without cache
    length: int                       # cached length attended to (max position + 1)
    mask: torch.Tensor | None         # bool, broadcastable to [B, nh, S, L]; None with is_causal
    is_causal: bool

    @classmethod
    def build(cls, config: ModelConfig, S: int, input_pos: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype) -> "Positions":
        window = config.sliding_window
        if input_pos is None:
            qpos = torch.arange(S, device=device)
            cos, sin = rope_cos_sin(qpos, config.head_dim, config.rope_theta, dtype)
            sin = sign_rotated_sin(sin)
            mask = _attend_mask(qpos, qpos, window) if window is not None and window < S else None  # [S, S]
            return cls(cos, sin, None, S, mask, mask is None and S > 1)
        cos, sin = rope_cos_sin(input_pos, config.head_dim, config.rope_theta, dtype)
        sin = sign_rotated_sin(sin)
        length = int(input_pos.max()) + 1                                            # one host sync per forward
        if input_pos.dim() == 1 and input_pos.numel() == 1 and (window is None or length <= window):
            return cls(cos, sin, input_pos, length, None, False)                     # one token sees all L
        mask = _attend_mask(input_pos, torch.arange(length, device=device), window)  # [S, L] | [B, S, L]
        if mask.dim() == 3:
            mask = mask[:, None]                                                     # [B, 1, S, L]
        return cls(cos, sin, input_pos, length, mask, False)


def _attend_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    # qpos: [S] | [B, S]; kpos: [L] -> bool [.., S, L]: key j visible to query i iff j <= i (and i - j < window)
    q = qpos[..., :, None]
    mask = kpos <= q
    if window is not None:
        mask = mask & (q - kpos < window)
    return mask


class MoEBlock(nn.Module):
    """Router + sparse experts (+ a gated shared expert). Holds the router and the shared
    expert; routed experts come from the provider.

    Router variant: the gating picks each token's experts; with `renormalize` (norm_topk_prob)
    their weights are the gating's (sum 1), without it each selected expert's softmax
    probability (Qwen2-MoE, OLMoE by default). Shared expert (Qwen2-MoE): every token adds
    sigmoid(shared_expert_gate(x)) * shared_expert(x).
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = config.num_local_experts
        self.renormalize = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)  # router [E, H]
        self.shared_expert: DenseMLP | None = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)        # [1, H]

    def forward(self, x: torch.Tensor, experts: ExpertProvider, gating: Gating,
                observers: Sequence[MoEObserver], router_log: list | None = None) -> torch.Tensor:
        # x: [B, S, H] -> [B, S, H]
        B, S, H = x.shape
        xt = x.reshape(B * S, H)                                  # [T, H]
        for obs in observers:
            obs.on_moe_input(self.layer, xt)
        router_logits = self.gate(xt)                             # [T, E]
        if router_log is not None:
            router_log.append(router_logits)
        weights, idx = gating.route(self.layer, router_logits)   # [T, k] float32, [T, k] int64 (-1 = none)
        if not self.renormalize:
            weights = selected_probs(router_logits, idx)          # [T, k] softmax probabilities
        host_observers = []
        for obs in observers:
            if wants_host_routing(obs):
                host_observers.append(obs)
            else:
                obs.on_routing(self.layer, router_logits, weights, idx)

        # the routing decisions go to the host once per layer (the provider is driven from Python)
        rows: list[list[int]] = idx.tolist()                      # [T][k]
        for obs in host_observers:
            obs.on_routing_host(self.layer, rows)
        after_prepare = [obs for obs in observers if overrides(obs, "on_demand_issued")]
        if len(rows) == 1:
            out = self._one_token(xt, weights, rows[0], experts, after_prepare)
        else:
            out = self._tokens(xt, weights, rows, experts, after_prepare)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(xt)) * self.shared_expert(xt)  # [T, 1] * [T, H]
        return out.view(B, S, H)

    def _one_token(self, xt: torch.Tensor, weights: torch.Tensor, row: list[int],
                   experts: ExpertProvider, after_prepare: Sequence[MoEObserver] = ()) -> torch.Tensor:
        # xt: [1, H]; weights: [1, k]; row: the token's k expert ids (-1 = none) -> [1, H]
        slot_of = {e: s for s, e in enumerate(row) if e >= 0}
        needed = sorted(slot_of)
        y = self._run_experts(needed, experts, lambda e, w: w(xt) * weights[:, slot_of[e]:slot_of[e] + 1],
                              after_prepare)
        # accumulate in expert order, so the result never depends on what was cached
        out = None
        for e in needed:
            ye = y[e].to(xt.dtype)                                # [1, H]
            out = ye if out is None else out + ye
        return out if out is not None else torch.zeros_like(xt)

    def _tokens(self, xt: torch.Tensor, weights: torch.Tensor, rows: list[list[int]],
                experts: ExpertProvider, after_prepare: Sequence[MoEObserver] = ()) -> torch.Tensor:
        # xt: [T, H]; weights: [T, k]; rows: [T][k] expert ids (-1 = none) -> [T, H]
        k = weights.shape[1]
        pos_of: dict[int, list[int]] = {}                         # expert -> flat positions t*k + slot, t ascending
        for t, row in enumerate(rows):
            for s, e in enumerate(row):
                if e >= 0:
                    pos_of.setdefault(e, []).append(t * k + s)
        needed = sorted(pos_of)
        # one host->device copy of every (token, flat position) pair, grouped by expert
        flat = [p for e in needed for p in pos_of[e]]
        index = torch.tensor([p // k for p in flat] + flat, dtype=torch.int64).to(xt.device, non_blocking=True)
        tok_all, pos_all = index[:len(flat)], index[len(flat):]   # [N], [N]
        w_all = weights.reshape(-1)[pos_all, None]                # [N, 1]
        span, start = {}, 0
        for e in needed:
            span[e] = (start, start + len(pos_of[e]))
            start += len(pos_of[e])

        def compute(e: int, w: Any) -> torch.Tensor:
            a, b = span[e]
            return w(xt[tok_all[a:b]]) * w_all[a:b]               # [T_e, H] (float32 if weights are)

        y = self._run_experts(needed, experts, compute, after_prepare)
        out = torch.zeros_like(xt)                                # [T, H]
        for e in needed:                                          # expert order: cache-independent result
            a, b = span[e]
            out.index_add_(0, tok_all[a:b], y[e].to(out.dtype))
        return out

    def _run_experts(self, needed: list[int], experts: ExpertProvider, compute,
                     after_prepare: Sequence[MoEObserver] = ()) -> dict[int, torch.Tensor]:
        """compute(e, weights) for every needed expert: ready ones first (their loads are done),
        the rest as they arrive; the provider pins them from prepare to release. Observers in
        `after_prepare` hear `on_demand_issued` between prepare and the first use."""
        experts.prepare(self.layer, needed)
        for obs in after_prepare:
            obs.on_demand_issued(self.layer)
        out: dict[int, torch.Tensor] = {}
        try:
            waiting = []
            for e in needed:
                if experts.ready(self.layer, e):
                    out[e] = compute(e, experts.get(self.layer, e))
                else:
                    waiting.append(e)
            for e in waiting:
                out[e] = compute(e, experts.get(self.layer, e))
        finally:
            experts.release(self.layer, needed)
        return out


class TransformerBlock(nn.Module):
    """Pre-norm attention + MoE block (`block_sparse_moe`), or + a dense MLP (`mlp`) in the
    layers the config makes dense (Qwen's mlp_only_layers / decoder_sparse_step)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        if self.is_moe:
            self.block_sparse_moe = MoEBlock(config, layer)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.dense_intermediate_size)

    def forward(self, x: torch.Tensor, pos: Positions, experts: ExpertProvider, gating: Gating,
                observers: Sequence[MoEObserver], router_log: list | None) -> torch.Tensor:
        # x: [B, S, H]
        h = x + self.self_attn(self.input_layernorm(x), pos)
        if not self.is_moe:
            return h + self.mlp(self.post_attention_layernorm(h))
        return h + self.block_sparse_moe(self.post_attention_layernorm(h), experts, gating, observers, router_log)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """Causal MoE LM of any supported family (config.family).

    experts: the ExpertProvider (default: a fresh `ResidentExperts`, registered as the
    submodule `experts` so it trains, moves with .to() and saves with the model; a provider
    that is not an nn.Module is held as a plain attribute). gating: default `TopKGating` of the
    family's router (renormalised or not, config.norm_topk_prob).
    """

    def __init__(self, config: ModelConfig, experts: ExpertProvider | None = None,
                 gating: Gating | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, l) for l in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.experts = experts if experts is not None else ResidentExperts(config)
        self.gating: Gating = gating or TopKGating(config.num_experts_per_tok, config.norm_topk_prob)
        self.observers: list[MoEObserver] = []
        self.max_batch_size = 0
        self.max_seq_length = 0

    # --- setup ------------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random init as HF (normal(0, std) weights, unit norms, zero biases): for training from scratch."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g).to(p))

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocate static KV caches (reused when already large enough)."""
        if max_seq_length > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {max_seq_length} tokens exceeds the model's context "
                             f"({self.config.max_position_embeddings})")
        if self.max_batch_size >= max_batch_size and self.max_seq_length >= max_seq_length:
            return
        p = self.embed_tokens.weight
        for block in self.layers:
            block.self_attn.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.num_key_value_heads,
                                               self.config.head_dim, dtype=p.dtype, device=p.device)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def clear_caches(self) -> None:
        for block in self.layers:
            block.self_attn.kv_cache = None
        self.max_batch_size = self.max_seq_length = 0

    def add_observer(self, obs: MoEObserver) -> None:
        self.observers.append(obs)

    def remove_observer(self, obs: MoEObserver) -> None:
        self.observers.remove(obs)

    def router_weight(self, layer: int) -> torch.Tensor:
        """Router of `layer`: [E, H] (the prefetcher applies it to earlier layers' hidden states).
        ValueError for a dense layer (it has none)."""
        block = self.layers[layer]
        if not block.is_moe:
            raise ValueError(f"layer {layer} is a dense layer: it has no router")
        return block.block_sparse_moe.gate.weight

    # --- forward ----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                last_only: bool = False, return_router_logits: bool = False):
        """tokens: [B, S] int64.

        input_pos=None: full sequence at positions 0..S-1, no KV cache (training; differentiable).
        input_pos [S] (shared by all rows) or [B, S]: positions of these tokens; K/V go to the
        static cache (setup_caches first), attention sees cached positions <= its own.
        Returns logits [B, S, V] ([B, 1, V] with last_only), and with return_router_logits a
        tuple (logits, [router_logits [T, E] per layer]) for `load_balancing_loss`.
        """
        B, S = tokens.shape
        x = self.embed_tokens(tokens)                               # [B, S, H]
        pos = Positions.build(self.config, S, input_pos, tokens.device, x.dtype)
        router_log: list | None = [] if return_router_logits else None
        for block in self.layers:
            x = block(x, pos, self.experts, self.gating, self.observers, router_log)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))                         # [B, S, V]
        return (logits, router_log) if return_router_logits else logits

    # --- weights in HF naming -----------------------------------------------------------------
    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load dense weights (and, for ResidentExperts, the experts) from HF names of the family.

        Accepts transformers-4 (`block_sparse_moe.gate`) and -5 (`mlp.gate`) router names,
        Qwen2-MoE's `mlp.shared_expert*`, dense layers' `mlp.{gate,up,down}_proj`, and per-expert
        `w1/w3/w2` or `gate_proj/up_proj/down_proj` names; lm_head may be absent when embeddings
        are tied.
        """
        own = dict(self.named_parameters(remove_duplicate=False))
        no_shared = self.config.shared_expert_intermediate_size == 0
        loaded: set[str] = set()
        with torch.no_grad():
            for name, t in state_dict.items():
                key = _hf_to_own(name)
                if key is None:
                    continue
                if no_shared and ".shared_expert" in key:
                    continue   # a width-0 shared expert (its gate too) adds exactly zero
                if key not in own:
                    if strict:
                        raise ValueError(f"unexpected weight {name!r} for this config")
                    continue
                p = own[key]
                if tuple(p.shape) != tuple(t.shape):
                    raise ValueError(f"weight {name!r} has shape {tuple(t.shape)}, config expects {tuple(p.shape)}")
                p.copy_(t)
                loaded.add(key)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
            if "lm_head.weight" in loaded and "embed_tokens.weight" not in loaded:
                loaded.add("embed_tokens.weight")
        elif "lm_head.weight" not in loaded and "embed_tokens.weight" in loaded and strict:
            raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        if isinstance(self.experts, ResidentExperts):
            # the provider reads w1/w3/w2 names; a dense layer has no experts to check for
            self.experts.load_hf(_with_w_names(state_dict), strict=strict and not self.config.dense_layers)
        if strict:
            missing = [k for k in own if k not in loaded and not k.startswith("experts.")]
            if missing:
                first = missing[0] if missing[0] == "lm_head.weight" else "model." + missing[0]
                raise ValueError(f"checkpoint lacks {len(missing)} dense weights, e.g. {first!r}")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight under the HF names of the family's checkpoints (experts too when
        resident): save with safetensors, load with the family's transformers class."""
        mixtral = self.config.family == "mixtral"
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            if name.startswith("experts."):
                continue
            if not mixtral:
                name = name.replace(".block_sparse_moe.", ".mlp.")
            out[name if name == "lm_head.weight" else "model." + name] = p.detach().contiguous()
        if self.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        if isinstance(self.experts, ResidentExperts):
            moe = set(self.config.moe_layers)
            for name, t in self.experts.hf_state_dict().items():
                layer = int(name.split(".")[2])
                if layer not in moe:
                    continue
                if not mixtral:
                    head, w = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]  # ...experts.{e}, w1|w2|w3
                    name = f"{head.replace('.block_sparse_moe.', '.mlp.')}.{_W_TO_PROJ[w]}.weight"
                out[name] = t
        return out


_W_TO_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _with_w_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` plus `mlp.experts.{e}.w1/w3/w2.weight` aliases of per-expert
    gate_proj/up_proj/down_proj tensors (Qwen, OLMoE), the names ResidentExperts reads."""
    out = dict(state_dict)
    for name, t in state_dict.items():
        if ".mlp.experts." in name:
            for w, proj in _W_TO_PROJ.items():
                if name.endswith(f".{proj}.weight"):
                    out[name[:-len(f"{proj}.weight")] + f"{w}.weight"] = t
    return out


def _hf_to_own(name: str) -> str | None:
    """HF name -> this module's parameter name (None for expert weights, handled by the provider)."""
    if ".experts." in name:
        return None
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        return None
    name = name[len("model."):]
    for hf, own in ((".mlp.gate.", ".block_sparse_moe.gate."),
                    (".mlp.shared_expert.", ".block_sparse_moe.shared_expert."),
                    (".mlp.shared_expert_gate.", ".block_sparse_moe.shared_expert_gate.")):
        name = name.replace(hf, own)
    return name
