"""Gating: which experts each token uses, selectable by name (`--gating`).

- `topk`       the family's own routing (reference): softmax over all experts in float32, top-k,
               renormalise.
- `uniform`    the AdapMoE paper's naive baseline: drop the tail of a token's top-k (lowest weights
               first) while the dropped weights' sum W is below one threshold, the same for every
               layer (top-2: drop expert 2 when its renormalised weight w2 is below it).
- `adaptive`   AdapMoE: drop the tail while F_l * W^2 < T, where F_l is layer l's sensitivity from
               the calibration profile (decoder/calibrate.py) and T the budget; at least one expert
               stays. Derivation below; for top-2, expert 1 alone when F_l * w2^2 < T.
- `cost-aware` ours: adaptive's rule with T scaled per decision by the live cost of loading
               the tail expert from where it is now (the expert cache's EWMA per tier) over the
               running mean of that cost across recent decisions (GPU ones count 0): an expert on
               the GPU is never dropped, and the budget adaptive would spread over every decision
               goes to the misses, more to the costlier ones (the threshold averaged over decisions
               stays ~T). The estimated loss a token accumulates over the layers (sum of F_l * W^2
               of its dropped experts) never exceeds `loss_bound`.

The estimated loss of dropping a tail. A token's top-k decision weights w_1 >= ... >= w_k split
into the kept K and the dropped D, W = sum_D w_i. A renormalising family (Mixtral, Qwen3-MoE,
GPT-OSS, DeepSeek-V3 with norm_topk_prob) weighs by the top-k's shares (w sums to 1) and
outputs sum_K w_i E_i / (1 - W) instead of sum_i w_i E_i, a change of

    dy = W * (ybar_K - ybar_D),   ybar_S = sum_S w_i E_i / sum_S w_i  (weighted mean over S);

one that weighs by unrenormalised router weights (Qwen2-MoE, OLMoE: softmax probabilities;
DeepSeek-V3 without norm_topk_prob: sigmoid scores, x the routed scaling factor) keeps them for
the kept experts, and w is those weights (`renormalize=False`): dy = -W * ybar_D, W the router
probability mass that goes (a token whose top-k holds little of it loses little). Either way
dy = W * v, and with the Fisher approximation of the Hessian the next-token loss rises by about
0.5 (g . dy)^2 = W^2 * 0.5 (g . v)^2, g the loss gradient at the layer's output; calibration
measures F_l = mean 0.5 (g . v)^2 over tokens and tail sizes, so the estimate is F_l * W^2.
For top-2 (D = {2}): dy = w2 * (E1 - E2), the estimate F_l * w2^2. F_l * W^2 grows with the
tail, so "drop while under T" drops the longest tail whose estimate is under T.

Every gating returns (weights [T, k] float32, idx [T, k] int64) with idx == -1 (weight 0) in a
slot a token does not use (see decoder.routing.Gating). Decisions are counted per layer: experts
per token, single-expert ratio and the estimated loss of the dropped experts. A gating built for
a router whose weights are not softmax(logits) (DeepSeek-V3's sigmoid scores) gets them as
`scores` and decides on the picked experts' scores (renormalised when the family renormalises;
`takes_scores`).
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping, Sequence

import torch

from decoder.model.config import ModelConfig
from decoder.routing import Gating, topk_route

GATINGS = ("topk", "uniform", "adaptive", "cost-aware")


class TailDropGating(Gating):
    """Base of every gating here: top-k routing, then `_tail_drops(layer, logits, weights, idx)`
    (or `_decide`) says per token how many of its lowest-weight experts go (0..k-1; always 0 for
    `CountingTopK`). Counts decisions.

    A gating whose decision is a pure function of the router output (`decides_on_device`:
    uniform, adaptive) makes it on the device and returns without reading anything: its
    decisions (and the dropped weight, for the estimated loss) are counted later, from one
    batched read every `read_every` calls or at `stats()`. On a GPU a read is a synchronisation
    that stops the host from running ahead, and the MoE block already makes one per layer (its
    routing)."""

    name = "counting"
    decides_on_device = False
    takes_scores = True     # route(..., scores=) decides on a sigmoid router's scores (DeepSeek-V3)
    read_every = 256
    _drop_consts: tuple | None = None     # (device, dtype), (1.0, 0.0) weights, (False, True) "last slot"

    # HOBBIT-style hint (optional): experts whose largest weight in a call is below this may be
    # served at the cache's lower `miss_precision` when they miss (provider.allow_low_precision).
    miss_threshold: float | None = None
    miss_provider: Any = None

    def __init__(self, top_k: int, num_layers: int, sensitivity: Sequence[float] | None = None, *,
                 renormalize: bool = True) -> None:
        """renormalize: the family renormalises its top-k weights (ModelConfig.norm_topk_prob):
        decide on the shares; otherwise on the router weights as they apply (module docstring)."""
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.top_k = int(top_k)
        self.renormalize = bool(renormalize)
        self.num_layers = int(num_layers)
        if sensitivity is not None:
            sensitivity = [float(f) for f in sensitivity]
            if len(sensitivity) != num_layers:
                raise ValueError(f"sensitivity has {len(sensitivity)} layers, the model has {num_layers}")
            if any(not math.isfinite(f) or f < 0 for f in sensitivity):
                raise ValueError("sensitivity values must be finite and >= 0")
        self.sensitivity = sensitivity
        self._unread_lock = threading.Lock()
        self.reset_stats()

    # --- counters ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        L = self.num_layers
        self._decisions = [0] * L
        self._experts = [0] * L
        self._single = [0] * L
        self._est_loss = [0.0] * L
        self._unread: list[tuple[int, torch.Tensor]] = []   # (layer, [2, T] drops, dropped W or -1) on the device

    def stats(self) -> dict[str, Any]:
        self._read_decisions()
        d = sum(self._decisions)
        return {
            "gating": self.name,
            "decisions": d,
            "experts_per_token": (sum(self._experts) / d) if d else 0.0,
            "single_expert_ratio": (sum(self._single) / d) if d else 0.0,
            # estimated loss increase (nats) per token, summed over layers: sum of F_l * W^2 dropped
            "est_loss_per_token": (sum(self._est_loss) / (d / self.num_layers)) if d else 0.0,
            "per_layer": [
                {"decisions": self._decisions[l],
                 "single_expert_ratio": (self._single[l] / self._decisions[l]) if self._decisions[l] else 0.0,
                 "experts_per_token": (self._experts[l] / self._decisions[l]) if self._decisions[l] else 0.0,
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

    def route(self, layer: int, router_logits: torch.Tensor,
              scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits [T, E] pick the top-k; scores [T, E] (optional), the router's expert
        weights when they are not softmax(router_logits), are what the decision weighs."""
        weights, idx = self._route(layer, router_logits, scores)
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

    def _route(self, layer: int, router_logits: torch.Tensor,
               scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # router_logits: [T, E] -> weights [T, k] float32, idx [T, k] int64 (-1 = unused slot)
        weights, idx = topk_route(router_logits, self.top_k, self.renormalize)
        if scores is not None:
            weights = decision_weights(scores, idx, self.renormalize)
        T = weights.shape[0]
        if self.top_k < 2 or T == 0:
            self._count(layer, [0] * T, None)
            return weights, idx
        if self.decides_on_device:
            weights, idx, n, dropped = self.decide_on_device(layer, router_logits, weights, idx)
            pending = torch.stack((n.to(torch.float32), dropped)).detach()      # [2, T]: one kernel
            with self._unread_lock:          # stats() may read them from another thread
                self._unread.append((layer, pending))
                full = len(self._unread) >= self.read_every
            if full:
                self._read_decisions()
            return weights, idx
        drops, dropped, n_dev = self._decide(layer, router_logits, weights, idx)
        self._count(layer, drops, dropped)
        if not any(drops):
            return weights, idx
        if n_dev is None:
            n_dev = torch.tensor(drops, dtype=torch.int64).to(weights.device)
        return self._apply_drops(weights, idx, n_dev)

    def decide_on_device(self, layer: int, router_logits: torch.Tensor, weights: torch.Tensor,
                         idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device decision (uniform, adaptive), nothing read: weights [T, k] f32, idx [T, k]
        -> (weights, idx after the drops, experts dropped per token [T] int64, the dropped weight
        W per token [T] f32 (-1 where nothing was dropped))."""
        n = self._tail_drops(layer, router_logits, weights, idx)                # [T] int64, or bool (k = 2)
        if n.dtype == torch.bool:                                               # k = 2: W is w2
            dropped = torch.where(n, weights[:, -1], -1.0)
        else:
            dropped = torch.where(n > 0, tail_sums(weights).gather(1, (n - 1).clamp(min=0)[:, None])[:, 0], -1.0)
        w, i = self._apply_drops(weights, idx, n)
        return w, i, n, dropped

    def _apply_drops(self, weights: torch.Tensor, idx: torch.Tensor,
                     n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # weights/idx [T, k], n [T] int64 (or bool, k = 2) -> the last n[t] experts of token t
        # removed (id -1, weight 0) and its other weights renormalised (kept as they are without
        # `renormalize`); rows with n == 0 unchanged
        k = weights.shape[1]
        if k == 2 and self.renormalize:
            # k = 2 (Mixtral): a dropped row is exactly (1.0, 0.0) (w1 / w1 == 1 in IEEE
            # arithmetic) and ids (e1, -1): three kernels, no reduction
            key = (weights.device, weights.dtype)
            if self._drop_consts is None or self._drop_consts[0] != key:
                self._drop_consts = (key, torch.tensor([1.0, 0.0], dtype=weights.dtype, device=weights.device),
                                     torch.tensor([False, True], device=weights.device))
            _, one_zero, last = self._drop_consts
            flag = (n if n.dtype == torch.bool else n > 0)[:, None]              # [T, 1]
            return torch.where(flag, one_zero, weights), idx.masked_fill(flag & last, -1)
        pos = torch.arange(k, device=weights.device)
        keep = pos[None, :] < (k - n.long())[:, None]                            # [T, k]
        w = torch.where(keep, weights, torch.zeros_like(weights))
        if self.renormalize:
            # renormalise only the rows that changed: the others stay bit-identical to top-k
            w = torch.where((n > 0)[:, None], w / w.sum(dim=-1, keepdim=True), weights)
        i = torch.where(keep, idx, torch.full_like(idx, -1))
        return w, i

    def _decide(self, layer: int, router_logits: torch.Tensor, weights: torch.Tensor,
                idx: torch.Tensor) -> tuple[list[int], list[float] | None, torch.Tensor | None]:
        """Per token: how many tail experts go? -> (drops [T] on the host, dropped weight W [T]
        on the host or None, drops as a device int64 tensor or None). Default: the device
        decision read in one device->host transfer."""
        _, _, n, dropped = self.decide_on_device(layer, router_logits, weights, idx)
        both = torch.stack((n.to(weights.dtype), dropped)).tolist()              # one sync: [2][T]
        return [int(d) for d in both[0]], [max(w, 0.0) for w in both[1]], n

    def _read_decisions(self) -> None:
        """Count the decisions made on the device so far: one transfer for all of them."""
        with self._unread_lock:
            if not self._unread:
                return
            unread, self._unread = self._unread, []
        flat = torch.cat([t.reshape(-1).float() for _, t in unread]).tolist()
        at = 0
        for layer, t in unread:
            T = t.shape[1]
            n, w = flat[at:at + T], flat[at + T:at + 2 * T]        # experts dropped; their weight W, -1 = none
            at += 2 * T
            self._count(layer, [int(d) for d in n], [max(v, 0.0) for v in w])

    def _count(self, layer: int, drops: list[int], dropped: list[float] | None) -> None:
        """drops [T]: tail experts dropped per token; dropped [T]: their weight W (or None)."""
        T = len(drops)
        k = self.top_k
        self._decisions[layer] += T
        self._experts[layer] += T * k - sum(drops)
        self._single[layer] += sum(1 for d in drops if k - d == 1)
        if self.sensitivity is not None and dropped is not None and any(drops):
            F = self.sensitivity[layer]
            self._est_loss[layer] += sum(F * w * w for w, d in zip(dropped, drops) if d)

    def count_step(self, layer: int, decisions: int, experts: int, single: int, w2sq_dropped: float) -> None:
        """Add decisions the captured decode step (decoder/step.py) made on the device: tokens,
        experts they used, single-expert decisions and the sum of the dropped weights W^2."""
        with self._unread_lock:
            self._decisions[layer] += decisions
            self._experts[layer] += experts
            self._single[layer] += single
            if self.sensitivity is not None:
                self._est_loss[layer] += self.sensitivity[layer] * w2sq_dropped

    def _tail_drops(self, layer: int, router_logits: torch.Tensor, weights: torch.Tensor,
                    idx: torch.Tensor) -> torch.Tensor:
        """weights [T, k] (descending, sum 1) -> tail experts to drop per token [T] int64 in 0..k-1;
        for k = 2 a bool mask may stand for the counts (the one droppable expert: fewer kernels
        in the captured decode step)."""
        raise NotImplementedError


def tail_sums(weights: torch.Tensor) -> torch.Tensor:
    """weights [T, k] (descending) -> [T, k - 1]: W_m = the sum of the last m weights, m = 1..k-1."""
    return weights.flip(-1).cumsum(-1)[:, :-1]


def decision_weights(scores: torch.Tensor, idx: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """scores [T, E] (a sigmoid router's), idx [T, k] -> the picked scores [T, k] f32, renormalised
    when the family renormalises."""
    picked = scores.float().gather(-1, idx)
    return picked / (picked.sum(dim=-1, keepdim=True) + 1e-20) if renormalize else picked


class CountingTopK(TailDropGating):
    """The family's top-k routing (identical to decoder.routing.TopKGating's choice), with counters."""

    name = "topk"

    def __init__(self, top_k: int, num_layers: int, *, renormalize: bool = True) -> None:
        super().__init__(top_k, num_layers, renormalize=renormalize)

    def _decide(self, layer, router_logits, weights, idx):
        return [0] * weights.shape[0], None, None               # keeps every expert: nothing to read

    def _tail_drops(self, layer, router_logits, weights, idx):
        return torch.zeros(weights.shape[0], dtype=torch.int64, device=weights.device)


class UniformThresholdGating(TailDropGating):
    """The paper's naive baseline: drop the tail while its weight sum W < threshold (top-2:
    expert 2 when w2 < threshold), the same threshold in every layer."""

    name = "uniform"
    decides_on_device = True

    def __init__(self, top_k: int, num_layers: int, threshold: float,
                 sensitivity: Sequence[float] | None = None, *, renormalize: bool = True) -> None:
        super().__init__(top_k, num_layers, sensitivity, renormalize=renormalize)
        if not 0 <= threshold <= 1:
            raise ValueError("uniform threshold must be in [0, 1] (a renormalised weight)")
        self.threshold = float(threshold)

    def _tail_drops(self, layer, router_logits, weights, idx):
        if weights.shape[1] == 2:
            return weights[:, -1] < self.threshold
        return (tail_sums(weights) < self.threshold).sum(dim=1)       # W_m grows with m: a prefix


class AdaptiveGating(TailDropGating):
    """AdapMoE: drop the tail while F_l * W^2 < T (T = budget; T = 0 is exactly top-k); top-2:
    expert 1 alone when F_l * w2^2 < T."""

    name = "adaptive"
    decides_on_device = True

    def __init__(self, top_k: int, num_layers: int, sensitivity: Sequence[float], budget: float, *,
                 renormalize: bool = True) -> None:
        if sensitivity is None:
            raise ValueError("adaptive gating needs per-layer sensitivity (run `moe-decoder calibrate`)")
        super().__init__(top_k, num_layers, sensitivity, renormalize=renormalize)
        if not budget >= 0:
            raise ValueError("budget must be >= 0")
        self.budget = float(budget)

    def _tail_drops(self, layer, router_logits, weights, idx):
        F = self.sensitivity[layer]
        if weights.shape[1] == 2:
            w2 = weights[:, -1].float()
            return F * w2 * w2 < self.budget
        W = tail_sums(weights.float())                                  # [T, k - 1]
        return (F * W * W < self.budget).sum(dim=1)                     # F W_m^2 grows with m: a prefix


class CostAwareGating(TailDropGating):
    """Adaptive gating whose budget goes to the tail experts that cost link time to load.

    Written for top-2 below; with top-k the rule walks the tail from the last expert up: the
    m-th from the end goes while F_l * W_m^2 (W_m the weight of the m last) passes the test with
    that expert's loc, and the first one kept ends the tail ("expert 2" = the expert considered,
    w2 = W_m; a decision per expert considered).

    Per token and layer l: drop expert 2 when

        F_l * w2^2 < T * scale(loc)   and   (loss the token already spent) + F_l * w2^2 <= loss_bound

    where loc is where expert 2 is now: "gpu" (resident or being copied in, or another token's
    expert 1 in the same call, loaded anyway), "host" (the pinned host tier) or "store", and

        scale(loc) = load_cost(loc) / min(mean_cost, load_cost("host"))

    load_cost(loc) is the provider's live EWMA of the seconds to bring one expert into the GPU
    from loc (0 on the GPU); mean_cost is a running mean of load_cost(loc of expert 2) over the
    expert-2 decisions so far, the GPU ones counting 0: the plain mean of the first 50, then an
    EWMA with weight `mean_alpha` = 0.02.

    While mean_cost <= one host->GPU copy (every expert in the pinned host tier -- the usual
    deployment -- or store misses rare), scale = load_cost(loc) / mean_cost: the threshold
    averaged over decisions stays about T -- what `adaptive` spends at the same T -- but it is
    spent on the misses: a GPU expert 2 is never dropped (scale 0) and, when every miss costs the
    same, a miss gets T / (fraction of experts 2 that miss). With every expert in the host tier a
    host miss has scale 1 when no expert 2 is on the GPU (the decisions of `adaptive`), ~1.33
    with 25% of them on the GPU, ~2 with half, ~20 with 95%; a store miss costs more than a host
    miss and gets proportionally more. The scale grows without limit as the GPU hit rate goes to
    1, so the per-token loss bound (`loss_bound`, default L x T: what adaptive at T could spend
    if every layer dropped) is what keeps accuracy in check.

    When the mean exceeds one host->GPU copy (many misses to a slow store), T stays the budget
    of a load one host copy away: scale = load_cost(loc) / load_cost("host"), so a slower link
    buys more single-expert decisions (tests/faults/test_slow_store.py); dividing by the mean
    alone would make the decisions independent of how slow the link is. In short, scale is the
    larger of load_cost(loc) / mean_cost and load_cost(loc) / load_cost("host").

    Each call decides with the mean of the decisions before it, then folds its own in. Before the
    first expert-2 decision, while mean_cost is 0, or with a provider without load_cost (it
    measures nothing), the scale is `budget_scale(loc)`: load cost over one host->GPU copy
    (0 on the GPU, 1 for a host miss, load_cost("store") / load_cost("host") for a store miss;
    without load_cost, 1 and `store_cost_ratio`). If load_cost("host") is 0, the mean alone.

    provider: the expert cache; uses provider.location(layer, expert) -> "gpu"|"host"|"store" and
    provider.load_cost(location) -> seconds.
    stats() adds: expert2_location (expert-2 decisions per location), capped_by_bound (drops the
    bound refused), expert2_mean_cost_s (mean_cost), budget_normaliser_s (min(mean_cost, host
    cost), None while falling back), budget_scale_now (scale per location now) and
    mean_budget_scale (scale averaged over the decisions: ~1 once warm while mean_cost <= a host
    copy, above 1 when the slow-link rule applies).
    """

    name = "cost-aware"
    # EWMA rather than a windowed mean: O(1) state, and it follows the cache's hit rate as the
    # prefetcher and the working set change. 0.02 averages over ~50 decisions (about 1.5 decode
    # tokens of a 32-layer model): short enough to follow a warming cache, long enough that one
    # streak of GPU hits does not shrink the mean much (its relative noise at a 25% miss rate is
    # ~17%, against ~28% at 0.05); an outlier scale is still limited by the loss bound.
    mean_alpha = 0.02

    def __init__(self, top_k: int, num_layers: int, sensitivity: Sequence[float], budget: float,
                 provider: Any, loss_bound: float | None = None, store_cost_ratio: float = 10.0, *,
                 renormalize: bool = True) -> None:
        if sensitivity is None:
            raise ValueError("cost-aware gating needs per-layer sensitivity (run `moe-decoder calibrate`)")
        super().__init__(top_k, num_layers, sensitivity, renormalize=renormalize)
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
        self.mean_cost: float | None = None     # EWMA of load_cost(loc of expert 2); None = no decision yet
        self._n_observed = 0

    def reset_stats(self) -> None:
        super().reset_stats()
        self._tier_counts: dict[str, int] = {}
        self._capped = 0
        self._scale_sum = 0.0

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["loss_bound"] = self.loss_bound
        s["expert2_location"] = dict(self._tier_counts)
        s["capped_by_bound"] = self._capped
        s["expert2_mean_cost_s"] = self.mean_cost
        s["budget_normaliser_s"] = self.normaliser()
        memo: dict[str, float | None] = {}
        s["budget_scale_now"] = {loc: self.scale(loc, memo) for loc in ("gpu", "host", "store")}
        n = sum(self._tier_counts.values())
        s["mean_budget_scale"] = (self._scale_sum / n) if n else 0.0
        return s

    def _cost(self, location: str, memo: dict[str, float | None] | None = None) -> float | None:
        """provider.load_cost(location) (None without load_cost), read once per `memo` (a call)."""
        if memo is not None and location in memo:
            return memo[location]
        cost = getattr(self.provider, "load_cost", None)
        c = None if cost is None else 0.0 if location == "gpu" else float(cost(location))
        if memo is not None:
            memo[location] = c
        return c

    def budget_scale(self, location: str, memo: dict[str, float | None] | None = None) -> float:
        """The fallback multiplier of T (before any decision, mean cost 0, or no load_cost): the
        load cost of an expert 2 at `location` over one host->GPU copy."""
        if location == "gpu":
            return 0.0
        ref = self._cost("host", memo)
        if ref is None or not ref > 0:
            return 1.0 if location == "host" else self.store_cost_ratio
        return self._cost(location, memo) / ref

    def normaliser(self, memo: dict[str, float | None] | None = None) -> float | None:
        """The cost that gets T: min(mean_cost, load_cost("host")); None = fall back to budget_scale."""
        if self.mean_cost is None or not self.mean_cost > 0:
            return None
        host = self._cost("host", memo)
        if host is None:
            return None
        return min(self.mean_cost, host) if host > 0 else self.mean_cost

    def scale(self, location: str, memo: dict[str, float | None] | None = None) -> float:
        """The multiplier of T for an expert 2 at `location` now: load_cost(location) / normaliser()."""
        if location == "gpu":
            return 0.0
        ref = self.normaliser(memo)
        if ref is None:
            return self.budget_scale(location, memo)
        return self._cost(location, memo) / ref

    def _observe(self, costs: list[float]) -> None:
        """Fold this call's expert-2 load costs (0 for GPU), in token order, into mean_cost: the
        plain mean of the first 1/mean_alpha decisions, an EWMA after (weight max(alpha, 1/n)), so
        a GPU hit first does not leave the mean biased towards 0 for hundreds of decisions."""
        m, n = self.mean_cost or 0.0, self._n_observed
        for c in costs:
            n += 1
            m += max(self.mean_alpha, 1.0 / n) * (c - m)
        if n:
            self.mean_cost, self._n_observed = m, n

    decides_on_host = True    # the decode step reads the routing, then calls decide_rows

    def _decide(self, layer, router_logits, weights, idx):
        # one transfer: each token's expert ids and w2; the decision is made on the host in
        # float64 (the same arithmetic as float64 tensors), the per-token loss spent in Python
        packed = torch.cat((idx.to(torch.float64), weights.double()), dim=1).tolist()  # [T][2k]
        drops, dropped = self.decide_rows(layer, packed)
        return drops, dropped, None

    def count_resident(self, layer: int, decisions: int) -> None:
        """Decisions of a step that ran with every expert on the GPU (the captured whole step
        decides nothing on the host: a GPU tail expert is never dropped, so each decision
        looked at one, its last expert, on the GPU)."""
        self._tier_counts["gpu"] = self._tier_counts.get("gpu", 0) + decisions
        if getattr(self.provider, "load_cost", None) is not None:
            self._observe([0.0] * decisions)

    def decide_rows(self, layer: int, packed: list[list[float]]) -> tuple[list[int], list[float]]:
        """How many tail experts each token drops, from host rows [T][2k] (k expert ids, then
        their k weights, descending): (drops [T], dropped weight W [T]). From the last expert
        up, the m-th goes while F_l * W_m^2 < T * scale(its location) and the token's loss spent
        over the layers of the step stays within loss_bound; the first kept one ends the tail.
        Every token's first expert is loaded anyway ("gpu" for the others' tails)."""
        T = len(packed)
        k = self.top_k
        if layer <= self._last_layer or self._acc is None or len(self._acc) != T:
            self._acc = [0.0] * T                              # a new forward: new tokens
        self._last_layer = layer
        first = {int(row[0]) for row in packed}                # never dropped: loaded anyway
        has_cost = getattr(self.provider, "load_cost", None) is not None
        memo: dict[str, float | None] = {}                     # load_cost per location, read once per call
        scale_of: dict[int, float] = {}
        loc_of: dict[int, str] = {}
        F = self.sensitivity[layer]
        drops, dropped, seen = [], [], []
        for t, row in enumerate(packed):
            n, W, est_n, tail = 0, 0.0, 0.0, 0.0
            for m in range(1, k):
                e, tail = int(row[k - m]), tail + row[2 * k - m]     # the m-th expert from the end; W_m
                if e not in scale_of:
                    loc = "gpu" if e in first else self.provider.location(layer, e)
                    scale_of[e], loc_of[e] = self.scale(loc, memo), loc
                loc = loc_of[e]
                self._tier_counts[loc] = self._tier_counts.get(loc, 0) + 1
                self._scale_sum += scale_of[e]
                if has_cost:
                    seen.append(self._cost(loc, memo))
                est = F * tail * tail
                want = est < self.budget * scale_of[e]
                fits = self._acc[t] + est <= self.loss_bound
                self._capped += want and not fits
                if not (want and fits):
                    break
                n, W, est_n = m, tail, est
            self._acc[t] += est_n
            drops.append(n)
            dropped.append(W)
        self._observe(seen)
        return drops, dropped

    def _tail_drops(self, layer, router_logits, weights, idx):
        drops, _, _ = self._decide(layer, router_logits, weights, idx)
        return torch.tensor(drops, dtype=torch.int64).to(weights.device)


# --------------------------------------------------------------------------------------------
DEFAULT_SINGLE_RATIO = 0.25
CALIBRATE_HINT = "moe-decoder calibrate --store STORE --model MODEL --text HELD_OUT.txt --upload"


def profile_budget(profile: Mapping[str, Any] | None, ratio: float, gating: str = "adaptive") -> float:
    """The calibrated budget T at which `ratio` of the calibration decisions use one expert
    (the profile's `budget_for_single_ratio`). ValueError, naming the calibrate command, when
    the model has no such budgets; naming the recorded ratios when `ratio` is not one."""
    table = (profile or {}).get("budget_for_single_ratio")
    if not table:
        raise ValueError(f"{gating} gating needs a budget: pass --budget T, or calibrate the model to store "
                         f"budgets for single-expert ratios: `{CALIBRATE_HINT}`")
    for key, T in table.items():
        if abs(float(key) - float(ratio)) < 1e-9:
            return float(T)
    have = ", ".join(f"{float(k):g}" for k in sorted(table, key=float))
    raise ValueError(f"the calibration profile has budgets for single-expert ratios {have}, not {ratio:g} "
                     f"(pass --budget T, or one of those)")


def profile_sensitivity(profile: Mapping[str, Any] | None, num_layers: int | None = None) -> list[float] | None:
    """Per-layer F_l from a calibration profile (profile.json as the manifest carries it), or None."""
    sens = (profile or {}).get("sensitivity")
    if sens is None:
        return None
    sens = [float(x) for x in sens]
    if num_layers is not None and len(sens) != num_layers:
        raise ValueError(f"profile has sensitivity for {len(sens)} layers, the model has {num_layers}")
    return sens


def make_gating(name: str, *, config: ModelConfig, provider: Any = None, budget: float | None = None,
                profile: Mapping[str, Any] | None = None, threshold: float | None = None, loss_bound: float | None = None,
                sensitivity: Sequence[float] | None = None, store_cost_ratio: float = 10.0,
                miss_precision_threshold: float | None = None, single_expert_ratio: float | None = None) -> Gating:
    """Build a gating by name (see GATINGS). config: ModelConfig (top_k, layers).

    uniform: `threshold` (or `budget`) is the w2 threshold. adaptive / cost-aware: `budget` is T,
    sensitivity from `sensitivity` or the calibration `profile` (the store's profile.json).
    Without a budget, T is the calibrated one for `single_expert_ratio` from the profile's
    `budget_for_single_ratio`; without a ratio either, the profile's quality budget
    (`budget_for_ppl_rise`, from `calibrate --max-ppl-rise`) when it has one, else the one for
    a ratio of 0.25; a profile without budgets is a one-line error naming the calibrate command.
    miss_precision_threshold: with an ExpertCache built with `miss_precision`, experts whose
    routing weight is below it are loaded at that lower precision when they miss (HOBBIT).
    """
    if name in ("adaptive", "cost-aware"):
        if budget is not None and single_expert_ratio is not None:
            raise ValueError("give a budget or a single-expert ratio, not both")
        if budget is None:
            quality = (profile or {}).get("budget_for_ppl_rise")
            if single_expert_ratio is None and quality:
                # calibrated for a quality target (`calibrate --max-ppl-rise`): the strictest one
                budget = float(quality[min(quality, key=float)])
            else:
                budget = profile_budget(profile, DEFAULT_SINGLE_RATIO if single_expert_ratio is None
                                        else single_expert_ratio, name)
    elif single_expert_ratio is not None:
        raise ValueError(f"a single-expert ratio applies to adaptive and cost-aware gating, not {name!r}")
    g = _make_gating(name, config=config, provider=provider, budget=budget, profile=profile, threshold=threshold,
                     loss_bound=loss_bound, sensitivity=sensitivity, store_cost_ratio=store_cost_ratio)
    if miss_precision_threshold is not None:
        if provider is None or not hasattr(provider, "allow_low_precision"):
            raise ValueError("--miss-precision needs the AdapMoE expert cache (give cache budgets)")
        g.set_miss_precision_hint(provider, miss_precision_threshold)
    return g


def _make_gating(name: str, *, config: ModelConfig, provider: Any, budget: float | None,
                 profile: Mapping[str, Any] | None,
                 threshold: float | None, loss_bound: float | None, sensitivity: Sequence[float] | None,
                 store_cost_ratio: float) -> TailDropGating:
    k = int(config.num_experts_per_tok)
    L = int(config.num_hidden_layers)
    renorm = bool(getattr(config, "norm_topk_prob", True))
    if name == "topk":
        return CountingTopK(k, L, renormalize=renorm)
    sens = list(sensitivity) if sensitivity is not None else profile_sensitivity(profile, L)
    if name == "uniform":
        t = threshold if threshold is not None else budget
        if t is None:
            raise ValueError("uniform gating needs a threshold (--budget)")
        return UniformThresholdGating(k, L, t, sens, renormalize=renorm)
    if name in ("adaptive", "cost-aware"):
        if sens is None:
            raise ValueError(f"{name} gating needs a calibration profile with per-layer sensitivity: "
                             f"run `moe-decoder calibrate` and put profile.json in the store")
        T = 0.0 if budget is None else float(budget)
        if name == "adaptive":
            return AdaptiveGating(k, L, sens, T, renormalize=renorm)
        if provider is None:
            raise ValueError("cost-aware gating needs the expert provider")
        return CostAwareGating(k, L, sens, T, provider, loss_bound=loss_bound, store_cost_ratio=store_cost_ratio,
                               renormalize=renorm)
    raise ValueError(f"unknown gating {name!r} (available: {', '.join(GATINGS)})")
