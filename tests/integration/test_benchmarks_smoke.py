"""Plumbing of benchmarks/decode.py and benchmarks/transfer.py on the CPU at toy sizes.

Real code paths (the store's packer, Engine.from_store, the AdapMoE cache, calibration, the
on-demand provider, the transfer measurement through ExpertCache); timings are meaningless
here, only that each row runs and reports what the GPU run reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import decode, transfer  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def test_decode_rows_on_a_random_mixtral(tmp_path):
    torch.set_num_threads(1)
    args = decode.parse_args(["--tiny", "--device", "cpu", "--models", "B", "--budgets", "0.5",
                              "--modes", "resident,ondemand,lru,adapmoe,adapmoe-paper,adapmoe-cost,adapmoe-lfru-nopf-cost",
                              "--profile-rows", "lru",
                              "--calib-tokens", "64", "--prompts", "1"])
    args.new_tokens = 3
    device = torch.device("cpu")
    prep = decode.prepare_model_b(tmp_path, device, args)
    rows: list[dict] = []
    decode.run_model(prep, device, args, tmp_path, pinned_gbps=5.0, rows=rows)
    decode.add_ratios(rows)
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"resident", "ondemand", "lru", "adapmoe", "adapmoe-paper", "adapmoe-cost",
                            "adapmoe-lfru-nopf-cost"}
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["generated_tokens"] == 3
    # topk rows decode the same tokens whatever the cache does
    assert by_mode["resident"]["outputs_head"] == by_mode["lru"]["outputs_head"] == by_mode["ondemand"]["outputs_head"]
    assert by_mode["resident"]["gpu_hit_rate"] == 1.0
    assert by_mode["ondemand"]["gpu_hit_rate"] == 0.0
    assert by_mode["lru"]["vs_lru"] == 1.0
    assert by_mode["lru"]["torch_profile"]
    # the paper's configuration prefetches into GPU slots and evicts by recency; adapmoe (the
    # levers that paid on the H200) neither prefetches into them nor evicts by recency alone
    assert by_mode["adapmoe-paper"]["prefetch_precision"] is not None
    assert by_mode["adapmoe-paper"]["eviction"] == "lru" and by_mode["lru"]["eviction"] == "lru"
    assert by_mode["adapmoe"]["prefetch_precision"] is None and by_mode["adapmoe"]["eviction"] == "lfru"
    assert by_mode["adapmoe"]["experts_per_token"] < 2.0
    # adapmoe's levers with cost-aware gating: its gating, adapmoe's eviction and no GPU prefetch
    cost = by_mode["adapmoe-lfru-nopf-cost"]
    assert cost["gating"] == "cost-aware" and by_mode["adapmoe"]["gating"] == "adaptive"
    assert cost["eviction"] == "lfru" and cost["prefetch_precision"] is None
    table = decode.markdown(rows, decode.check_targets(rows))
    assert "| B | 50% | adapmoe |" in table


def test_adapmoe_budget_for_a_drop_ratio():
    profile = {"budget": 2.0, "budget_curve": [[0.05, 0.5], [0.5, 3.0]], "budget_for_single_ratio": {"0.1": 1.0}}
    assert decode.adapmoe_budget(profile, None) == 2.0
    assert decode.adapmoe_budget(profile, 0.5) == 3.0 and decode.adapmoe_budget(profile, 0.1) == 1.0
    with pytest.raises(ValueError, match="adapmoe-ratio"):
        decode.adapmoe_budget(profile, 0.33)


def test_transfer_h2d_through_the_expert_cache(tmp_path):
    decode.pack_random_mixtral(tmp_path, tmp_path / "store", transfer.MODEL, hidden=64, ffn=128, layers=1, heads=4,
                               vocab=64, precision="int4")
    out = transfer.cache_h2d(tmp_path / "store", torch.device("cpu"), passes=1)
    p = out["passes"][0]
    assert p["experts"] == 8 and p["gpu_loads"] == 8 and p["host_hits"] == 8
    assert out["wall_gbps"] > 0


def test_decode_ppl_cell_compares_on_the_same_windows():
    # the accelerate row scores fewer held-out windows: its cell also shows resident's
    # perplexity over exactly those windows (equal windows: geometric mean of theirs)
    rows = [{"model": "A", "mode": "resident", "heldout_perplexity": 20.0, "heldout_perplexity_per_window": [10.0, 40.0]},
            {"model": "A", "mode": "accelerate", "heldout_perplexity": 10.5, "heldout_perplexity_per_window": [10.5]},
            {"model": "A", "mode": "lru", "heldout_perplexity": 20.0, "heldout_perplexity_per_window": [10.0, 40.0]}]
    assert decode.ppl_cell(rows[1], rows) == "10.500 (1 window; resident there: 10.000)"
    assert decode.ppl_cell(rows[2], rows) == "20.000"
    two = dict(rows[1], heldout_perplexity_per_window=[10.0, 40.0, 5.0][:2])
    rows3 = [dict(rows[0], heldout_perplexity_per_window=[10.0, 40.0, 90.0]), two]
    assert decode.ppl_cell(two, rows3).endswith("(2 windows; resident there: 20.000)")


def test_decode_rows_sample_with_the_same_seeds(tmp_path):
    # --temperature: every row samples prompt i with seed --seed + i; two top-k rows compute the
    # same logits, so they sample the same tokens (and those differ from greedy)
    torch.set_num_threads(1)
    rows_by_t = {}
    for t in (0.0, 1.5):
        args = decode.parse_args(["--tiny", "--device", "cpu", "--models", "B", "--budgets", "0.5",
                                  "--modes", "resident,lru", "--profile-rows", "", "--calib-tokens", "64",
                                  "--prompts", "2", "--temperature", str(t), "--seed", "7", "--no-warmup-row"])
        args.new_tokens = 6
        device = torch.device("cpu")
        prep = decode.prepare_model_b(tmp_path / str(t), device, args)
        rows: list[dict] = []
        decode.run_model(prep, device, args, tmp_path, pinned_gbps=5.0, rows=rows)
        assert all("error" not in r for r in rows), [r.get("error") for r in rows]
        rows_by_t[t] = {r["mode"]: r["outputs_head"] for r in rows}
    sampled, greedy = rows_by_t[1.5], rows_by_t[0.0]
    assert sampled["resident"] == sampled["lru"]
    assert greedy["resident"] == greedy["lru"]
    assert sampled["resident"] != greedy["resident"]


def test_step_parity_compares_the_step_with_the_eager_forward():
    """benchmarks/step_parity.py on the CPU (the step's torch path): every layer of the rows
    asked for, and the logit difference of every row."""
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_parity.py"), "--device", "cpu",
                        "--tokens", "3", "--rows", "1", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert [l.split(":")[0] for l in lines[:-1]] == [f"token 1 layer {l}" for l in range(4)], r.stdout
    diffs = [float(x) for x in lines[-1].split("[")[1].rstrip("]").split(",")]
    assert len(diffs) == 3 and max(diffs) < 1e-3, lines[-1]     # fp32: the same numbers up to summation order
