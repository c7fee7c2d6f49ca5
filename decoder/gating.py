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
- `cost-aware` ours: adaptive's rule with T scaled per decision by the live cost of loading
               expert 2 from where it is now (the expert cache's EWMA per tier) over the running
               mean of that cost across recent expert-2 decisions (GPU ones count 0): an expert 2
               on the GPU is never dropped, and the budget adaptive would spread over every
               decision goes to the misses, more to the costlier ones (the threshold averaged
               over decisions stays ~T). The estimated loss a token accumulates over the layers
               (sum of F_l * w2^2 of its dropped experts) never exceeds `loss_bound`.

Every gating returns (weights [T, k] float32, idx [T, k] int64) with idx == -1 (weight 0) in a
slot a token does not use (see decoder.model.transformer.Gating); when every token of a call
drops expert 2 the result has k = 1. Decisions are counted per layer: experts per token,
single-expert ratio and the estimated loss of the dropped experts.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping, Sequence

import torch

from decoder.model.config import ModelConfig
from decoder.routing import Gating, topk_route

GATINGS = ("topk", "uniform", "adaptive", "cost-aware")


class CountingGating(Gating):
    """Base: top-k routing, then `_drop_second(layer, logits, weights, idx)` (or `_decide`)
    decides per token whether the second expert goes. Counts decisions.

    A gating whose decision is a pure function of the router output (`decides_on_device`:
    uniform, adaptive) makes it on the device and returns without reading anything: its
    decisions (and w2, for the estimated loss) are counted later, from one batched read every
    `read_every` calls or at `stats()`. On a GPU a read is a synchronisation that stops the host
    from running ahead, and the MoE block already makes one per layer (its routing)."""

    name = "counting"
    decides_on_device = False
    read_every = 256
    _drop_consts: tuple | None = None     # (device, dtype), (1.0, 0.0) weights, (False, True) "last slot"

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
        self._unread_lock = threading.Lock()
        self.reset_stats()

    # --- counters ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        L = self.num_layers
        self._decisions = [0] * L
        self._experts = [0] * L
        self._single = [0] * L
        self._est_loss = [0.0] * L
        self._unread: list[tuple[int, torch.Tensor]] = []   # (layer, [T] dropped w2 or -1) on the device

    def stats(self) -> dict[str, Any]:
        self._read_decisions()
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
        if self.decides_on_device:
            drop_dev = self._drop_second(layer, router_logits, weights, idx)       # [T] bool
            # [T]: the dropped expert's w2 (>= 0), -1 where kept: one kernel carries both
            pending = torch.where(drop_dev, weights[:, -1], -1.0).detach()
            with self._unread_lock:          # stats() may read them from another thread
                self._unread.append((layer, pending))
                full = len(self._unread) >= self.read_every
            if full:
                self._read_decisions()
            return self._apply_drop(weights, idx, drop_dev)
        drop, w2, drop_dev = self._decide(layer, router_logits, weights, idx)
        self._count(layer, drop, w2)
        if not any(drop):
            return weights, idx
        # drop the last (for k = 2: the second) expert of the flagged tokens; renormalise the rest
        if drop_dev is None:
            drop_dev = torch.tensor(drop, dtype=torch.bool).to(weights.device)
        return self._apply_drop(weights, idx, drop_dev)

    def _apply_drop(self, weights: torch.Tensor, idx: torch.Tensor,
                    drop_dev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # weights/idx [T, k], drop_dev [T] bool -> the last expert of flagged tokens removed
        # (id -1, weight 0) and their other weights renormalised; unflagged rows unchanged
        if weights.shape[1] == 2:
            # k = 2 (Mixtral): a dropped row is exactly (1.0, 0.0) (w1 / w1 == 1 in IEEE
            # arithmetic) and ids (e1, -1): three kernels, no reduction
            key = (weights.device, weights.dtype)
            if self._drop_consts is None or self._drop_consts[0] != key:
                self._drop_consts = (key, torch.tensor([1.0, 0.0], dtype=weights.dtype, device=weights.device),
                                     torch.tensor([False, True], device=weights.device))
            _, one_zero, last = self._drop_consts
            flag = drop_dev[:, None]                                             # [T, 1]
            return torch.where(flag, one_zero, weights), idx.masked_fill(flag & last, -1)
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

    def _read_decisions(self) -> None:
        """Count the decisions made on the device so far: one transfer for all of them."""
        with self._unread_lock:
            if not self._unread:
                return
            unread, self._unread = self._unread, []
        flat = torch.cat([t.reshape(-1).float() for _, t in unread]).tolist()
        at = 0
        for layer, t in unread:
            vals = flat[at:at + t.shape[0]]                      # w2 of a dropped expert, -1 = kept
            at += t.shape[0]
            self._count(layer, [v >= 0 for v in vals], [max(v, 0.0) for v in vals])

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

    def count_step(self, layer: int, decisions: int, experts: int, single: int, w2sq_dropped: float) -> None:
        """Add decisions the captured decode step (decoder/step.py) made on the device: tokens,
        experts they used, single-expert decisions and the sum of the dropped experts' w2^2."""
        with self._unread_lock:
            self._decisions[layer] += decisions
            self._experts[layer] += experts
            self._single[layer] += single
            if self.sensitivity is not None:
                self._est_loss[layer] += self.sensitivity[layer] * w2sq_dropped

    def _drop_second(self, layer: int, router_logits: torch.Tensor, weights: torch.Tensor,
                     idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CountingTopK(CountingGating):
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
    decides_on_device = True

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
    decides_on_device = True

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
    """Adaptive gating whose budget goes to the second experts that cost link time to load.

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
        packed = torch.cat((idx.to(torch.float64), weights[:, -1:].double()), dim=1).tolist()  # [T][k + 1]
        drop, w2 = self.decide_rows(layer, packed)
        return drop, w2, None

    def count_resident(self, layer: int, decisions: int) -> None:
        """Expert-2 decisions of a step that ran with every expert on the GPU (the captured
        whole step decides nothing on the host: a GPU expert 2 is never dropped)."""
        self._tier_counts["gpu"] = self._tier_counts.get("gpu", 0) + decisions
        if getattr(self.provider, "load_cost", None) is not None:
            self._observe([0.0] * decisions)

    def decide_rows(self, layer: int, packed: list[list[float]]) -> tuple[list[bool], list[float]]:
        """Drop expert 2? for each token from host rows [T][k + 1] (k expert ids, then w2):
        (drop [T], w2 [T]). Keeps the per-token loss spent over the layers of a step."""
        T = len(packed)
        k = self.top_k
        if layer <= self._last_layer or self._acc is None or len(self._acc) != T:
            self._acc = [0.0] * T                              # a new forward: new tokens
        self._last_layer = layer
        first = {int(e) for row in packed for e in row[:k - 1]}  # loaded anyway for some token
        has_cost = getattr(self.provider, "load_cost", None) is not None
        memo: dict[str, float | None] = {}                     # load_cost per location, read once per call
        scale_of: dict[int, float] = {}
        loc_of: dict[int, str] = {}
        F = self.sensitivity[layer]
        drop, w2, seen = [], [], []
        for t, row in enumerate(packed):
            e, w = int(row[k - 1]), row[k]
            if e not in scale_of:
                loc = "gpu" if e in first else self.provider.location(layer, e)
                scale_of[e], loc_of[e] = self.scale(loc, memo), loc
            loc = loc_of[e]
            self._tier_counts[loc] = self._tier_counts.get(loc, 0) + 1
            self._scale_sum += scale_of[e]
            if has_cost:
                seen.append(self._cost(loc, memo))
            est = F * w * w
            want = est < self.budget * scale_of[e]
            fits = self._acc[t] + est <= self.loss_bound
            self._capped += want and not fits
            d = want and fits
            if d:
                self._acc[t] = self._acc[t] + est
            drop.append(d)
            w2.append(w)
        self._observe(seen)
        return drop, w2

    def _drop_second(self, layer, router_logits, weights, idx):
        drop, _, _ = self._decide(layer, router_logits, weights, idx)
        return torch.tensor(drop, dtype=torch.bool).to(weights.device)


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
    Without a budget, T is the calibrated one for `single_expert_ratio` (default 0.25) from the
    profile's `budget_for_single_ratio`; a profile without budgets is a one-line error naming
    the calibrate command.
    miss_precision_threshold: with an ExpertCache built with `miss_precision`, experts whose
    routing weight is below it are loaded at that lower precision when they miss (HOBBIT).
    """
    if name in ("adaptive", "cost-aware"):
        if budget is not None and single_expert_ratio is not None:
            raise ValueError("give a budget or a single-expert ratio, not both")
        if budget is None:
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
                 store_cost_ratio: float) -> CountingGating:
    k = int(config.num_experts_per_tok)
    L = int(config.num_hidden_layers)
    if name == "topk":
        return CountingTopK(k, L)
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
