"""The GPU-driven decode step: one new token for each of B sequences, static shapes throughout,
so that CUDA graphs can replay it and the host stays out of the GPU's way.

    tokens [B], positions [B] ──▶ embed ──▶ per layer: attention over the static KV cache ──▶
    router ──▶ gating (on the device) ──▶ fused MoE through the slot table ──▶ ... ──▶ logits [B, V]

Two ways to run it, chosen per step:
- whole: every expert resident in a bank slot that never changes (`provider.all_resident()`).
  The token is one graph and nothing is read on the host; routing, gating and lookup counts
  add up in device counters that `flush_counts()` folds into the usual statistics.
- layered: a cache that loads and evicts. Per layer two graphs: `pre[l]` (attention, router,
  gating, and the prefetcher's predictions for the next layers, everything the host needs
  packed into one small tensor) and `moe[l]` (the fused MoE through the layer's slot-table
  row; after the last layer also the head). Between them the host makes its ONE read of the
  layer, tells the observers (routing statistics, prefetcher), asks the provider for the
  experts (misses load; the compute stream waits on their copy events only), writes the
  layer's slot row (a pinned-memory copy in stream order) and replays `moe[l]`.

Gatings that decide on the device (topk, uniform, adaptive) run inside `pre`; cost-aware
gating decides on the host from the layer's read (where the experts are is host state) and
writes the changed routing back before `moe`, as the low-precision-on-miss hint is given from
the same read. An expert outside the slot bank (a transient buffer, the low-precision tier)
makes its layer run through the provider's weights instead of the `moe` graph.

Families: Mixtral, Qwen3-MoE (q/k head norms), OLMoE (full q/k norms, clamps, unrenormalised
router weights) and Qwen2-MoE (q/k/v biases, the gated shared expert added after the routed
ones). MLA attention, attention sinks, sigmoid routers, clamped-SwiGLU experts with biases,
dense layers and YaRN RoPE (DeepSeek-V3, GPT-OSS, Qwen's dense layers) keep the eager path.

Without CUDA (or with capture=False) the same functions run eagerly: that is how the CPU
(CI) runs and tests it. `unsupported_reason(model)` says why a model's family, gating,
observers or provider cannot run this way; the engine then keeps the eager `Transformer.forward`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from decoder.experts.prefetch import Prefetcher
from decoder.gating import TailDropGating, CountingTopK
from decoder.kernels.fused_moe import fused_moe, moe_torch, use_kernels
from decoder.kernels.counts import count_routing
from decoder.kernels.norm import rms_norm
from decoder.kernels.rope import rope_and_cache
from decoder.kernels.router import route_topk
from decoder.model.transformer import Transformer, apply_rope_signed, rope_cos_sin, sign_rotated_sin
from decoder.routing import TopKGating, overrides, selected_probs, topk_route, wants_host_routing


def unsupported_reason(model: Transformer) -> str | None:
    """Why `model` cannot decode through DecodeStep (None when it can)."""
    cfg = model.config
    family = cfg.family
    if cfg.attention != "gqa" or cfg.attention_sinks:
        return f"{family}'s attention ({'MLA' if cfg.attention != 'gqa' else 'sinks'}) decodes eagerly"
    if cfg.router_scores != "softmax" or cfg.router_bias or cfg.expert_act != "silu" or cfg.expert_bias:
        return f"{family}'s router or expert activation decodes eagerly"
    if cfg.dense_layers:
        return f"{family}'s dense layers decode eagerly"
    if cfg.rope_scaling is not None:
        return "YaRN RoPE decodes eagerly"
    if any(cfg.layer_window(l) != cfg.sliding_window for l in range(cfg.num_hidden_layers)):
        return "per-layer attention windows decode eagerly"
    g = model.gating
    if not cfg.norm_topk_prob and getattr(g, "decides_on_host", False):
        return "a gating deciding on the host over unrenormalised router weights decodes eagerly"
    if isinstance(g, TailDropGating):
        if (g.top_k >= 2 and not g.decides_on_device and not getattr(g, "decides_on_host", False)
                and not isinstance(g, CountingTopK)):
            return f"gating {g.name!r} decides neither on the device nor from host rows"
    elif not isinstance(g, TopKGating):
        return f"gating {type(g).__name__} is not known to decide on the device"
    for obs in model.observers:
        if isinstance(obs, Prefetcher) or getattr(obs, "decode_row_counts", None) is not None:
            continue
        if not wants_host_routing(obs) or overrides(obs, "on_moe_input") or overrides(obs, "on_demand_issued"):
            return f"observer {type(obs).__name__} needs the MoE block's device tensors"
    provider = model.experts
    if any(provider.expert_bank(l) is None for l in range(model.config.num_hidden_layers)):
        return f"provider {type(provider).__name__} has no expert bank for the fused MoE"
    return None


def step_gating_key(g: Any) -> tuple:
    """The gating settings a captured step bakes in."""
    return (id(g), getattr(g, "budget", None), getattr(g, "threshold", None), getattr(g, "sensitivity", None) and
            tuple(g.sensitivity))


class DecodeStep:
    """One decode step for `batch` rows over `model`'s static KV cache (setup_caches first).

    run(tokens, positions, active=None) -> float32 logits [B, V] (a static buffer: copy it to
    keep it). Rows whose `active` flag is False are computed but route to no expert and are
    left out of every count (padding of a batch bucket)."""

    def __init__(self, model: Transformer, batch: int = 1, capture: bool | None = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the decode step cannot run this model: {reason}")
        cfg = model.config
        p = model.embed_tokens.weight
        kv = model.layers[0].self_attn.kv_cache
        if kv is None:
            raise ValueError("the decode step needs the model's KV cache: call setup_caches first")
        if kv.k_cache.shape[0] < batch:
            raise ValueError(f"KV cache holds {kv.k_cache.shape[0]} rows, the step needs {batch}")
        self.model, self.config = model, cfg
        self.provider, self.gating = model.experts, model.gating
        self.device, self.dtype = p.device, p.dtype
        self.B, self.S = int(batch), int(kv.k_cache.shape[2])
        self.L, self.E, self.k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.banks = [self.provider.expert_bank(l) for l in range(self.L)]
        self.kernels = use_kernels(torch.empty(0, dtype=self.dtype, device=self.device))
        cuda = self.device.type == "cuda"
        self.capture = (cuda and self.kernels) if capture is None else bool(capture)
        if self.capture and not (cuda and self.kernels):
            raise ValueError("graph capture needs CUDA and the fused MoE kernels (Triton, bf16/fp16)")
        self._kv_ptr = kv.k_cache.data_ptr()
        # plain GQA (no q/k norms, no clamps): one q/k/v matmul, then RoPE and the cache write
        # in one kernel (decoder/kernels/rope.py)
        self.plain_attention = cfg.qk_norm is None and cfg.clip_qkv is None
        if self.plain_attention:
            model.fuse_qkv()          # the engine fused them already; a model stepped directly too
        self._observers = tuple(model.observers)
        self._gating_key = step_gating_key(model.gating)
        self.prefetcher = next((o for o in model.observers if isinstance(o, Prefetcher)), None)
        self.host_observers = [o for o in model.observers if wants_host_routing(o)]
        # observers that count per batch row on the device (the batching scheduler's): the step
        # adds [decisions, experts used, single-expert decisions] of row b to their row b
        self.row_counts = [o.decode_row_counts for o in model.observers
                           if getattr(o, "decode_row_counts", None) is not None]
        for rc in self.row_counts:
            if rc.shape[0] < batch or rc.device != self.device:
                raise ValueError("a decode_row_counts tensor has fewer rows than the step or another device")

        B, H, dev = self.B, cfg.hidden_size, self.device

        def zeros(*shape: int, dtype: torch.dtype = self.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        # inputs
        self.tokens = zeros(B, dtype=torch.long)
        self.input_pos = zeros(B, dtype=torch.long)
        self.active = torch.ones(B, dtype=torch.bool, device=dev)
        self.rows = torch.arange(B, device=dev)
        cos, sin = rope_cos_sin(torch.arange(self.S, device=dev), self.hd, cfg.rope_theta, self.dtype)
        self.cos, self.sin = cos, sign_rotated_sin(sin)                 # [S, hd]
        self.kpos = torch.arange(self.S, device=dev)
        # activations
        self.x = zeros(B, H)                    # residual stream
        self.xn = zeros(B, H)                   # input norm
        self.h = zeros(B, H)                    # after attention
        self.moe_in = zeros(B, H)               # post-attention norm
        self.q_rot = zeros(B, self.nh, self.hd)  # this token's queries after RoPE
        self.x_final = zeros(B, H)              # the final norm, before the head
        self.cos_t = zeros(B, 1, self.hd)       # RoPE of this token's positions
        self.sin_t = zeros(B, 1, self.hd)
        self.mask = torch.zeros(B, 1, 1, self.S, dtype=torch.bool, device=dev)
        self.route_w = [zeros(B, self.k, dtype=torch.float32) for _ in range(self.L)]
        self.ids_all = zeros(self.L, B, self.k, dtype=torch.long)         # every layer's routing
        self.route_ids = list(self.ids_all.unbind(0))                      # views, per layer
        self.pend_all = zeros(self.L, B, dtype=torch.float32)              # dropped weight W or -1
        self.distance = [self.prefetcher.static_distance(l) if self.prefetcher else 0 for l in range(self.L)]
        # per layer, what the host reads: ids [k], dropped weight W or -1 [1], weights [k], predictions [D * 2k]
        self.readback = [zeros(B, 2 * self.k + 1 + 2 * self.k * d, dtype=torch.float32) for d in self.distance]
        # a gating that decides from the read rows (cost-aware) writes its routing back through these
        self.host_decides = bool(getattr(self.gating, "decides_on_host", False))
        self.ids_host = torch.zeros((self.L, B, self.k), dtype=torch.long, pin_memory=cuda)
        self.w_host = torch.zeros((self.L, B, self.k), dtype=torch.float32, pin_memory=cuda)
        self.logits = zeros(B, cfg.vocab_size, dtype=torch.float32)
        # slot table rows the MoE kernels read; the host writes them through pinned memory
        self.slots = torch.full((self.L, self.E), -1, dtype=torch.int32, device=dev)
        self.slots_host = torch.full((self.L, self.E), -1, dtype=torch.int32, pin_memory=cuda)
        # device counters of whole-mode steps: per layer decisions, experts used, single-expert
        # decisions, sum of dropped W^2, unique experts looked up; per (layer, expert) loads
        self.counts = zeros(self.L, 5, dtype=torch.float64)
        self.loads = zeros(self.L, self.E, dtype=torch.long)
        self._counted = False
        self._whole_slots = False
        self._graphs: dict[str, Any] = {}
        self._pool: Any = None
        self.reads = 0                          # host reads the step made (tests, host_overhead.py)
        self.host_inputs = 0                    # layer inputs sent to the host (misses computed there)
        self.whole_steps = 0
        self.layered_steps = 0

    # --- the pieces that are captured --------------------------------------------------------
    def _embed(self) -> None:
        # gathers and the mask straight into the step's buffers: one kernel each
        torch.index_select(self.model.embed_tokens.weight, 0, self.tokens, out=self.x)
        q = self.input_pos[:, None]                                         # [B, 1]
        window = self.config.sliding_window
        if window is None:
            torch.le(self.kpos[None, :], q, out=self.mask.view(self.B, self.S))    # [B, S]
        else:
            self.mask.copy_(((self.kpos[None, :] <= q) & (q - self.kpos[None, :] < window))[:, None, None, :])
        torch.index_select(self.cos, 0, self.input_pos, out=self.cos_t.view(self.B, self.hd))
        torch.index_select(self.sin, 0, self.input_pos, out=self.sin_t.view(self.B, self.hd))

    def _attention(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H] (normed) -> [B, H]; K/V of this token go to the static cache at input_pos
        a = self.model.layers[layer].self_attn
        B, nh, nkv, hd = self.B, self.nh, self.nkv, self.hd
        kc, vc = a.kv_cache.k_cache, a.kv_cache.v_cache                    # [Bmax, nkv, S, hd]
        if self.plain_attention and a.qkv_fused():
            qkv = F.linear(x, a.wqkv, a.bqkv)                               # [B, (nh + 2 nkv) hd]
            rope_and_cache(qkv, self.cos_t, self.sin_t, self.input_pos, self.q_rot, kc, vc, nh)
            q = self.q_rot
        else:
            q, k, v = a._qkv(x.view(B, 1, -1))      # [B, nh|nkv, 1, hd]: biases, q/k norms, clamps as the family has them
            q, k = apply_rope_signed(q, self.cos_t, self.sin_t), apply_rope_signed(k, self.cos_t, self.sin_t)
            kc[self.rows, :, self.input_pos] = k[:, :, 0]
            vc[self.rows, :, self.input_pos] = v[:, :, 0]
        # one query per head: the rep heads sharing a KV head are that head's "queries"
        qg = q.reshape(B, nkv, nh // nkv, hd)
        y = F.scaled_dot_product_attention(qg, kc[:B], vc[:B], attn_mask=self.mask, scale=hd ** -0.5)
        return a.o_proj(y.reshape(B, nh * hd))

    def _route(self, layer: int, logits: torch.Tensor) -> None:
        # logits: [B, E] -> route_w[layer] [B, k] f32, route_ids[layer] [B, k] (-1 = none) and
        # the dropped weight W or -1 pend_all[layer] [B]
        g = self.gating
        renorm = g.renormalize if isinstance(g, TailDropGating) else True
        w_out, ids_out, pend_out = self.route_w[layer], self.route_ids[layer], self.pend_all[layer]
        if not (isinstance(g, TailDropGating) and g.decides_on_device and not self.host_decides and self.k >= 2):
            # top-k (the gating keeps every choice here, or decides later from the host's read)
            route_topk(logits, self.active, self.k, renorm and self.config.norm_topk_prob, w_out, ids_out, pend_out)
            return
        w, ids = topk_route(logits, self.k, renorm)                      # the gating's decision weights
        w, ids, _, pend = g.decide_on_device(layer, logits, w, ids)
        ids = torch.where(self.active[:, None], ids, -1)
        if not self.config.norm_topk_prob:      # Qwen2-MoE, OLMoE: each chosen expert's softmax probability
            w = selected_probs(logits, ids)
        w_out.copy_(w)
        ids_out.copy_(ids)
        pend_out.copy_(pend)

    def _pre(self, layer: int, whole: bool = False) -> None:
        """Attention, router and gating of `layer` (routing into route_w / route_ids, the dropped
        weight W or -1 into pend_all); with a read to follow (not `whole`) also the prefetcher's
        predictions and the packed readback."""
        if layer == 0:
            self._embed()
        blk = self.model.layers[layer]
        rms_norm(blk.input_layernorm, self.x, self.xn)
        attn = self._attention(layer, self.xn)
        rms_norm(blk.post_attention_layernorm, self.x, self.moe_in, residual=attn, h_out=self.h)   # h = x + attn
        m = self.moe_in
        self._route(layer, blk.block_sparse_moe.gate(m))
        if whole:                   # nothing is read and every expert is resident: no predictions
            return
        parts = [self.route_ids[layer].float(), self.pend_all[layer][:, None], self.route_w[layer]]
        if self.distance[layer]:
            pred = self.prefetcher.predict_device(layer, m)                  # [D, B, 2k]
            parts.append(pred.permute(1, 0, 2).reshape(self.B, -1))
        self.readback[layer].copy_(torch.cat(parts, dim=1))

    def _moe(self, layer: int, experts: list[int] | None = None) -> None:
        args = (self.moe_in, self.route_w[layer], self.route_ids[layer], self.slots[layer], self.banks[layer])
        if experts is not None and not self.kernels:
            y = moe_torch(*args, experts=experts)
            torch.add(self.h, self._with_shared(layer, y), out=self.x)
        elif self.model.layers[layer].block_sparse_moe.shared_expert is None:
            fused_moe(*args, residual=self.h, out=self.x)                  # x = h + moe, one kernel adds
        else:
            torch.add(self.h, self._with_shared(layer, fused_moe(*args)), out=self.x)
        if layer == self.L - 1:
            self._count_rows()
            self._head()

    def _with_shared(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        # the routed experts' sum y [B, H] plus the layer's shared expert, gated (Qwen2-MoE) or not
        moe = self.model.layers[layer].block_sparse_moe
        if moe.shared_expert is None:
            return y
        shared = moe.shared_expert(self.moe_in)
        if moe.shared_expert_gate is not None:
            shared = torch.sigmoid(moe.shared_expert_gate(self.moe_in)) * shared
        return y + shared

    def _head(self) -> None:
        m = self.model
        rms_norm(m.norm, self.x, self.x_final)
        self.logits.copy_(m.lm_head(self.x_final))

    def _count_rows(self) -> None:
        # per batch row [decisions, experts used, single-expert decisions] of this token's final
        # routing (after any host decision), for the batching scheduler's usage
        if not self.row_counts:
            return
        n = (self.ids_all >= 0).sum(2)                                         # [L, B]
        per_row = torch.stack([(n > 0).sum(0), n.sum(0), (n == 1).sum(0)], dim=1).long()   # padding rows: 0
        for rc in self.row_counts:
            rc[:self.B] += per_row

    def _count(self) -> None:
        # device counters of a whole-mode token, every layer at once: nothing is read
        count_routing(self.ids_all, self.pend_all, self.active, self.counts, self.loads)

    def _whole(self) -> None:
        for l in range(self.L):
            self._pre(l, whole=True)
            self._moe(l)
        self._count()

    def stale(self) -> bool:
        """True when the model changed under the step (KV cache reallocated, another gating or
        gating setting, observers added or removed): build a new one."""
        m = self.model
        kv = m.layers[0].self_attn.kv_cache
        return (kv is None or kv.k_cache.data_ptr() != self._kv_ptr or m.gating is not self.gating
                or step_gating_key(m.gating) != self._gating_key or tuple(m.observers) != self._observers
                or (self.prefetcher is not None
                    and [self.prefetcher.static_distance(l) for l in range(self.L)] != self.distance))

    # --- running -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: [B] int (one token per row at its position) -> logits [B, V]."""
        if self.model.layers[0].self_attn.kv_cache.k_cache.data_ptr() != self._kv_ptr:
            raise RuntimeError("the KV cache was reallocated: build a new DecodeStep")
        self.tokens.copy_(tokens.reshape(-1), non_blocking=True)
        self.input_pos.copy_(positions.reshape(-1), non_blocking=True)
        if active is None:
            self.active.fill_(True)
        else:
            self.active.copy_(active.reshape(-1), non_blocking=True)
        if self.provider.all_resident():
            self._run_whole()
        else:
            self._run_layered()
        return self.logits

    def _run_whole(self) -> None:
        if not self._whole_slots:
            for l in range(self.L):
                for e in range(self.E):
                    self.slots_host[l, e] = self.provider.gpu_slot(l, e)
            self.slots.copy_(self.slots_host)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)       # the loads' copies are done, once
            self._whole_slots = True
        self._counted = True
        self.whole_steps += 1
        self._replay("whole", self._whole)

    def _run_layered(self) -> None:
        self._whole_slots = False
        self.layered_steps += 1
        pf, provider, k = self.prefetcher, self.provider, self.k
        for l in range(self.L):
            self._replay(f"pre{l}", lambda l=l: self._pre(l))
            flat = self.readback[l].tolist()                                 # the layer's one read
            self.reads += 1
            # the active rows (padding rows route to no expert): expert ids and their weights
            live = [r for r in flat if any(e >= 0 for e in r[:k])]
            rows = [[int(v) for v in r[:k]] for r in live]
            wrows = [r[k + 1:2 * k + 1] for r in live]
            if pf is not None:
                D = self.distance[l]
                p0 = 2 * k + 1
                preds = [[r[p0 + 2 * k * d: p0 + 2 * k * (d + 1)] for r in live] for d in range(D)] if D else None
                pf.on_moe_input_read(l, preds)
            if self.host_decides:
                rows, wrows = self._decide_on_host(l, flat)
            else:
                self._count_host(l, rows, [r[k] for r in live])
            self._hint_low_precision(l, rows, wrows)
            for obs in self.host_observers:
                obs.on_routing_host(l, rows)
            needed = sorted({e for r in rows for e in r if e >= 0})
            provider.prepare(l, needed)
            if pf is not None:
                pf.on_demand_issued(l)
            try:
                # misses the host computes: the layer's input goes there now, their weighted sum
                # comes back after the GPU's share (before it on the last layer, whose graph ends
                # in the head)
                on_host = provider.on_host(l)
                job = self._host_job(l, flat, rows, wrows, on_host) if on_host else None
                gpu = [e for e in needed if e not in on_host]
                ready = [e for e in gpu if provider.ready(l, e)]
                weights = {e: provider.get(l, e) for e in ready + [e for e in gpu if e not in ready]}
                slots = [provider.gpu_slot(l, e) for e in gpu]
                if all(s >= 0 for s in slots):
                    row = self.slots_host[l]
                    for e, s in zip(gpu, slots):
                        row[e] = s
                    for e in on_host:
                        row[e] = -1                        # the kernels skip an expert without a slot
                    self.slots[l].copy_(row, non_blocking=True)
                    if job is not None and l == self.L - 1:
                        self.h.add_(job.result(self.device, self.dtype))
                    self._replay(f"moe{l}", lambda l=l: self._moe(l), experts=gpu)
                    if job is not None and l < self.L - 1:
                        self.x.add_(job.result(self.device, self.dtype))
                else:        # an expert outside the bank (transient buffer): this layer eagerly
                    self._moe_through_weights(l, weights, job)
            finally:
                provider.release(l, needed)

    def _moe_through_weights(self, layer: int, weights: dict[int, Any], job: Any = None) -> None:
        ids, w = self.route_ids[layer], self.route_w[layer]
        flat = ids.reshape(-1)
        out = torch.zeros(self.B, self.model.config.hidden_size, dtype=torch.float32, device=self.device)
        for e in sorted(weights):
            pos = (flat == e).nonzero().flatten()
            tok = pos // self.k
            out.index_add_(0, tok, weights[e](self.moe_in[tok]).float() * w.reshape(-1)[pos, None])
        if job is not None:                          # the host's share of the layer
            out += job.result(self.device, torch.float32)
        self.x.copy_(self.h + self._with_shared(layer, out.to(self.dtype)))
        if layer == self.L - 1:
            self._count_rows()
            self._head()

    def _host_job(self, layer: int, flat: list[list[float]], rows: list[list[int]], wrows: list[list[float]],
                  on_host: list[int]) -> Any:
        """Hand the provider the (batch row, expert, weight) choices of `layer` that the host
        computes; rows/wrows are the active rows' final routing (after any host decision)."""
        k = self.k
        live = [t for t, r in enumerate(flat) if any(e >= 0 for e in r[:k])]
        mine = set(on_host)
        items = [(live[j], e, wt) for j, (r, ws) in enumerate(zip(rows, wrows))
                 for e, wt in zip(r, ws) if e in mine]
        self.host_inputs += 1
        return self.provider.compute_on_host(layer, items, self.moe_in)

    def _decide_on_host(self, layer: int, flat: list[list[float]]) -> tuple[list[list[int]], list[list[float]]]:
        """Cost-aware gating: decide from the read rows (expert locations are the host's), count,
        and write the changed routing back to the device buffers the MoE graph reads. Returns
        the active tokens' expert ids and weights after the decision."""
        g, k = self.gating, self.k
        live = [t for t, r in enumerate(flat) if any(e >= 0 for e in r[:k])]
        drops, dropped = g.decide_rows(layer, [flat[t][:k] + flat[t][k + 1:2 * k + 1] for t in live])
        g._count(layer, drops, dropped)
        rows = [[int(e) for e in flat[t][:k]] for t in live]
        wrows = [list(flat[t][k + 1:2 * k + 1]) for t in live]
        if any(drops):
            ids_h, w_h = self.ids_host[layer], self.w_host[layer]
            for t, r in enumerate(flat):
                ids_h[t] = torch.tensor([int(e) for e in r[:k]])
                w_h[t] = torch.tensor(r[k + 1:2 * k + 1])
            for j, t in enumerate(live):
                n = drops[j]
                if not n:
                    continue
                rows[j][k - n:] = [-1] * n
                ids_h[t, k - n:] = -1
                if k == 2:       # exactly what _apply_drops gives: (1.0, 0.0)
                    w_h[t] = torch.tensor([1.0, 0.0])
                else:
                    kept = w_h[t, :k - n]
                    w_h[t, :k - n] = kept / kept.sum()
                    w_h[t, k - n:] = 0.0
                wrows[j] = w_h[t].tolist()
            self.route_ids[layer].copy_(ids_h, non_blocking=True)
            self.route_w[layer].copy_(w_h, non_blocking=True)
        return rows, wrows

    def _hint_low_precision(self, layer: int, rows: list[list[int]], wrows: list[list[float]]) -> None:
        """HOBBIT's hint as the eager gating gives it: experts whose largest weight in this step
        (after the gating's decision) is below the threshold may load at the cache's miss precision."""
        g = self.gating
        if not isinstance(g, TailDropGating) or g.miss_threshold is None or g.miss_provider is None:
            return
        best: dict[int, float] = {}
        for ids, ws in zip(rows, wrows):
            for e, w in zip(ids, ws):
                if e >= 0:
                    best[e] = max(best.get(e, 0.0), w)
        low = sorted(e for e, w in best.items() if w < g.miss_threshold)
        if low:
            g.miss_provider.allow_low_precision(layer, low)

    def _count_host(self, layer: int, rows: list[list[int]], pend: list[float]) -> None:
        """Gating counts of a layered step from its read: the active rows' expert ids and each
        row's dropped weight W (-1 when it kept every expert)."""
        g = self.gating
        if not isinstance(g, TailDropGating):
            return
        used = [sum(1 for e in r if e >= 0) for r in rows]
        g.count_step(layer, len(rows), sum(used), sum(1 for n in used if n == 1),
                     sum(p * p for p in pend if p >= 0))

    def _replay(self, name: str, fn: Any, experts: list[int] | None = None) -> None:
        if not self.capture:
            if experts is not None and name.startswith("moe"):
                self._moe(int(name[3:]), experts)
            else:
                fn()
            return
        g = self._graphs.get(name)
        if g is None:
            g = self._graphs[name] = self._capture(fn)
        g.replay()

    def _capture(self, fn: Any) -> Any:
        """Warm `fn` up on a side stream (it is idempotent: the captured pieces recompute the
        same buffers from the same inputs), then capture it into a graph sharing one pool."""
        if self._counted:
            self.flush_counts()
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # thread_local: the cache's loader and host-tier threads keep copying and pinning
        # memory on their own streams while this thread captures; "global" would fail them
        # (and so this capture) with cudaErrorStreamCaptureUnsupported.
        with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            fn()
        if self._pool is None:
            self._pool = g.pool()
        self.counts.zero_()           # the warm-up runs counted too
        self.loads.zero_()
        return g

    # --- statistics --------------------------------------------------------------------------
    @torch.inference_mode()
    def flush_counts(self, routing: Any = None) -> None:
        """Fold the device counters of whole-mode steps into the gating's counters, the
        provider's lookups and `routing` (the engine's RoutingStats, phase "decode"); one read."""
        if not self._counted:
            return
        counts = self.counts.tolist()
        loads = self.loads.tolist()
        self.counts.zero_()
        self.loads.zero_()
        self._counted = False
        lookups = 0
        for l, (dec, used, single, w2sq, uniq) in enumerate(counts):
            if isinstance(self.gating, TailDropGating):
                self.gating.count_step(l, int(dec), int(used), int(single), w2sq)
                if self.host_decides:
                    self.gating.count_resident(l, int(dec))
            if routing is not None:
                routing.add_counts(l, int(dec), int(used), int(single), loads[l])
            lookups += int(uniq)
        count_hits = getattr(self.provider, "count_hits", None)
        if count_hits is not None:
            count_hits(lookups)
