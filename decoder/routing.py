"""Routing protocols the model and the expert machinery share: how router logits become the
experts a token uses (`Gating`, Mixtral's `TopKGating`) and the hooks every MoE block calls
(`MoEObserver`). A module of its own so that decoder/experts (the prefetcher observes) and
decoder/model (the MoE block calls) both import it and neither imports the other for it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from decoder.kernels import router as router_kernel


class Gating:
    """Turns router logits into the experts each token uses.

    route(layer, router_logits[T, E]) -> (weights[T, k] float32, idx[T, k] int64), k <= top_k.
    idx == -1 means "no expert in this slot" (its weight must be 0): that is how a gating that
    uses fewer experts for some tokens (AdapMoE) says so. Weights multiply expert outputs as is
    (renormalised to sum 1). A model whose router does not renormalise
    (ModelConfig.norm_topk_prob false: Qwen2-MoE, OLMoE) takes only idx from a gating and weighs
    each selected expert by its softmax probability (`selected_probs`), so every gating's choice
    of experts works with every family. Must be differentiable w.r.t. router_logits for training.
    A sigmoid router (DeepSeek-V3) passes its choice (scores + correction bias, group-limited)
    as router_logits and weighs by the picked scores; a gating with `takes_scores` also gets
    those scores (`route(layer, choice, scores=scores)`) to decide on the weights that apply.
    """

    name = "base"

    def route(self, layer: int, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}

    def reset_stats(self) -> None:
        pass


class TopKGating(Gating):
    """Softmax over all experts in float32, top-k; renormalise the k weights to sum 1 (Mixtral,
    and Qwen/OLMoE with norm_topk_prob) or keep them as probabilities (renormalize=False)."""

    name = "topk"

    def __init__(self, top_k: int, renormalize: bool = True) -> None:
        self.top_k = top_k
        self.renormalize = renormalize

    def route(self, layer: int, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_route(router_logits, self.top_k, self.renormalize)


def topk_route(router_logits: torch.Tensor, top_k: int,
               renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    # router_logits: [T, E] -> weights [T, k] float32 (sum 1 when renormalised), idx [T, k] int64
    # (on CUDA the routing kernel, which the decode step uses too: ties broken the same way)
    if router_logits.is_cuda and router_logits.dim() == 2 and router_kernel.available(router_logits):
        return router_kernel.topk(router_logits, top_k, renormalize)
    probs = F.softmax(router_logits.float(), dim=-1)          # [T, E]
    weights, idx = torch.topk(probs, top_k, dim=-1)            # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def selected_probs(router_logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Softmax probability of each selected expert, 0 where idx == -1: the weights of a router
    that does not renormalise, for any gating's selection.
    router_logits: [T, E]; idx: [T, k] int64 -> [T, k] float32 (bit-identical to topk_route's
    unrenormalised weights for the same idx)."""
    probs = F.softmax(router_logits.float(), dim=-1)          # [T, E]
    picked = probs.gather(-1, idx.clamp(min=0))                # [T, k]
    return torch.where(idx >= 0, picked, torch.zeros_like(picked))


def group_limited(scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3's group-limited choice: experts in n_group equal groups, a group scored by the
    sum of its two best experts; experts outside each token's topk_group best groups get -inf.
    scores: [T, E] -> [T, E]"""
    if n_group <= 1:
        return scores
    T, E = scores.shape
    grouped = scores.view(T, n_group, E // n_group)                               # [T, G, E/G]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)                     # [T, G]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1, sorted=False).indices, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)


class MoEObserver:
    """Hooks called by every MoE block (all optional). x is the MoE input (after the
    post-attention norm), flattened to [T, H]; tensors must not be modified.

    on_routing gets the routing as device tensors, before the block reads it on the host.
    An observer that overrides `on_routing_host` gets that INSTEAD: the same decision as
    Python lists `rows[t] = [expert ids]` ([T][k], -1 = no expert), read by the block's one
    device->host transfer per layer, so counting costs no extra sync or kernel.
    """

    def on_moe_input(self, layer: int, x: torch.Tensor) -> None:
        pass

    def on_routing(self, layer: int, router_logits: torch.Tensor, weights: torch.Tensor,
                   idx: torch.Tensor) -> None:
        pass

    def on_routing_host(self, layer: int, rows: list[list[int]]) -> None:
        pass

    def on_demand_issued(self, layer: int) -> None:
        """Called right after the block asked the provider for its experts (`prepare`), before
        any of them is used: a prefetcher issues its loads here, behind the layer's demand."""
        pass


def wants_host_routing(obs: MoEObserver) -> bool:
    """True when `obs` takes the routing as host lists (overrides on_routing_host)."""
    return overrides(obs, "on_routing_host")


def overrides(obs: Any, hook: str) -> bool:
    """True when `obs`'s class replaces MoEObserver's `hook`."""
    return getattr(type(obs), hook, None) not in (None, getattr(MoEObserver, hook))
