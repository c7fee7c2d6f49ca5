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

Layers with fewer slots than top_k (objective="top-k", the default). The paper's f does not see
that a layer with s < top_k slots cannot hold a token's top_k experts at once: with top-2 and one
slot, the slot holds at most one of the pair and the other comes in on demand (a transient load
through a scratch slot) whatever the prefetcher predicted. f credits the prefetcher with the
missing expert in the P1 case (resident + prefetched = 0 loads), which one slot cannot hold.
Measured through the real ExpertCache (benchmarks/README.md, "Cache plan", has the rows and
their command), the paper's objective gives some layers one slot at small budgets and those
plans make more on-demand loads than equal quotas; f under-predicts every plan with one-slot
layers and over-predicts plans without them (LRU and the prefetcher keep recent experts, which
f, with independent tokens, does not credit), so a cost term alone still under-rates a second
slot. So the default objective does two things:

- constraint: s_l >= top_k in every layer whenever the budget allows it (total_slots >= L * top_k);
  below that, s_l >= 1 as in the paper;
- cost term, for the layers still below top_k (only when the budget is under L * top_k): the
  prefetcher gets no credit for the second expert while the first is resident,
  f_k(s) = f(s) + (1 - r) * a * P1 for s < top_k (P1 = P(exactly one of the pair is cached)),
  i.e. one demand load for that expert in the P1 case.

Top-k (fine-grained experts: Qwen3-MoE, OLMoE, DeepSeek-V3, top-4 to top-8). f above is the
k = 2 case of: a token uses k' experts, 1 + Binomial(k - 1, 1 - r) (each of the k - 1 experts
adaptive gating may drop goes with probability r, the calibrated drop ratio: for top-2 exactly
"one expert with probability r"); M of them miss the s cached (hypergeometric under uniform
choice, P(M = m) = C(E - s, m) C(s, k' - m) / C(E, k')); each miss loads on demand except one
that the prefetcher brings in time with probability a:

    f(s) = sum_k' P(k') * (E[M | k'] - a * P(M >= 1 | k'))

(k' = 2: E[M] - a (P1 + P2) = 2 P2 (1 - a) + P2 a + P1 (1 - a), the paper's). The cost term
generalises the same way: with s < k' slots the prefetched expert needs a slot the token's
k' - M resident experts leave free, so the credit is a * P(M >= k' - s + 1) (k' = 2, s = 1:
a * P2, i.e. f + a * P1). The popularity model draws the k' experts without replacement in
proportion to popularity, exactly for k' <= 2 and, for k' > 2, from `POPULARITY_SAMPLES` seeded
draws (deterministic; the DP sees one fixed estimate). objective="paper" keeps the paper's
objective (s_l >= 1, no cost term), with f for the model's top_k.

Both minimise sum_l f_l(s_l) subject to s_l in [floor, E] and sum_l s_l = total_slots, exactly,
by dynamic programming over (layer, slots used) in O(L * total_slots * E); among optimal plans
(exact ties, up to 1e-12) the most even one (least sum of s_l^2) is returned.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence, Union

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


OBJECTIVES = ("top-k", "paper")


def _check_objective(objective: str, top_k: int) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} ({' | '.join(OBJECTIVES)})")
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def expected_loads(s: int, E: int, a: float, r: float, top_k: int | None = None,
                   experts_per_token: int | None = None) -> float:
    """f(s): expected on-demand loads per token at one layer under uniform expert choice.
    top_k=None: the paper's f; top_k=k: with the cost term for s < k (module docstring).
    experts_per_token: the model's top-k f is for (default: top_k, else 2)."""
    if not 1 <= s <= E:
        raise ValueError(f"slots must be in [1, {E}], got {s}")
    if E == 1:
        return 0.0
    k = int(experts_per_token or top_k or 2)
    if k != 2:
        return _f_top_k(k, r, a, s, lambda kk, m: _hypergeom_ge(E, s, kk, m), kk_miss=lambda kk: kk * (1 - s / E),
                        cost_term=top_k is not None)
    denom = E * (E - 1)
    p2 = (E - s) * (E - s - 1) / denom
    p1 = 2 * s * (E - s) / denom
    return _f(1.0 - s / E, p1, p2, a, r, below_top_k=top_k is not None and s < top_k)


def kept_distribution(k: int, r: float) -> list[tuple[int, float]]:
    """[(k', P(k'))]: a token keeps its first expert and each of the other k - 1 with
    probability 1 - r (r = the calibrated drop ratio)."""
    return [(1 + j, math.comb(k - 1, j) * (1 - r) ** j * r ** (k - 1 - j)) for j in range(k)]


def _hypergeom_ge(E: int, s: int, kk: int, m: int) -> float:
    """P(M >= m): M misses among kk experts drawn uniformly without replacement from E, s cached."""
    total = math.comb(E, kk)
    return sum(math.comb(E - s, j) * math.comb(s, kk - j) for j in range(max(m, 0), kk + 1)) / total


def _f_top_k(k: int, r: float, a: float, s: int, p_ge, kk_miss, cost_term: bool) -> float:
    """sum_k' P(k') (E[M | k'] - a P(M >= need | k')), need = 1, or k' - s + 1 with the cost
    term when s < k' (module docstring). p_ge(k', m) = P(M >= m | k'); kk_miss(k') = E[M | k']."""
    f = 0.0
    for kk, pk in kept_distribution(k, r):
        if pk == 0.0:
            continue
        need = max(1, kk - s + 1) if cost_term else 1
        f += pk * (kk_miss(kk) - a * p_ge(kk, need))
    return f


def _f(miss1: float, p1: float, p2: float, a: float, r: float, below_top_k: bool = False) -> float:
    f = r * miss1 * (1 - a) + (1 - r) * (2 * p2 * (1 - a) + p2 * a + p1 * (1 - a))
    if below_top_k:
        # one resident expert fills the layer: the prefetcher cannot also hold the other one
        f += (1 - r) * a * p1
    return f


def popularity_loads(s: int, popularity: Sequence[float], a: float, r: float, top_k: int | None = None,
                     experts_per_token: int | None = None) -> float:
    """f(s) for one layer with measured per-expert popularity (cache = the s most popular experts).
    top_k, experts_per_token as in `expected_loads`."""
    E = len(popularity)
    if not 1 <= s <= E:
        raise ValueError(f"slots must be in [1, {E}], got {s}")
    k = int(experts_per_token or top_k or 2)
    if k != 2:
        draws = _popularity_draws(tuple(float(x) for x in popularity))
        return _f_top_k(k, r, a, s, lambda kk, m: draws.p_ge(kk, s, m), kk_miss=lambda kk: draws.mean_miss(kk, s),
                        cost_term=top_k is not None)
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
    return _f(miss1, p1, p2, a, r, below_top_k=top_k is not None and s < top_k)


POPULARITY_SAMPLES = 4096


class _Draws:
    """Ranks (0 = most popular) of k' experts drawn without replacement in proportion to
    popularity, for k' = 1..E: exact for k' = 1 (one draw), sampled for k' > 1."""

    def __init__(self, popularity: tuple[float, ...]) -> None:
        import torch

        self.p = _normalised(popularity)
        self.E = len(self.p)
        order = sorted(range(self.E), key=lambda e: -self.p[e])
        self.rank = torch.empty(self.E, dtype=torch.long)
        self.rank[torch.tensor(order)] = torch.arange(self.E)
        self._sorted: dict[int, Any] = {}

    def _ranks(self, kk: int) -> Any:
        # [N, kk] ranks of each sample's experts, ascending
        import torch

        if kk not in self._sorted:
            g = torch.Generator().manual_seed(kk)
            w = torch.tensor(self.p, dtype=torch.float64).clamp_min(1e-12).expand(POPULARITY_SAMPLES, -1)
            idx = torch.multinomial(w, kk, replacement=False, generator=g)              # [N, kk]
            self._sorted[kk] = self.rank[idx].sort(dim=1).values
        return self._sorted[kk]

    def p_ge(self, kk: int, s: int, m: int) -> float:
        """P(M >= m): at least m of the kk drawn have rank >= s (are not among the s cached)."""
        if m <= 0:
            return 1.0
        if m > kk:
            return 0.0
        if kk == 1:
            return sum(self.p[e] for e in range(self.E) if int(self.rank[e]) >= s)
        return float((self._ranks(kk)[:, kk - m] >= s).double().mean())

    def mean_miss(self, kk: int, s: int) -> float:
        return sum(self.p_ge(kk, s, m) for m in range(1, kk + 1))


@functools.lru_cache(maxsize=256)
def _popularity_draws(popularity: tuple[float, ...]) -> _Draws:
    return _Draws(popularity)


def _normalised(popularity: Sequence[float]) -> list[float]:
    p = [float(x) for x in popularity]
    if any(x < 0 or math.isnan(x) for x in p):
        raise ValueError("popularity must be non-negative")
    total = sum(p)
    if total <= 0:
        return [1.0 / len(p)] * len(p)
    return [x / total for x in p]


def slot_floor(objective: str, top_k: int, total_slots: int, num_layers: int, experts_per_layer: int) -> int:
    """The fewest slots any layer may get: top_k under the "top-k" objective when the budget
    allows it (total_slots >= L * top_k), else 1."""
    _check_objective(objective, top_k)
    k = min(int(top_k), int(experts_per_layer))
    if objective == "top-k" and total_slots >= num_layers * k:
        return k
    return 1


def _solve(costs: list[list[float]], total_slots: int, floor: int = 1) -> list[int]:
    """min sum_l costs[l][s_l - 1] with s_l in [floor, len(costs[l])], sum s_l = total_slots (exact DP)."""
    L = len(costs)
    caps = [len(c) for c in costs]
    if total_slots < L:
        raise ValueError(f"total_slots={total_slots} < number of layers {L}: every layer needs one slot")
    if total_slots >= sum(caps):
        return caps[:]
    if not 1 <= floor <= min(caps) or total_slots < L * floor:
        raise ValueError(f"no plan gives each of {L} layers >= {floor} slots out of {total_slots}")
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
            for s in range(floor, caps[l] + 1):
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
               experts_per_layer: int, num_layers: int | None = None, *, top_k: int = 2,
               objective: str = "top-k") -> list[int]:
    """GPU slots per layer minimising the expected on-demand loads per token (AdapMoE DP).

    prefetch_accuracy, top1_ratio: scalars (same for every layer; then `num_layers` is needed)
    or per-layer sequences; top1_ratio is the drop ratio r (the profile's single_expert_ratio: for top-2
    the single-expert ratio). top_k: experts per token of the model (Mixtral: 2), f's k.
    objective: "top-k" (default: s_l >= top_k where total_slots >= L * top_k, and the cost term
    for layers below top_k) or "paper" (AdapMoE's f, s_l >= 1). Returns s_l with sum =
    total_slots, or all E per layer when total_slots >= L * E.
    """
    E = int(experts_per_layer)
    if E < 1:
        raise ValueError(f"experts_per_layer must be >= 1, got {experts_per_layer}")
    _check_objective(objective, top_k)
    L = _num_layers(prefetch_accuracy, top1_ratio, num_layers)
    acc = _per_layer(prefetch_accuracy, L, "prefetch_accuracy")
    r1 = _per_layer(top1_ratio, L, "top1_ratio")
    k = int(top_k) if objective == "top-k" else None
    costs = [[expected_loads(s, E, acc[l], r1[l], k, int(top_k)) for s in range(1, E + 1)] for l in range(L)]
    total = int(total_slots)
    return _solve(costs, total, slot_floor(objective, top_k, total, L, E))


def plan_slots_popularity(popularity: Sequence[Sequence[float]], prefetch_accuracy: PerLayer,
                          top1_ratio: PerLayer, total_slots: int, *, top_k: int = 2,
                          objective: str = "top-k") -> list[int]:
    """Like `plan_slots`, but with each layer's measured expert popularity ([L][E]; any scale:
    counts or frequencies, normalised per layer) instead of the uniform assumption."""
    L = len(popularity)
    if L == 0:
        raise ValueError("popularity is empty")
    E = len(popularity[0])
    if any(len(row) != E for row in popularity):
        raise ValueError("popularity rows must all have num_experts entries")
    _check_objective(objective, top_k)
    acc = _per_layer(prefetch_accuracy, L, "prefetch_accuracy")
    r1 = _per_layer(top1_ratio, L, "top1_ratio")
    k = int(top_k) if objective == "top-k" else None
    costs = [[popularity_loads(s, popularity[l], acc[l], r1[l], k, int(top_k)) for s in range(1, E + 1)]
             for l in range(L)]
    total = int(total_slots)
    return _solve(costs, total, slot_floor(objective, top_k, total, L, E))


def plan_cost(plan: Sequence[int], prefetch_accuracy: PerLayer, top1_ratio: PerLayer, experts_per_layer: int,
              popularity: Sequence[Sequence[float]] | None = None, *, top_k: int = 2,
              objective: str = "top-k") -> float:
    """Expected on-demand loads per token of a plan (uniform model, or popularity model when given),
    under `objective`'s f ("top-k": with the cost term for layers below top_k; "paper": the paper's)."""
    _check_objective(objective, top_k)
    L = len(plan)
    acc = _per_layer(prefetch_accuracy, L, "prefetch_accuracy")
    r1 = _per_layer(top1_ratio, L, "top1_ratio")
    k = int(top_k) if objective == "top-k" else None
    if popularity is None:
        return sum(expected_loads(s, experts_per_layer, acc[l], r1[l], k, int(top_k)) for l, s in enumerate(plan))
    return sum(popularity_loads(s, popularity[l], acc[l], r1[l], k, int(top_k)) for l, s in enumerate(plan))
