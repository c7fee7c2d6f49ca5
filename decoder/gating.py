"""Gating: which experts each token uses, selectable by name (`--gating`).

- `topk`       Mixtral's own routing (reference): softmax over all experts in float32, top-k,
               renormalise.
- `uniform`    the AdapMoE paper's naive baseline: drop expert 2 when its renormalised weight
               w2 is below one threshold, the same for every layer.
- `adaptive`   AdapMoE: use expert 1 alone when F_l * w2^2 < T, where F_l is layer l's
               sensitivity from the calibration profile (decoder/calibrate.py) and T the budget.
               Dropping expert 2 and renormalising changes the layer output by w2 * (E1 - E2),
               so the next-token loss rises by about F_l * w2^2 (second-order Taylor with the
               Fisher approximation).
- `cost-aware` ours: the budget of a decision scales with the live cost of loading expert 2
               from where it is now (the expert cache's EWMA per tier): on the GPU it is free
               (keep it), in pinned host memory it costs one H2D copy, in the store a network
               fetch plus the copy. T is the budget for an expert one H2D copy away; further away
               scales it by cost / H2D cost. The estimated loss a token accumulates over the
               layers (sum of F_l * w2^2 of its dropped experts) never exceeds `loss_bound`.

Every gating returns (weights [T, k] float32, idx [T, k] int64) with idx == -1 (weight 0) in a
slot a token does not use (see decoder.model.transformer.Gating); when every token of a call
drops expert 2 the result has k = 1. Decisions are counted per layer: experts per token,
single-expert ratio and the estimated loss of the dropped experts.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from decoder.model.transformer import Gating, topk_route

GATINGS = ("topk", "uniform", "adaptive", "cost-aware")


class CountingGating(Gating):
    """Base: top-k routing, then `_keep_second(layer, logits, weights, idx)` decides per token
    whether the second expert stays. Counts decisions."""

    name = "counting"

    # HOBBIT-style hint (optional): experts whose largest weight in a call is below this may be
    # served at the cache's lower `miss_precision` when they miss (provider.allow_low_precision).
    miss_threshold: float | None = None
    miss_provider: Any = None

    def __init__(self, top_k: int, num_layers: int, sensitivity: Sequence[float] | None = None) -> None:
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.top_k = int(top_k)
        self.num_layers = int(num_layers)
        if sensitivity is not None:
            sensitivity = [float(f) for f in sensitivity]
            if len(sensitivity) != num_layers:
                raise ValueError(f"sensitivity has {len(sensitivity)} layers, the model has {num_layers}")
            if any(not math.isfinite(f) or f < 0 for f in sensitivity):
                raise ValueError("sensitivity values must be finite and >= 0")
        self.sensitivity = sensitivity
        self.reset_stats()

    # --- counters ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        L = self.num_layers
        self._decisions = [0] * L
        self._experts = [0] * L
        self._single = [0] * L
        self._est_loss = [0.0] * L

    def stats(self) -> dict[str, Any]:
        d = sum(self._decisions)
        return {
            "gating": self.name,
            "decisions": d,
            "experts_per_token": (sum(self._experts) / d) if d else 0.0,
            "single_expert_ratio": (sum(self._single) / d) if d else 0.0,
            # estimated loss increase (nats) per token, summed over layers: sum of F_l * w2^2 dropped
            "est_loss_per_token": (sum(self._est_loss) / (d / self.num_layers)) if d else 0.0,
            "per_layer": [
                {"decisions": self._decisions[l],
                 "single_expert_ratio": (self._single[l] / self._decisions[l]) if self._decisions[l] else 0.0,
                 "est_loss": self._est_loss[l]}
                for l in range(self.num_layers)
            ],
        }

    # --- routing ----------------------------------------------------------------------------
    def set_miss_precision_hint(self, provider: Any, threshold: float | None) -> None:
        """Let `provider` load experts whose weight is below `threshold` at its miss precision."""
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError("miss precision threshold must be in [0, 1] (a routing weight)")
        self.miss_provider = provider if threshold is not None else None
        self.miss_threshold = threshold

    def route(self, layer: int, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, idx = self._route(layer, router_logits)
        if self.miss_threshold is not None and self.miss_provider is not None:
            self._hint_low_precision(layer, weights, idx)
        return weights, idx

    def _hint_low_precision(self, layer: int, weights: torch.Tensor, idx: torch.Tensor) -> None:
        # the largest weight each used expert gets in this call; low-weight experts may come at low precision
        E = int(idx.max()) + 1 if idx.numel() else 0
        if E <= 0:
            return
        best = torch.zeros(E, dtype=torch.float32, device=weights.device)
        valid = idx >= 0
        best.scatter_reduce_(0, idx[valid], weights[valid].float(), reduce="amax")
        best = best.cpu()
        used = set(int(e) for e in idx[valid].unique().tolist())
        low = [e for e in used if float(best[e]) < self.miss_threshold]
        if low:
            self.miss_provider.allow_low_precision(layer, low)

    def _route(self, layer: int, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # router_logits: [T, E] -> weights [T, k] float32, idx [T, k] int64 (-1 = unused slot)
        weights, idx = topk_route(router_logits, self.top_k)
        T = weights.shape[0]
        if self.top_k < 2 or T == 0:
            self._count(layer, [False] * T, None)
            return weights, idx
        drop, w2, drop_dev = self._decide(layer, router_logits, weights, idx)
        self._count(layer, drop, w2)
        n_drop = sum(drop)
        if n_drop == 0:
            return weights, idx
        if n_drop == T:
            w = weights[:, :-1]
            return w / w.sum(dim=-1, keepdim=True), idx[:, :-1]
        # drop the last (for k = 2: the second) expert of the flagged tokens; renormalise the rest
        if drop_dev is None:
            drop_dev = torch.tensor(drop, dtype=torch.bool).to(weights.device)
        keep = torch.ones_like(weights, dtype=torch.bool)
        keep[:, -1] = ~drop_dev
        w = torch.where(keep, weights, torch.zeros_like(weights))
        # renormalise only the rows that changed: the others stay bit-identical to top-k
        w = torch.where(drop_dev[:, None], w / w.sum(dim=-1, keepdim=True), weights)
        i = torch.where(keep, idx, torch.full_like(idx, -1))
        return w, i

    def _decide(self, layer: int, router_logits: torch.Tensor, weights: torch.Tensor,
                idx: torch.Tensor) -> tuple[list[bool], list[float] | None, torch.Tensor | None]:
        """Per token: drop expert 2? -> (drop [T] on the host, w2 [T] on the host or None,
        drop as a device bool tensor or None). Default: `_drop_second`'s device mask and w2
        read in one device->host transfer."""
        drop_dev = self._drop_second(layer, router_logits, weights, idx)       # [T] bool
        both = torch.stack((drop_dev.to(weights.dtype), weights[:, -1])).tolist()  # one sync: [2][T]
        return [d != 0 for d in both[0]], both[1], drop_dev

    def _count(self, layer: int, drop: list[bool], w2: list[float] | None) -> None:
        T = len(drop)
        n_drop = sum(drop)
        self._decisions[layer] += T
        self._experts[layer] += T * self.top_k - n_drop
        if self.top_k == 1:
            self._single[layer] += T
        elif self.top_k == 2:
            self._single[layer] += n_drop
        if n_drop and self.sensitivity is not None and w2 is not None:
            F = self.sensitivity[layer]
            self._est_loss[layer] += sum(F * w * w for w, d in zip(w2, drop) if d)

    def _drop_second(self, layer: int, router_logits: torch.Tensor, weights: torch.Tensor,
                     idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TopK(CountingGating):
    """Mixtral's routing (identical to decoder.model.transformer.TopKGating), with counters."""

    name = "topk"

    def __init__(self, top_k: int, num_layers: int) -> None:
        super().__init__(top_k, num_layers)

    def _decide(self, layer, router_logits, weights, idx):
        return [False] * weights.shape[0], None, None           # keeps every expert: nothing to read

    def _drop_second(self, layer, router_logits, weights, idx):
        return torch.zeros(weights.shape[0], dtype=torch.bool, device=weights.device)


class UniformThresholdGating(CountingGating):
    """The paper's naive baseline: drop expert 2 when its renormalised weight w2 < threshold."""

    name = "uniform"

    def __init__(self, top_k: int, num_layers: int, threshold: float,
                 sensitivity: Sequence[float] | None = None) -> None:
        super().__init__(top_k, num_layers, sensitivity)
        if not 0 <= threshold <= 1:
            raise ValueError("uniform threshold must be in [0, 1] (a renormalised weight)")
        self.threshold = float(threshold)

    def _drop_second(self, layer, router_logits, weights, idx):
        return weights[:, -1] < self.threshold


class AdaptiveGating(CountingGating):
    """AdapMoE: expert 1 alone when F_l * w2^2 < T (T = budget; T = 0 is exactly top-k)."""

    name = "adaptive"

    def __init__(self, top_k: int, num_layers: int, sensitivity: Sequence[float], budget: float) -> None:
        if sensitivity is None:
            raise ValueError("adaptive gating needs per-layer sensitivity (run `moe-decoder calibrate`)")
        super().__init__(top_k, num_layers, sensitivity)
        if not budget >= 0:
            raise ValueError("budget must be >= 0")
        self.budget = float(budget)

    def _drop_second(self, layer, router_logits, weights, idx):
        w2 = weights[:, -1].float()
        return self.sensitivity[layer] * w2 * w2 < self.budget


class CostAwareGating(CountingGating):
    """Budget scaled by the live cost of loading expert 2 from its current tier, per-token loss cap.

    provider: the expert cache; uses provider.location(layer, expert) -> "gpu"|"host"|"store"
    and provider.load_cost(location) -> seconds (live EWMA; 0 for "gpu"). Without load_cost
    (a provider that measures nothing), host = 1 and store = `store_cost_ratio` units.
    """

    name = "cost-aware"

    def __init__(self, top_k: int, num_layers: int, sensitivity: Sequence[float], budget: float,
                 provider: Any, loss_bound: float | None = None, store_cost_ratio: float = 10.0) -> None:
        if sensitivity is None:
            raise ValueError("cost-aware gating needs per-layer sensitivity (run `moe-decoder calibrate`)")
        super().__init__(top_k, num_layers, sensitivity)
        if not budget >= 0:
            raise ValueError("budget must be >= 0")
        self.budget = float(budget)
        # default bound: what adaptive gating at the same budget could spend if every layer dropped
        self.loss_bound = float(loss_bound) if loss_bound is not None else self.budget * num_layers
        if not self.loss_bound >= 0:
            raise ValueError("loss_bound must be >= 0")
        self.provider = provider
        self.store_cost_ratio = float(store_cost_ratio)
        self._acc: list[float] | None = None    # [T] estimated loss spent by each token so far
        self._last_layer = math.inf
        self._scale_sum = [0.0] * num_layers

    def reset_stats(self) -> None:
        super().reset_stats()
        self._tier_counts: dict[str, int] = {}
        self._capped = 0

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["loss_bound"] = self.loss_bound
        s["expert2_location"] = dict(self._tier_counts)
        s["capped_by_bound"] = self._capped
        return s

    def budget_scale(self, location: str) -> float:
        """Multiplier of T for an expert 2 at `location`: its load cost over one H2D copy."""
        if location == "gpu":
            return 0.0
        cost = getattr(self.provider, "load_cost", None)
        if cost is None:
            return 1.0 if location == "host" else self.store_cost_ratio
        ref = cost("host")
        c = cost(location)
        if not ref or ref <= 0:
            return 1.0 if location == "host" else self.store_cost_ratio
        return c / ref

    def _decide(self, layer, router_logits, weights, idx):
        # one transfer: each token's expert ids and w2; the decision is made on the host in
        # float64 (the same arithmetic as float64 tensors), the per-token loss spent in Python
        T, k = idx.shape
        packed = torch.cat((idx.to(torch.float64), weights[:, -1:].double()), dim=1).tolist()  # [T][k + 1]
        if layer <= self._last_layer or self._acc is None or len(self._acc) != T:
            self._acc = [0.0] * T                              # a new forward: new tokens
        self._last_layer = layer
        first = {int(e) for row in packed for e in row[:k - 1]}  # loaded anyway for some token
        scale_of: dict[int, float] = {}
        loc_of: dict[int, str] = {}
        F = self.sensitivity[layer]
        drop, w2 = [], []
        for t, row in enumerate(packed):
            e, w = int(row[k - 1]), row[k]
            if e not in scale_of:
                loc = "gpu" if e in first else self.provider.location(layer, e)
                scale_of[e], loc_of[e] = self.budget_scale(loc), loc
            self._tier_counts[loc_of[e]] = self._tier_counts.get(loc_of[e], 0) + 1
            est = F * w * w
            want = est < self.budget * scale_of[e]
            fits = self._acc[t] + est <= self.loss_bound
            self._capped += want and not fits
            d = want and fits
            if d:
                self._acc[t] = self._acc[t] + est
            drop.append(d)
            w2.append(w)
        return drop, w2, None

    def _drop_second(self, layer, router_logits, weights, idx):
        drop, _, _ = self._decide(layer, router_logits, weights, idx)
        return torch.tensor(drop, dtype=torch.bool).to(weights.device)


# --------------------------------------------------------------------------------------------
def profile_sensitivity(profile: Any, num_layers: int | None = None) -> list[float] | None:
    """Per-layer F_l from a calibration profile (dict or decoder.calibrate.Profile), or None."""
    if profile is None:
        return None
    if isinstance(profile, (str, bytes)):
        import json
        profile = json.loads(profile)
    sens = profile.get("sensitivity") if isinstance(profile, Mapping) else getattr(profile, "sensitivity", None)
    if sens is None:
        return None
    sens = [float(x) for x in sens]
    if num_layers is not None and len(sens) != num_layers:
        raise ValueError(f"profile has sensitivity for {len(sens)} layers, the model has {num_layers}")
    return sens


def make_gating(name: str, *, config: Any, provider: Any = None, budget: float | None = None,
                profile: Any = None, threshold: float | None = None, loss_bound: float | None = None,
                sensitivity: Sequence[float] | None = None, store_cost_ratio: float = 10.0,
                miss_precision_threshold: float | None = None) -> Gating:
    """Build a gating by name (see GATINGS). config: ModelConfig (top_k, layers).

    uniform: `threshold` (or `budget`) is the w2 threshold. adaptive / cost-aware: `budget` is T,
    sensitivity from `sensitivity` or the calibration `profile` (the store's profile.json).
    miss_precision_threshold: with an ExpertCache built with `miss_precision`, experts whose
    routing weight is below it are loaded at that lower precision when they miss (HOBBIT).
    """
    g = _make_gating(name, config=config, provider=provider, budget=budget, profile=profile, threshold=threshold,
                     loss_bound=loss_bound, sensitivity=sensitivity, store_cost_ratio=store_cost_ratio)
    if miss_precision_threshold is not None:
        if provider is None or not hasattr(provider, "allow_low_precision"):
            raise ValueError("--miss-precision needs the AdapMoE expert cache (give cache budgets)")
        g.set_miss_precision_hint(provider, miss_precision_threshold)
    return g


def _make_gating(name: str, *, config: Any, provider: Any, budget: float | None, profile: Any,
                 threshold: float | None, loss_bound: float | None, sensitivity: Sequence[float] | None,
                 store_cost_ratio: float) -> CountingGating:
    k = int(config.num_experts_per_tok)
    L = int(config.num_hidden_layers)
    if name == "topk":
        return TopK(k, L)
    sens = list(sensitivity) if sensitivity is not None else profile_sensitivity(profile, L)
    if name == "uniform":
        t = threshold if threshold is not None else budget
        if t is None:
            raise ValueError("uniform gating needs a threshold (--budget)")
        return UniformThresholdGating(k, L, t, sens)
    if name in ("adaptive", "cost-aware"):
        if sens is None:
            raise ValueError(f"{name} gating needs a calibration profile with per-layer sensitivity: "
                             f"run `moe-decoder calibrate` and put profile.json in the store")
        T = 0.0 if budget is None else float(budget)
        if name == "adaptive":
            return AdaptiveGating(k, L, sens, T)
        if provider is None:
            raise ValueError("cost-aware gating needs the expert provider")
        return CostAwareGating(k, L, sens, T, provider, loss_bound=loss_bound, store_cost_ratio=store_cost_ratio)
    raise ValueError(f"unknown gating {name!r} (available: {', '.join(GATINGS)})")
