"""benchmarks/cache_plan.py's core on a tiny random Mixtral (seconds): every row's GPU hits and
misses add up to its lookups, its layer quotas sum to the budget and are the planner's own plan,
and the JSON/PNG/table are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import make_mixtral_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import accuracy, cache_plan  # noqa: E402

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)


def test_equal_quotas():
    assert cache_plan.equal_quotas(8, 4, 8) == [2, 2, 2, 2]
    assert cache_plan.equal_quotas(10, 4, 8) == [3, 3, 2, 2]
    assert cache_plan.equal_quotas(40, 4, 8) == [8, 8, 8, 8]
    with pytest.raises(ValueError):
        cache_plan.equal_quotas(3, 4, 8)


def test_cache_plan_rows_on_a_tiny_checkpoint(tmp_path):
    ckpt, cfg = make_mixtral_checkpoint(tmp_path / "ckpt", hidden=32, ffn=48, layers=2, experts=8, vocab=320, seed=5)
    ev, cal, _ = accuracy.heldout_split(heldout_mb=0.05)
    s = cache_plan.Settings(eval_tokens=16, calib_tokens=128, seq_len=16, budgets=(0.25, 0.5))
    work = tmp_path / "work"
    work.mkdir()
    result = cache_plan.run_cache_plan(ckpt, work, s, ev, cal, progress=False, log=lambda m: None)
    rows = result["rows"]
    L, E, K = cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    assert len(rows) == len(cache_plan.GATINGS) * 2 * len(cache_plan.PLANNERS)
    assert {r["gpu_slots_total"] for r in rows} == {4, 8}
    profile = {**result["calibration"], "num_layers": L, "num_experts": E}
    for r in rows:
        assert r["tokens"] == 16 and r["steps"] == 16
        assert r["gpu_hits"] + r["gpu_misses"] == r["gpu_lookups"] > 0
        assert sum(r["slots"]) == r["gpu_slots_total"] and all(1 <= x <= E for x in r["slots"])
        prof = cache_plan.planner_profile(profile, r["gating"], L)
        assert r["slots"] == cache_plan.expected_plan(r["planner"], prof, r["gpu_slots_total"], L, E)
        if r["planner"] in ("uniform", "popularity"):
            # the top-k objective: no layer below top_k once the budget allows (4 slots = 2 layers x 2)
            assert min(r["slots"]) >= K, r
        assert r["scratch_loads_per_token"] == pytest.approx(r["scratch_loads"] / r["tokens"])
        assert r["predicted_paper_uniform_model"] >= 0 and r["predicted_paper_popularity_model"] >= 0
        assert r["on_demand_loads_per_token"] == pytest.approx(r["gpu_misses"] / r["tokens"])
        assert 0 <= r["prefetch_useful"] <= r["prefetch_loads"]
        assert r["predicted_uniform_model"] >= 0 and r["predicted_popularity_model"] >= 0
        if r["gating"] == "topk":
            assert r["gpu_lookups"] == r["tokens"] * L * K and r["planner_r"] == [0.0] * L
        else:
            assert r["gpu_lookups"] <= r["tokens"] * L * K
    assert {p["gating"] for p in result["summary"]["per_point"]} == set(cache_plan.GATINGS)
    for pt in result["summary"]["per_point"]:
        assert set(pt["vs_equal_pct"]) == set(cache_plan.PLANNERS) - {"equal"}
        eq = pt["loads_per_token"]["equal"]
        for p, v in pt["vs_equal_pct"].items():
            assert v == pytest.approx(100.0 * (pt["loads_per_token"][p] / eq - 1.0))
    with pytest.raises(ValueError, match="unknown planners"):
        cache_plan.run_cache_plan(ckpt, work, cache_plan.Settings(planners=("lru",)), ev, cal, progress=False)

    js, png = cache_plan.write_outputs(result, tmp_path / "results")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads(js.read_text())["rows"]) == len(rows)
    assert cache_plan.markdown(result).count("\n") == len(rows) + 1
    assert "wins where plans differ" in cache_plan.verdict(result)


def test_lever_planners_carry_their_options(tmp_path):
    """"uniform+lfru+admit+skip": the uniform plan with lfru eviction, prefetch admission and
    skipped predictions; every row counts the GPU loads (demand + prefetch) per token."""
    ckpt, cfg = make_mixtral_checkpoint(tmp_path / "ckpt", hidden=32, ffn=48, layers=2, experts=8, vocab=320, seed=5)
    ev, cal, _ = accuracy.heldout_split(heldout_mb=0.05)
    planners = ("uniform", "uniform+lfru+admit+skip", "equal+noprefetch")
    s = cache_plan.Settings(eval_tokens=16, calib_tokens=128, seq_len=16, budgets=(0.25,), planners=planners,
                            gatings=("adaptive",))
    work = tmp_path / "work"
    work.mkdir()
    rows = cache_plan.run_cache_plan(ckpt, work, s, ev, cal, progress=False, log=lambda m: None)["rows"]
    assert [r["planner"] for r in rows] == list(planners)
    assert rows[0]["slots"] == rows[1]["slots"]
    assert rows[2]["prefetch_loads"] == 0 and rows[0]["prefetch_loads"] > 0   # noprefetch: no prefetcher
    for r in rows:
        assert r["gpu_loads_per_token"] == pytest.approx((r["demand_loads"] + r["prefetch_loads"]) / r["tokens"])
        assert r["prefetch_refused"] >= 0
    assert cache_plan.cache_options("uniform+lfru+admit", {}, [])["eviction"] == "lfru"
    assert cache_plan.cache_options("equal+admit", {}, [2, 2])["admission"] is True
    with pytest.raises(ValueError, match="unknown planner 'uniform\\+fifo'"):
        cache_plan.split_planner("uniform+fifo")
