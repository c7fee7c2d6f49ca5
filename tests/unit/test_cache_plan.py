"""plan_slots / plan_slots_popularity: exact optimum against brute force on small cases."""
import itertools
import random

import pytest

from decoder.cache_plan import (expected_loads, plan_cost, plan_slots, plan_slots_popularity,
                                popularity_loads)


def brute(costs_fn, L, E, total):
    best = None
    for plan in itertools.product(range(1, E + 1), repeat=L):
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
        plan = plan_slots(acc, r1, total, E)
        assert len(plan) == L and sum(plan) == total and all(1 <= s <= E for s in plan)
        cost = plan_cost(plan, acc, r1, E)
        opt, _ = brute(lambda p: plan_cost(p, acc, r1, E), L, E, total)
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
    plan = plan_slots([1.0, 0.0], [0.0, 0.0], 9, 8)
    assert plan == [1, 8]


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
        plan = plan_slots_popularity(pop, acc, r1, total)
        assert sum(plan) == total and all(1 <= s <= E for s in plan)
        cost = plan_cost(plan, acc, r1, E, popularity=pop)
        opt, _ = brute(lambda p: plan_cost(p, acc, r1, E, popularity=pop), L, E, total)
        assert cost == pytest.approx(opt, abs=1e-12)


def test_skewed_popularity_needs_fewer_slots():
    # a layer whose traffic goes to two experts gains nothing past s=2; a uniform layer does
    skewed = [100, 100, 1, 1, 1, 1, 1, 1]
    flat = [1] * 8
    assert popularity_loads(2, skewed, 0.0, 0.0) < popularity_loads(2, flat, 0.0, 0.0)
    plan = plan_slots_popularity([skewed, flat], 0.0, 0.0, 10)
    assert plan[0] < plan[1]


def test_ties_give_the_most_even_plan():
    # a = r = 0 makes f linear in s: every plan with the same total is optimal; the even one wins
    assert plan_slots(0.0, 0.0, 10, 8, num_layers=4) == [3, 3, 2, 2] or \
        sorted(plan_slots(0.0, 0.0, 10, 8, num_layers=4)) == [2, 2, 3, 3]
    assert plan_slots(0.0, 0.0, 16, 8, num_layers=8) == [2] * 8
