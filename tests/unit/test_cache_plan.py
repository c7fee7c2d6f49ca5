"""plan_slots / plan_slots_popularity: exact optimum against brute force on small cases, under the
paper's objective and under the top-k one (s_l >= top_k where the budget allows, brute force over
the same constrained space)."""
import itertools
import math
import random

import pytest

from decoder.cache_plan import (expected_loads, plan_cost, plan_slots, plan_slots_popularity,
                                popularity_loads, slot_floor)


def brute(costs_fn, L, E, total, floor=1):
    best = None
    for plan in itertools.product(range(floor, E + 1), repeat=L):
        if sum(plan) != total:
            continue
        c = costs_fn(plan)
        if best is None or c < best[0] - 1e-12:
            best = (c, plan)
    return best


def test_formula_matches_issue_text():
    E, s, a, r = 8, 3, 0.7, 0.4
    P2 = (E - s) * (E - s - 1) / (E * (E - 1))
    P1 = 2 * s * (E - s) / (E * (E - 1))
    f = r * (1 - s / E) * (1 - a) + (1 - r) * (2 * P2 * (1 - a) + P2 * a + P1 * (1 - a))
    assert expected_loads(s, E, a, r) == pytest.approx(f)
    assert expected_loads(E, E, a, r) == 0.0


@pytest.mark.parametrize("seed", range(12))
def test_plan_slots_optimal_vs_brute_force(seed):
    rng = random.Random(seed)
    L, E = rng.randint(1, 4), rng.randint(2, 5)
    acc = [rng.random() for _ in range(L)]
    r1 = [rng.random() for _ in range(L)]
    for total in range(L, L * E + 1):
        plan = plan_slots(acc, r1, total, E, objective="paper")
        assert len(plan) == L and sum(plan) == total and all(1 <= s <= E for s in plan)
        cost = plan_cost(plan, acc, r1, E, objective="paper")
        opt, _ = brute(lambda p: plan_cost(p, acc, r1, E, objective="paper"), L, E, total)
        assert cost == pytest.approx(opt, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_plan_slots_top_k_optimal_vs_brute_force_over_the_constrained_space(seed):
    rng = random.Random(50 + seed)
    L, E = rng.randint(1, 4), rng.randint(2, 5)
    k = rng.randint(1, min(3, E))
    acc = [rng.random() for _ in range(L)]
    r1 = [rng.random() for _ in range(L)]
    for total in range(L, L * E + 1):
        floor = slot_floor("top-k", k, total, L, E)
        assert floor == (k if total >= L * k else 1)
        plan = plan_slots(acc, r1, total, E, top_k=k)
        assert len(plan) == L and sum(plan) == total and all(floor <= s <= E for s in plan)
        cost = plan_cost(plan, acc, r1, E, top_k=k)
        opt, _ = brute(lambda p: plan_cost(p, acc, r1, E, top_k=k), L, E, total, floor)
        assert cost == pytest.approx(opt, abs=1e-12)


def test_plan_slots_scalars_and_bounds():
    assert plan_slots(0.8, 0.3, 40, 8, num_layers=4) == [8, 8, 8, 8]
    assert plan_slots(0.8, 0.3, 32, 8, num_layers=4) == [8, 8, 8, 8]
    assert plan_slots([0.5] * 3, 0.2, 3, 8) == [1, 1, 1]
    with pytest.raises(ValueError):
        plan_slots(0.8, 0.3, 3, 8, num_layers=4)  # fewer slots than layers
    with pytest.raises(ValueError):
        plan_slots(0.8, 0.3, 10, 8)  # scalars without num_layers
    with pytest.raises(ValueError):
        plan_slots([0.5, 1.5], 0.2, 4, 4)
    with pytest.raises(ValueError):
        plan_slots([0.5, 0.5], [0.1], 4, 4)


def test_plan_prefers_layers_with_poor_prefetch():
    # layer 0 is perfectly prefetched (no demand loads at any s): the slots go to layer 1
    plan = plan_slots([1.0, 0.0], [0.0, 0.0], 9, 8, objective="paper")
    assert plan == [1, 8]
    # top-k objective: layer 0 keeps top_k = 2 slots, the rest goes to layer 1
    assert plan_slots([1.0, 0.0], [0.0, 0.0], 9, 8) == [2, 7]
    assert plan_slots([1.0, 0.0], [0.0, 0.0], 9, 8, top_k=1) == [1, 8]


def test_cost_term_below_top_k():
    # one slot cannot hold the prefetched expert beside the resident one: the P1 case loads it
    E, a, r = 8, 0.8, 0.3
    p1 = 2 * 1 * (E - 1) / (E * (E - 1))
    assert expected_loads(1, E, a, r, top_k=2) - expected_loads(1, E, a, r) == pytest.approx((1 - r) * a * p1)
    for s in range(2, E + 1):
        assert expected_loads(s, E, a, r, top_k=2) == expected_loads(s, E, a, r)
    pop = [9, 5, 3, 1, 1, 1, 1, 1]
    assert popularity_loads(1, pop, a, r, top_k=2) > popularity_loads(1, pop, a, r)
    assert popularity_loads(3, pop, a, r, top_k=2) == popularity_loads(3, pop, a, r)
    # no prefetch credit to take back: a = 0 or r = 1 leaves f unchanged
    assert expected_loads(1, E, 0.0, r, top_k=2) == expected_loads(1, E, 0.0, r)
    assert expected_loads(1, E, a, 1.0, top_k=2) == expected_loads(1, E, a, 1.0)


def test_top_k_objective_on_the_measured_demo_profile():
    # benchmarks/results/cache_plan.json's calibration (topk gating, r = 0): the paper's DP gave
    # layer 0 five slots and the others one at a 25% budget; the top-k objective gives every layer two
    acc = [0.0, 0.4949951171875, 0.8311767578125, 0.8740234375]
    assert plan_slots(acc, 0.0, 8, 8, num_layers=4, objective="paper") == [5, 1, 1, 1]
    assert plan_slots(acc, 0.0, 8, 8, num_layers=4) == [2, 2, 2, 2]
    assert plan_slots(acc, 0.0, 12, 8, num_layers=4, objective="paper") == [8, 2, 1, 1]
    assert plan_slots(acc, 0.0, 12, 8, num_layers=4) == [6, 2, 2, 2]
    # below L * top_k the cost term alone decides which layers get a second slot
    assert plan_slots(acc, 0.0, 6, 8, num_layers=4, objective="paper") == [3, 1, 1, 1]
    assert plan_slots(acc, 0.0, 6, 8, num_layers=4) == [1, 1, 2, 2]
    # and it predicts the measured all-one-slot plan (5.28-5.31 loads/token) better than f (4.80)
    assert plan_cost([1] * 4, acc, 0.0, 8, objective="paper") == pytest.approx(4.80, abs=0.01)
    assert plan_cost([1] * 4, acc, 0.0, 8) == pytest.approx(5.35, abs=0.01)


def test_objective_and_top_k_are_checked():
    with pytest.raises(ValueError, match="objective"):
        plan_slots(0.5, 0.1, 8, 8, num_layers=4, objective="lru")
    with pytest.raises(ValueError, match="top_k"):
        plan_slots(0.5, 0.1, 8, 8, num_layers=4, top_k=0)
    with pytest.raises(ValueError, match="objective"):
        plan_slots_popularity([[1] * 8] * 4, 0.5, 0.1, 8, objective="")
    with pytest.raises(ValueError, match="objective"):
        plan_cost([2] * 4, 0.5, 0.1, 8, objective="x")
    # top_k above E: the floor is E where the budget allows it
    assert slot_floor("top-k", 4, 12, 4, 3) == 3 and slot_floor("top-k", 4, 11, 4, 3) == 1
    assert slot_floor("paper", 2, 100, 4, 8) == 1


def test_uniform_popularity_equals_uniform_model():
    E = 6
    for s in range(1, E + 1):
        for a, r in ((0.3, 0.1), (0.9, 0.7)):
            assert popularity_loads(s, [5.0] * E, a, r) == pytest.approx(expected_loads(s, E, a, r))


@pytest.mark.parametrize("seed", range(8))
def test_plan_slots_popularity_optimal_vs_brute_force(seed):
    rng = random.Random(100 + seed)
    L, E = rng.randint(1, 3), rng.randint(2, 5)
    pop = [[rng.random() ** 3 for _ in range(E)] for _ in range(L)]
    acc = [rng.random() for _ in range(L)]
    r1 = rng.random()
    for total in range(L, L * E + 1):
        for objective in ("paper", "top-k"):
            plan = plan_slots_popularity(pop, acc, r1, total, objective=objective)
            floor = slot_floor(objective, 2, total, L, E)
            assert sum(plan) == total and all(floor <= s <= E for s in plan)
            cost = plan_cost(plan, acc, r1, E, popularity=pop, objective=objective)
            opt, _ = brute(lambda p: plan_cost(p, acc, r1, E, popularity=pop, objective=objective), L, E, total,
                           floor)
            assert cost == pytest.approx(opt, abs=1e-12)


def test_skewed_popularity_needs_fewer_slots():
    # a layer whose traffic goes to two experts gains nothing past s=2; a uniform layer does
    skewed = [100, 100, 1, 1, 1, 1, 1, 1]
    flat = [1] * 8
    assert popularity_loads(2, skewed, 0.0, 0.0) < popularity_loads(2, flat, 0.0, 0.0)
    plan = plan_slots_popularity([skewed, flat], 0.0, 0.0, 10)
    assert plan[0] < plan[1] and plan[0] >= 2


def test_ties_give_the_most_even_plan():
    # a = r = 0 makes f linear in s: every plan with the same total is optimal; the even one wins
    assert plan_slots(0.0, 0.0, 10, 8, num_layers=4) == [3, 3, 2, 2] or \
        sorted(plan_slots(0.0, 0.0, 10, 8, num_layers=4)) == [2, 2, 3, 3]
    assert plan_slots(0.0, 0.0, 16, 8, num_layers=8) == [2] * 8


# --- top-k > 2 ---------------------------------------------------------------------------------
def enumerated_loads(s, E, a, r, k, cost_term):
    """f by enumeration: k' = 1 + Binomial(k - 1, 1 - r) experts, every k'-subset of the E
    equally likely, experts 0..s-1 cached; M misses load on demand, one less when the prefetcher
    (probability a) has a slot for it (M >= 1, and M >= k' - s + 1 with the cost term)."""
    f = 0.0
    for j in range(k):
        kk, pk = 1 + j, math.comb(k - 1, j) * (1 - r) ** j * r ** (k - 1 - j)
        subsets = list(itertools.combinations(range(E), kk))
        for sub in subsets:
            M = sum(e >= s for e in sub)
            need = max(1, kk - s + 1) if cost_term else 1
            f += pk * (M - a * (M >= need)) / len(subsets)
    return f


@pytest.mark.parametrize("k", [1, 3, 4, 6])
def test_top_k_f_equals_enumeration(k):
    E = 7
    for s in range(1, E + 1):
        for a, r in ((0.0, 0.0), (0.6, 0.3), (0.9, 0.8), (1.0, 1.0)):
            assert expected_loads(s, E, a, r, experts_per_token=k) == pytest.approx(
                enumerated_loads(s, E, a, r, k, False), abs=1e-12)
            assert expected_loads(s, E, a, r, top_k=k) == pytest.approx(enumerated_loads(s, E, a, r, k, True), abs=1e-12)


def test_top_2_enumeration_is_the_papers_f_with_its_cost_term():
    E = 8
    for s in range(1, E + 1):
        for a, r in ((0.7, 0.4), (0.2, 0.0), (1.0, 0.5)):
            assert enumerated_loads(s, E, a, r, 2, False) == pytest.approx(expected_loads(s, E, a, r), abs=1e-12)
            assert enumerated_loads(s, E, a, r, 2, True) == pytest.approx(expected_loads(s, E, a, r, top_k=2), abs=1e-12)


def test_top_k_popularity_model_uniform_and_skewed():
    E, k = 12, 4
    for s in (1, 3, 4, 8, 12):
        for a, r in ((0.5, 0.2), (0.9, 0.6)):
            # uniform popularity: the sampled draws estimate the exact uniform model
            assert popularity_loads(s, [1.0] * E, a, r, top_k=k) == pytest.approx(
                expected_loads(s, E, a, r, top_k=k), abs=0.03)
    # popularity concentrated on few experts: caching them saves more than under uniform choice
    skew = [2.0 ** -i for i in range(E)]
    assert popularity_loads(4, skew, 0.5, 0.2, top_k=k) < expected_loads(4, E, 0.5, 0.2, top_k=k) - 0.5
    # deterministic: the same estimate every call
    assert popularity_loads(5, skew, 0.5, 0.2, top_k=k) == popularity_loads(5, skew, 0.5, 0.2, top_k=k)


@pytest.mark.parametrize("seed", range(4))
def test_top_k_plans_optimal_vs_brute_force(seed):
    rng = random.Random(90 + seed)
    L, E, k = 2, 6, rng.choice([3, 4])
    acc = [rng.random() for _ in range(L)]
    r1 = [rng.random() for _ in range(L)]
    pop = [[rng.random() + 0.05 for _ in range(E)] for _ in range(L)]
    for total in range(L, L * E + 1):
        floor = slot_floor("top-k", k, total, L, E)
        plan = plan_slots(acc, r1, total, E, top_k=k)
        assert sum(plan) == total and all(floor <= s <= E for s in plan)
        opt, _ = brute(lambda p: plan_cost(p, acc, r1, E, top_k=k), L, E, total, floor)
        assert plan_cost(plan, acc, r1, E, top_k=k) == pytest.approx(opt, abs=1e-12)
        plan = plan_slots_popularity(pop, acc, r1, total, top_k=k)
        opt, _ = brute(lambda p: plan_cost(p, acc, r1, E, pop, top_k=k), L, E, total, floor)
        assert plan_cost(plan, acc, r1, E, pop, top_k=k) == pytest.approx(opt, abs=1e-12)
