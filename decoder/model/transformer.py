"""The decoder in plain torch (gpt-fast style): one Transformer for every family of
expert_store.families, whose switches (ModelConfig) pick the attention variant (GQA with q/k
norm per head or over the projection, biases, clipping, sinks, per-layer sliding windows; or
DeepSeek's multi-head latent attention, `MLAttention`), the RoPE (plain or YaRN), the router
variant (softmax with renormalised top-k or plain probabilities; sigmoid with group-limited
top-k), the experts' activation (SiLU-GLU or GPT-OSS's clamped SwiGLU with biases) and the MLP
extras (a gated or ungated shared expert, dense layers).

Module names mirror HF's (`model.` prefix dropped) so a dense state dict maps 1:1:
embed_tokens, layers.{l}.input_layernorm, layers.{l}.self_attn.{q,k,v,o}_proj (+ .sinks),
layers.{l}.self_attn.{q,k}_norm, MLA's layers.{l}.self_attn.{q_a_proj, q_a_layernorm, q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj}, layers.{l}.post_attention_layernorm,
layers.{l}.block_sparse_moe.gate (+ .bias, .e_score_correction_bias; HF's mlp.gate / mlp.router),
layers.{l}.block_sparse_moe.shared_expert and .shared_expert_gate (HF's mlp.shared_expert*,
DeepSeek's mlp.shared_experts), layers.{l}.block_sparse_moe.{gate_up,down}_proj_bias (GPT-OSS's
mlp.experts.*_bias), layers.{l}.mlp.{gate,up,down}_proj (dense layers), norm, lm_head.

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

import math

import torch
import torch.nn.functional as F
from torch import nn

from decoder.experts.provider import ExpertProvider, ExpertWeights, ResidentExperts
from decoder.model.config import ModelConfig, YarnScaling
from decoder.routing import (Gating, MoEObserver, TopKGating, group_limited, overrides, selected_probs,
                             topk_route, wants_host_routing)

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


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: YarnScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: [S] or [B, S] int -> cos, sin: [S, hd] or [B, S, hd] (YaRN: scaled frequencies, cos/sin x its factor)
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)      # [hd/2]
    freqs = positions[..., None].float() * inv_freq             # [..., S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                     # [..., S, hd]
    if scaling is None:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    m = scaling.cos_sin_scale
    return (emb.cos() * m).to(dtype), (emb.sin() * m).to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: YarnScaling | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies [hd/2] (float32): theta^(-2i/hd), or YaRN's blend of them with
    their interpolation (/ factor): extrapolated below the correction range of beta_fast..beta_slow
    rotations over the original context, interpolated above it, a linear ramp between."""
    base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)  # [hd/2]
    if scaling is None:
        return 1.0 / base
    def dim_of(rotations: float) -> float:   # the dim that turns `rotations` times over the original context
        return head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) \
            / (2 * math.log(theta))
    low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return (1.0 / (scaling.factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate


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
    """Static per-layer cache: k [B, nkv, max_seq, hd], v [B, nkv, max_seq, v_dim] (v_dim = hd
    unless given; MLA keeps its latent [.., kv_lora_rank] as k and its RoPE key [.., rope] as v)."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None, v_dim: int | None = None) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv, max_seq_length, head_dim)
        v_shape = shape[:3] + (head_dim if v_dim is None else v_dim,)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(v_shape, dtype=dtype, device=device), persistent=False)

    @staticmethod
    def dims(config: ModelConfig) -> tuple[int, int, int]:
        """(n_kv, k dim, v dim) of one layer's cache: MLA caches the compressed latent and the
        shared RoPE key (1 head), the others nkv heads of keys and values."""
        if config.attention == "mla":
            return 1, config.kv_lora_rank, config.head_dim
        return config.num_key_value_heads, config.head_dim, config.head_dim

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
    q, k, v to [-c, c] after projection and norm (OLMoE); `attention_sinks` = one learned logit
    per head joins every softmax and takes its share of the weight (GPT-OSS); the layer's sliding
    window (`config.layer_window`: every layer for Mixtral, sliding_attention layers for GPT-OSS)."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.window = config.layer_window(layer)
        self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads)) if config.attention_sinks else None  # [nh]
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
        self.wqkv: torch.Tensor | None = None       # fuse_qkv's [nh*hd + 2*nkv*hd, H]
        self.bqkv: torch.Tensor | None = None

    def fuse_qkv(self) -> None:
        """Put q_proj, k_proj and v_proj's weights (and biases) into one tensor whose row blocks
        they become (views), so that one matmul projects all three: `wqkv` [nh*hd + 2*nkv*hd, H].
        Moving or reloading the module unties them; `qkv_fused()` then says so."""
        if self.qkv_fused():
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        fused = torch.cat([p.weight.data for p in projs])
        bias = torch.cat([p.bias.data for p in projs]) if self.q_proj.bias is not None else None
        at = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight.data = fused[at:at + n]
            if bias is not None:
                p.bias.data = bias[at:at + n]
            at += n
        self.wqkv, self.bqkv = fused, bias

    def qkv_fused(self) -> bool:
        """Whether q/k/v's weights are still the row blocks of `wqkv`."""
        w = self.wqkv
        if w is None:
            return False
        nq, nkv = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
        row = w.stride(0) * w.element_size()
        return (self.q_proj.weight.data_ptr() == w.data_ptr()
                and self.k_proj.weight.data_ptr() == w.data_ptr() + nq * row
                and self.v_proj.weight.data_ptr() == w.data_ptr() + (nq + nkv) * row
                and (self.bqkv is None or self.q_proj.bias.data_ptr() == self.bqkv.data_ptr()))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [..., H] -> q [..., nh*hd], k, v [..., nkv*hd]: one matmul when fused
        if self.qkv_fused():
            nq, nkv = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
            return F.linear(x, self.wqkv, self.bqkv).split([nq, nkv, nkv], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [B, S, H] -> q [B, nh, S, hd], k, v [B, nkv, S, hd] (before RoPE)
        B, S, _ = x.shape
        q, k, v = self._project(x)                                               # [B, S, nh*hd], [B, S, nkv*hd] x2
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
        mask, causal = pos.attend(self.window)
        if self.sinks is not None:
            y = attention_with_sinks(q, k, v, mask, causal, self.head_dim ** -0.5, self.sinks)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               scale=self.head_dim ** -0.5)         # [B, nh, S, hd]
        y = y.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim)
        return self.o_proj(y)                                                       # [B, S, H]

    def make_cache(self, config: ModelConfig, max_batch_size: int, max_seq_length: int, dtype: torch.dtype,
                   device: torch.device | str | None) -> KVCache:
        n_kv, k_dim, v_dim = KVCache.dims(config)
        return KVCache(max_batch_size, max_seq_length, n_kv, k_dim, dtype=dtype, device=device, v_dim=v_dim)


def attention_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         is_causal: bool, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax attention where each head's sink logit joins the keys' logits (and takes its
    share of the weight, attending to nothing).
    q: [B, nh, S, d]; k: [B, nh, L, d]; v: [B, nh, L, dv]; mask: bool broadcastable to
    [B, nh, S, L] or None; sinks: [nh] -> [B, nh, S, dv]"""
    att = (q @ k.transpose(-1, -2)) * scale                                        # [B, nh, S, L]
    B, nh, S, L = att.shape
    if mask is None and is_causal:
        mask = torch.ones(S, L, dtype=torch.bool, device=att.device).tril(L - S)   # [S, L]
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    sink = sinks.to(att.dtype).view(1, nh, 1, 1).expand(B, nh, S, 1)               # [B, nh, S, 1]
    p = torch.softmax(torch.cat([att, sink], dim=-1), dim=-1)[..., :L]             # [B, nh, S, L]
    return p @ v


class MLAttention(nn.Module):
    """DeepSeek's multi-head latent attention: q from a low-rank projection (q_a -> RMSNorm ->
    q_b; or one q_proj), keys and values from one compressed latent per token (kv_a -> RMSNorm
    -> kv_b) plus a RoPE key shared by all heads (decoupled RoPE on the last head_dim dims of
    q and k; interleaved pairs with `rope_interleave`). The KV cache holds the latent and the
    RoPE key only ([B, 1, L, kv_lora_rank] and [B, 1, L, rope]): kv_b expands them every step.
    Softmax scale (nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        H, nh = config.hidden_size, config.num_attention_heads
        self.n_head, self.nope, self.rope, self.v_dim = nh, config.qk_nope_head_dim, config.head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        dq = self.nope + self.rope
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * dq, bias=False)                        # [nh*dq, H]
        else:
            self.q_a_proj = nn.Linear(H, config.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)                 # transformers' fixed eps
            self.q_b_proj = nn.Linear(config.q_lora_rank, nh * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.rank + self.rope, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, H, bias=config.o_bias)
        self.scale = dq ** -0.5
        y = config.rope_scaling
        if y is not None and y.mscale_all_dim:
            self.scale *= YarnScaling.get_mscale(y.factor, y.mscale_all_dim) ** 2
        # interleaved pairs (x0, x1), (x2, x3), ... -> halves [x0, x2, ..., x1, x3, ...]: then the usual RoPE
        self.perm = list(range(0, self.rope, 2)) + list(range(1, self.rope, 2)) if config.rope_interleave else None
        self.window = None
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos: "Positions") -> torch.Tensor:
        # x: [B, S, H]
        B, S, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.n_head, self.nope + self.rope).transpose(1, 2)      # [B, nh, S, dq]
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)  # [B, S, r], [B, S, rope]
        latent = self.kv_a_layernorm(latent)[:, None]                              # [B, 1, S, r]
        k_rot = k_rot[:, None]                                                     # [B, 1, S, rope]
        if self.perm is not None:
            q_rot, k_rot = q_rot[..., self.perm], k_rot[..., self.perm]
        q_rot = apply_rope_signed(q_rot, pos.cos, pos.sin_signed)
        k_rot = apply_rope_signed(k_rot, pos.cos, pos.sin_signed)
        if pos.input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but caches are not set up: call setup_caches()")
            latent, k_rot = self.kv_cache.update(pos.input_pos, latent, k_rot, pos.length)  # [B, 1, L, r|rope]
        L = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, L, self.n_head, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)                      # [B, nh, L, nope], [.., v]
        k = torch.cat([k_nope, k_rot.expand(B, self.n_head, L, self.rope)], dim=-1)  # [B, nh, L, dq]
        q = torch.cat([q_nope, q_rot], dim=-1)                                     # [B, nh, S, dq]
        mask, causal = pos.attend(None)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_head * self.v_dim))  # [B, S, H]

    def make_cache(self, config: ModelConfig, max_batch_size: int, max_seq_length: int, dtype: torch.dtype,
                   device: torch.device | str | None) -> KVCache:
        n_kv, k_dim, v_dim = KVCache.dims(config)
        return KVCache(max_batch_size, max_seq_length, n_kv, k_dim, dtype=dtype, device=device, v_dim=v_dim)


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
    # sliding window (None: full attention) -> (bool mask broadcastable to [B, nh, S, L], or None
    # with is_causal / when every cached key is visible; is_causal)
    views: dict[int | None, tuple[torch.Tensor | None, bool]]

    def attend(self, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for a layer with this sliding window."""
        return self.views[window]

    @classmethod
    def build(cls, config: ModelConfig, S: int, input_pos: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype) -> "Positions":
        windows = {config.layer_window(l) for l in range(config.num_hidden_layers)}
        views: dict[int | None, tuple[torch.Tensor | None, bool]] = {}
        if input_pos is None:
            qpos = torch.arange(S, device=device)
            cos, sin = rope_cos_sin(qpos, config.head_dim, config.rope_theta, dtype, config.rope_scaling)
            for window in windows:
                mask = _attend_mask(qpos, qpos, window) if window is not None and window < S else None  # [S, S]
                views[window] = (mask, mask is None and S > 1)
            return cls(cos, sign_rotated_sin(sin), None, S, views)
        cos, sin = rope_cos_sin(input_pos, config.head_dim, config.rope_theta, dtype, config.rope_scaling)
        length = int(input_pos.max()) + 1                                            # one host sync per forward
        for window in windows:
            if input_pos.dim() == 1 and input_pos.numel() == 1 and (window is None or length <= window):
                views[window] = (None, False)                                        # one token sees all L
                continue
            mask = _attend_mask(input_pos, torch.arange(length, device=device), window)  # [S, L] | [B, S, L]
            views[window] = (mask[:, None] if mask.dim() == 3 else mask, False)      # [B, 1, S, L]
        return cls(cos, sign_rotated_sin(sin), input_pos, length, views)


def _attend_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    # qpos: [S] | [B, S]; kpos: [L] -> bool [.., S, L]: key j visible to query i iff j <= i (and i - j < window)
    q = qpos[..., :, None]
    mask = kpos <= q
    if window is not None:
        mask = mask & (q - kpos < window)
    return mask


class Router(nn.Linear):
    """A MoE layer's router: logits = x W^T (+ b: GPT-OSS), W [E, H]. DeepSeek-V3's also holds
    e_score_correction_bias [E], added to its sigmoid scores to choose experts, never to weigh them;
    that router stays float32 whatever dtype the model is cast to, and computes its logits in
    float32 (as transformers keeps it): in bf16 the bias's small gaps between experts would round away."""

    def __init__(self, hidden: int, experts: int, bias: bool = False, correction_bias: bool = False) -> None:
        super().__init__(hidden, experts, bias=bias)
        self.e_score_correction_bias = (nn.Parameter(torch.zeros(experts), requires_grad=False)
                                         if correction_bias else None)
        self.fp32 = correction_bias

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.fp32:
            for p in self.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, E] (float32 for a float32 router)
        if self.fp32:
            return F.linear(x.float(), self.weight, self.bias)
        return super().forward(x)


class MoEBlock(nn.Module):
    """Router + sparse experts (+ a shared expert). Holds the router and the shared expert;
    routed experts come from the provider.

    Router variants. Softmax (Mixtral, Qwen, OLMoE, GPT-OSS): the gating picks each token's
    experts from the logits; with `renormalize` (norm_topk_prob) their weights are the gating's
    (sum 1; for GPT-OSS, whose router has a bias, this is its softmax over the top-k logits),
    without it each selected expert's softmax probability (Qwen2-MoE, OLMoE by default).
    Sigmoid (DeepSeek-V3): scores = sigmoid(logits); the gating picks from scores +
    e_score_correction_bias restricted to the token's best groups (`group_limited`); the weights
    are the picked experts' scores (divided by their sum with norm_topk_prob) x routed_scaling_factor.
    Shared expert: every token adds shared_expert(x), times sigmoid(shared_expert_gate(x)) when
    gated (Qwen2-MoE; DeepSeek's n_shared_experts are one ungated MLP of n x the expert width).
    Expert activation: SiLU-GLU, or GPT-OSS's clamped SwiGLU with per-expert biases
    (`gate_up_proj_bias` [E, 2F] with gate/up interleaved and `down_proj_bias` [E, H], as the
    checkpoint ships them, held here: they stay resident while w1/w3/w2 travel as blobs).
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = config.num_local_experts
        self.renormalize = config.norm_topk_prob
        self.scores = config.router_scores
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scaling = config.routed_scaling_factor
        self.gate = Router(config.hidden_size, config.num_local_experts, bias=config.router_bias,
                           correction_bias=config.score_correction_bias)         # [E, H]
        self.shared_expert: DenseMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size)
            if config.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)    # [1, H]
        self.clamped = config.expert_act == "swiglu_clamped"
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.gate_up_proj_bias = self.down_proj_bias = None
        if config.expert_bias:
            E, F_, H = config.num_local_experts, config.intermediate_size, config.hidden_size
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * F_))       # [E, 2F] gate/up interleaved
            self.down_proj_bias = nn.Parameter(torch.zeros(E, H))               # [E, H]

    def route(self, xt: torch.Tensor, gating: Gating) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xt: [T, H] -> (logits the gating chose from [T, E], weights [T, k] float32, idx [T, k])."""
        router_logits = self.gate(xt)                             # [T, E]
        if self.scores == "softmax":
            weights, idx = gating.route(self.layer, router_logits)   # [T, k] float32, [T, k] int64 (-1 = none)
            if not self.renormalize:
                weights = selected_probs(router_logits, idx)      # [T, k] softmax probabilities
            return router_logits, weights, idx
        scores = torch.sigmoid(router_logits.float())             # [T, E]
        choice = scores
        if self.gate.e_score_correction_bias is not None:
            choice = choice + self.gate.e_score_correction_bias.float()
        choice = group_limited(choice, self.n_group, self.topk_group)
        if getattr(gating, "takes_scores", False):              # decides on the scores it is to weigh by
            _, idx = gating.route(self.layer, choice, scores=scores)
        else:
            _, idx = gating.route(self.layer, choice)             # the gating picks, the scores weigh
        picked = scores.gather(-1, idx.clamp(min=0))
        weights = torch.where(idx >= 0, picked, torch.zeros_like(picked))   # [T, k]
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return choice, weights * self.scaling, idx

    def expert(self, e: int, w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        """Expert e with weights w on x: [T_e, H] -> [T_e, H]."""
        if self.gate_up_proj_bias is None and not self.clamped:
            return w(x)
        w1, w3, w2 = w.matrices(x.dtype)                          # [F, H], [F, H], [H, F]
        b13 = b2 = None
        if self.gate_up_proj_bias is not None:
            b13, b2 = self.gate_up_proj_bias[e].to(x.dtype), self.down_proj_bias[e].to(x.dtype)
        g = F.linear(x, w1, None if b13 is None else b13[0::2])   # [T_e, F]
        u = F.linear(x, w3, None if b13 is None else b13[1::2])
        if self.clamped:
            g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
            h = (u + 1) * (g * torch.sigmoid(g * self.alpha))
        else:
            h = F.silu(g) * u
        return F.linear(h, w2, b2)

    def forward(self, x: torch.Tensor, experts: ExpertProvider, gating: Gating,
                observers: Sequence[MoEObserver], router_log: list | None = None) -> torch.Tensor:
        # x: [B, S, H] -> [B, S, H]
        B, S, H = x.shape
        xt = x.reshape(B * S, H)                                  # [T, H]
        for obs in observers:
            obs.on_moe_input(self.layer, xt)
        router_logits, weights, idx = self.route(xt, gating)     # [T, E], [T, k] float32, [T, k] int64 (-1 = none)
        if router_log is not None:
            router_log.append(router_logits)
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
            shared = self.shared_expert(xt)                                              # [T, H]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(xt)) * shared            # [T, 1] * [T, H]
            out = out + shared
        return out.view(B, S, H)

    def _one_token(self, xt: torch.Tensor, weights: torch.Tensor, row: list[int],
                   experts: ExpertProvider, after_prepare: Sequence[MoEObserver] = ()) -> torch.Tensor:
        # xt: [1, H]; weights: [1, k]; row: the token's k expert ids (-1 = none) -> [1, H]
        slot_of = {e: s for s, e in enumerate(row) if e >= 0}
        needed = sorted(slot_of)
        y = self._run_experts(needed, experts,
                              lambda e, w: self.expert(e, w, xt) * weights[:, slot_of[e]:slot_of[e] + 1],
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
            return self.expert(e, w, xt[tok_all[a:b]]) * w_all[a:b]  # [T_e, H] (float32 if weights are)

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
        self.self_attn = MLAttention(config, layer) if config.attention == "mla" else Attention(config, layer)
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

    def fuse_qkv(self) -> None:
        """One q/k/v matmul in every GQA attention (`Attention.fuse_qkv`): what the engine runs,
        eager and captured alike, so both paths project with the same kernel."""
        for blk in self.layers:
            if isinstance(blk.self_attn, Attention):
                blk.self_attn.fuse_qkv()

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocate static KV caches (reused when already large enough)."""
        if max_seq_length > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {max_seq_length} tokens exceeds the model's context "
                             f"({self.config.max_position_embeddings})")
        if self.max_batch_size >= max_batch_size and self.max_seq_length >= max_seq_length:
            return
        p = self.embed_tokens.weight
        for block in self.layers:
            block.self_attn.kv_cache = block.self_attn.make_cache(self.config, max_batch_size, max_seq_length,
                                                                  p.dtype, p.device)
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
            self.experts.load_hf(_with_w_names(state_dict, self.config.family),
                                 strict=strict and not self.config.dense_layers)
        if strict:
            missing = [k for k in own if k not in loaded and not k.startswith("experts.")]
            if missing:
                first = missing[0] if missing[0] == "lm_head.weight" else "model." + missing[0]
                raise ValueError(f"checkpoint lacks {len(missing)} dense weights, e.g. {first!r}")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight under the HF names of the family's checkpoints (experts too when
        resident): save with safetensors, load with the family's transformers class."""
        family = self.config.family
        mixtral = family == "mixtral"
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            if name.startswith("experts."):
                continue
            out[_own_to_hf(name, family)] = p.detach().contiguous()
        if self.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        if isinstance(self.experts, ResidentExperts) and family == "gpt_oss":
            for l in self.config.moe_layers:   # fused, transposed, gate/up interleaved: [E, H, 2F], [E, F, H]
                w1, w3, w2 = self.experts.w1[l].detach(), self.experts.w3[l].detach(), self.experts.w2[l].detach()
                gate_up = torch.stack([w1, w3], dim=2).flatten(1, 2)          # [E, 2F, H]: rows g0, u0, g1, u1, ...
                out[f"model.layers.{l}.mlp.experts.gate_up_proj"] = gate_up.transpose(1, 2).contiguous()
                out[f"model.layers.{l}.mlp.experts.down_proj"] = w2.transpose(1, 2).contiguous()
        elif isinstance(self.experts, ResidentExperts):
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


def _with_w_names(state_dict: dict[str, torch.Tensor], family: str = "mixtral") -> dict[str, torch.Tensor]:
    """`state_dict` plus `mlp.experts.{e}.w1/w3/w2.weight` aliases of per-expert
    gate_proj/up_proj/down_proj tensors (Qwen, OLMoE, DeepSeek), the names ResidentExperts
    reads; GPT-OSS's fused experts (gate_up_proj [E, H, 2F] with gate/up interleaved, down_proj
    [E, F, H]) are split into them instead."""
    out = dict(state_dict)
    if family == "gpt_oss":
        for name in [n for n in state_dict if n.endswith(".mlp.experts.gate_up_proj")]:
            base = name[:-len("gate_up_proj")]
            gate_up, down = out.pop(name), out.pop(base + "down_proj")
            for e in range(gate_up.shape[0]):
                out[f"{base}{e}.w1.weight"] = gate_up[e][:, 0::2].t()
                out[f"{base}{e}.w3.weight"] = gate_up[e][:, 1::2].t()
                out[f"{base}{e}.w2.weight"] = down[e].t()
        return out
    for name, t in state_dict.items():
        if ".mlp.experts." in name:
            for w, proj in _W_TO_PROJ.items():
                if name.endswith(f".{proj}.weight"):
                    out[name[:-len(f"{proj}.weight")] + f"{w}.weight"] = t
    return out


# HF name part -> this module's: routers (GPT-OSS `router`), shared experts (DeepSeek's plural),
# GPT-OSS's per-expert biases (held by the MoE block)
_HF_TO_OWN = ((".mlp.gate.", ".block_sparse_moe.gate."),
              (".mlp.router.", ".block_sparse_moe.gate."),
              (".mlp.shared_expert.", ".block_sparse_moe.shared_expert."),
              (".mlp.shared_experts.", ".block_sparse_moe.shared_expert."),
              (".mlp.shared_expert_gate.", ".block_sparse_moe.shared_expert_gate."),
              (".mlp.experts.gate_up_proj_bias", ".block_sparse_moe.gate_up_proj_bias"),
              (".mlp.experts.down_proj_bias", ".block_sparse_moe.down_proj_bias"))


def _hf_to_own(name: str) -> str | None:
    """HF name -> this module's parameter name (None for expert weights, handled by the provider)."""
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        return None
    name = name[len("model."):]
    for hf, own in _HF_TO_OWN:
        name = name.replace(hf, own)
    return None if ".experts." in name else name


def _own_to_hf(name: str, family: str) -> str:
    """This module's parameter name -> the family's HF name (the inverse of _hf_to_own)."""
    if name == "lm_head.weight":
        return name
    if family != "mixtral":
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if family == "gpt_oss":
            name = (name.replace(".mlp.gate.", ".mlp.router.").replace(".mlp.gate_up_proj_bias", ".mlp.experts.gate_up_proj_bias")
                    .replace(".mlp.down_proj_bias", ".mlp.experts.down_proj_bias"))
        elif family == "deepseek_v3":
            name = name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
    return "model." + name
