"""How many GPU expert slots each layer gets: AdapMoE's dynamic-programming cache plan.

A layer l with s slots (s most recently used experts on the GPU) pays, per token, an expected
number of on-demand expert loads f_l(s). With E experts, prefetch accuracy a (probability the
prefetcher predicted the needed expert in time), single-expert ratio r (fraction of tokens that
adaptive gating sends to one expert) and, following the paper, a cache hit model where a needed
expert is resident with probability h(s):

    f(s) = r * (1 - h) * (1 - a) + (1 - r) * (2 * P2 * (1 - a) + P2 * a + P1 * (1 - a))

where P2 = P(both experts of a top-2 token miss), P1 = P(exactly one misses).

`plan_slots` is the paper's planner, with uniform expert choice: h = s/E,
P2 = (E-s)(E-s-1)/(E(E-1)), P1 = 2s(E-s)/(E(E-1)).

`plan_slots_popularity` goes beyond the paper: it uses the measured per-expert popularity of
each layer (from calibration). The cache is assumed to hold the s most popular experts; a token's
top-2 pair is drawn without replacement with probabilities proportional to popularity
(P(i then j) = p_i p_j / (1 - p_i)), which gives h, P1, P2 exactly under that model and reduces
to the uniform formulas when popularity is uniform.

Both minimise sum_l f_l(s_l) subject to s_l in [1, E] and sum_l s_l = total_slots, exactly,
by dynamic programming over (layer, slots used) in O(L * total_slots * E); among optimal plans
(exact ties, up to 1e-12) the most even one (least sum of s_l^2) is returned.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

Number = Union[int, float]
PerLayer = Union[Number, Sequence[Number]]


def _per_layer(value: PerLayer, num_layers: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        vals = [float(value)] * num_layers
    else:
        vals = [float(v) for v in value]
        if len(vals) != num_layers:
            raise ValueError(f"{name}: expected {num_layers} per-layer values, got {len(vals)}")
    for v in vals:
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"{name}: values must lie in [0, 1], got {v!r}")
    return vals


def _num_layers(prefetch_accuracy: PerLayer, top1_ratio: PerLayer, default: int | None) -> int:
    for v in (prefetch_accuracy, top1_ratio):
        if not isinstance(v, (int, float)):
            return len(v)
    if default is None:
        raise ValueError("num_layers is needed when prefetch_accuracy and top1_ratio are both scalars")
    return default


def expected_loads(s: int, E: int, a: float, r: float) -> float:
    """f(s): expected on-demand loads per token at one layer under uniform expert choice."""
    if not 1 <= s <= E:
        raise ValueError(f"slots must be in [1, {E}], got {s}")
    if E == 1:
        return 0.0
    denom = E * (E - 1)
    p2 = (E - s) * (E - s - 1) / denom
    p1 = 2 * s * (E - s) / denom
    return _f(1.0 - s / E, p1, p2, a, r)


def _f(miss1: float, p1: float, p2: float, a: float, r: float) -> float:
    return r * miss1 * (1 - a) + (1 - r) * (2 * p2 * (1 - a) + p2 * a + p1 * (1 - a))


def popularity_loads(s: int, popularity: Sequence[float], a: float, r: float) -> float:
    """f(s) for one layer with measured per-expert popularity (cache = the s most popular experts)."""
    E = len(popularity)
    if not 1 <= s <= E:
        raise ValueError(f"slots must be in [1, {E}], got {s}")
    p = _normalised(popularity)
    order = sorted(range(E), key=lambda e: -p[e])
    cached = set(order[:s])
    miss1 = sum(p[e] for e in range(E) if e not in cached)
    p1 = p2 = 0.0
    for i in range(E):
        if p[i] <= 0.0:
            continue
        rest = 1.0 - p[i]
        for j in range(E):
            if j == i:
                continue
            if rest <= 0.0:
                # expert i takes all mass: the second choice is uniform among the others
                pij = p[i] / (E - 1)
            else:
                pij = p[i] * p[j] / rest
            misses = (i not in cached) + (j not in cached)
            if misses == 2:
                p2 += pij
            elif misses == 1:
                p1 += pij
    return _f(miss1, p1, p2, a, r)


def _normalised(popularity: Sequence[float]) -> list[float]:
    p = [float(x) for x in popularity]
    if any(x < 0 or math.isnan(x) for x in p):
        raise ValueError("popularity must be non-negative")
    total = sum(p)
    if total <= 0:
        return [1.0 / len(p)] * len(p)
    return [x / total for x in p]


def _solve(costs: list[list[float]], total_slots: int) -> list[int]:
    """min sum_l costs[l][s_l - 1] with s_l in [1, len(costs[l])], sum s_l = total_slots (exact DP)."""
    L = len(costs)
    caps = [len(c) for c in costs]
    if total_slots < L:
        raise ValueError(f"total_slots={total_slots} < number of layers {L}: every layer needs one slot")
    if total_slots >= sum(caps):
        return caps[:]
    INF = math.inf
    # best[t] = (min cost, then min sum of s^2) of layers [0, l) using exactly t slots;
    # choice[l][t] = s_l chosen. The second key only breaks exact ties (e.g. when every
    # layer's f is linear in s): the most even of the optimal plans wins.
    best = [(INF, 0)] * (total_slots + 1)
    best[0] = (0.0, 0)
    choice: list[list[int]] = []
    for l in range(L):
        nxt = [(INF, 0)] * (total_slots + 1)
        ch = [0] * (total_slots + 1)
        for t in range(total_slots + 1):
            bc, bq = best[t]
            if bc == INF:
                continue
            for s in range(1, caps[l] + 1):
                u = t + s
                if u > total_slots:
                    break
                c, q = bc + costs[l][s - 1], bq + s * s
                nc, nq = nxt[u]
                if c < nc - 1e-12 or (c <= nc + 1e-12 and q < nq):
                    nxt[u] = (c, q)
                    ch[u] = s
        best = nxt
        choice.append(ch)
    if best[total_slots][0] == INF:  # pragma: no cover - excluded by the bounds above
        raise ValueError("no feasible slot plan")
    plan = [0] * L
    t = total_slots
    for l in range(L - 1, -1, -1):
        plan[l] = choice[l][t]
        t -= plan[l]
    return plan


def plan_slots(prefetch_accuracy: PerLayer, top1_ratio: PerLayer, total_slots: int,
               experts_per_layer: int, num_layers: int | None = None) -> list[int]:
    """GPU slots per layer minimising the expected on-demand loads per token (AdapMoE DP).

    prefetch_accuracy, top1_ratio: scalars (same for every layer; then `num_layers` is needed)
    or per-layer sequences. Returns s_l in [1, E] with sum = total_slots, or all E per layer
    when total_slots >= L * E.
    """
    E = int(experts_per_layer)
    if E < 1:
        raise ValueError(f"experts_per_layer must be >= 1, got {experts_per_layer}")
    L = _num_layers(prefetch_accuracy, top1_ratio, num_layers)
    acc = _per_layer(prefetch_accuracy, L, "prefetch_accuracy")
    r1 = _per_layer(top1_ratio, L, "top1_ratio")
    costs = [[expected_loads(s, E, acc[l], r1[l]) for s in range(1, E + 1)] for l in range(L)]
    return _solve(costs, int(total_slots))


def plan_slots_popularity(popularity: Sequence[Sequence[float]], prefetch_accuracy: PerLayer,
                          top1_ratio: PerLayer, total_slots: int) -> list[int]:
    """Like `plan_slots`, but with each layer's measured expert popularity ([L][E]; any scale:
    counts or frequencies, normalised per layer) instead of the uniform assumption."""
    L = len(popularity)
    if L == 0:
        raise ValueError("popularity is empty")
    E = len(popularity[0])
    if any(len(row) != E for row in popularity):
        raise ValueError("popularity rows must all have num_experts entries")
    acc = _per_layer(prefetch_accuracy, L, "prefetch_accuracy")
    r1 = _per_layer(top1_ratio, L, "top1_ratio")
    costs = [[popularity_loads(s, popularity[l], acc[l], r1[l]) for s in range(1, E + 1)] for l in range(L)]
    return _solve(costs, int(total_slots))


def plan_cost(plan: Sequence[int], prefetch_accuracy: PerLayer, top1_ratio: PerLayer, experts_per_layer: int,
              popularity: Sequence[Sequence[float]] | None = None) -> float:
    """Expected on-demand loads per token of a plan (uniform model, or popularity model when given)."""
    L = len(plan)
    acc = _per_layer(prefetch_accuracy, L, "prefetch_accuracy")
    r1 = _per_layer(top1_ratio, L, "top1_ratio")
    if popularity is None:
        return sum(expected_loads(s, experts_per_layer, acc[l], r1[l]) for l, s in enumerate(plan))
    return sum(popularity_loads(s, popularity[l], acc[l], r1[l]) for l, s in enumerate(plan))
