"""AdapMoE end to end on the CPU: Engine + ExpertCache + Prefetcher + gating + calibration.

A tiny random Mixtral checkpoint is packed into a real store directory (bf16 and int8). The
invariants: no cache size, host tier, prefetch setting or precision-preserving path changes the
logits of `topk` (bit-identical to the reference StoreExperts provider); `adaptive` with T = 0 is
`topk`; calibration runs and its profile, stored next to the model, drives adaptive and
cost-aware gating; every statistic adds up.
"""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import make_packed_store
from decoder import Engine
from decoder.calibrate import PROFILE_SCHEMA, main as calibrate_main, validate_profile
from decoder.experts.cache import ExpertCache
from decoder.experts.prefetch import Prefetcher
from decoder.gating import AdaptiveGating, CostAwareGating
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)

L, E = 3, 4
IDS = [1, 17, 45, 99, 3, 250, 8, 8, 61, 120, 7, 33, 201, 5, 77, 140]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapmoe")
    return make_packed_store(root, precisions=("bf16", "int8"), group_size=32, hidden=64, ffn=96, layers=L,
                             experts=E, seed=11, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def client(store_dir):
    with StoreClient.open(str(store_dir)) as c:
        yield c


@pytest.fixture(scope="module")
def reference(client):
    out = {}
    for prec in ("bf16", "int8"):
        with Engine.from_store(client, "tiny", precision=prec) as eng:
            out[prec] = (eng.forward_logits(IDS), eng.generate(IDS[:4], max_tokens=6).token_ids)
    return out


def slot_bytes(client, precision):
    with Engine.from_store(client, "tiny", precision=precision, gpu_cache_bytes=None, host_cache_bytes=0) as e:
        return e.provider.slot_bytes, e.provider.host_slot_bytes


CONFIGS = [
    # (gpu slots worth, host slots worth, prefetch, extra cache options)
    (None, 0, True, {}),          # everything fits on the GPU tier
    (L + 2, 0, True, {}),          # one slot per layer (+2 scratch), no host tier
    (L + 2, 3, True, {}),          # one slot per layer, a 3-expert host tier
    (6, 100, False, {}),           # host holds everything, no prefetch
    (7, 2, True, {"plan": "popularity"}),
]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_topk_logits_identical_for_every_cache_config(client, reference, precision):
    ref_logits, ref_tokens = reference[precision]
    slot, hslot = slot_bytes(client, precision)
    for gpu, host, prefetch, opts in CONFIGS:
        with Engine.from_store(client, "tiny", precision=precision, gating="topk",
                               gpu_cache_bytes=None if gpu is None else gpu * slot,
                               host_cache_bytes=host * hslot, prefetch=prefetch, cache_options=opts) as eng:
            assert isinstance(eng.provider, ExpertCache)
            assert any(isinstance(x, Prefetcher) for x in eng.prefetchers) == prefetch
            for _ in range(2):  # cold, then warm cache
                assert torch.equal(eng.forward_logits(IDS), ref_logits), (gpu, host, prefetch)
            assert eng.generate(IDS[:4], max_tokens=6).token_ids == ref_tokens
            s = eng.stats()
            for name, t in s["tiers"].items():
                assert t["hits"] + t["misses"] == t["lookups"], (name, t)
            p = s["provider"]
            assert p["tiers"]["gpu"]["misses"] >= p["demand_loads"] - 0  # every demand load was a miss
            assert p["fetches"] == p["tiers"]["store"]["loads"] and p["bytes_fetched"] > 0
            if prefetch:
                pf = s["prefetch"]
                assert 0 <= pf["precision"] <= 1 and 0 <= pf["recall"] <= 1 and pf["predicted"] > 0
            if gpu is None:
                # the warm pass and generation hit the GPU tier only
                assert p["gpu_resident"] <= L * E and p["tiers"]["store"]["lookups"] <= L * E


def test_adaptive_budget_zero_is_topk(client, reference):
    ref_logits, ref_tokens = reference["bf16"]
    profile = {"sensitivity": [1.0, 5.0, 0.5]}
    with Engine.from_store(client, "tiny", gating="adaptive", budget=0.0, gpu_cache_bytes=None,
                           host_cache_bytes=0, gating_options={"sensitivity": profile["sensitivity"]}) as eng:
        assert isinstance(eng.model.gating, AdaptiveGating)
        assert torch.equal(eng.forward_logits(IDS), ref_logits)
        assert eng.generate(IDS[:4], max_tokens=6).token_ids == ref_tokens
        assert eng.stats()["single_expert_ratio"] == 0.0
        assert eng.stats()["gating_stats"]["experts_per_token"] == 2.0


def test_calibrate_profile_drives_adaptive_and_cost_aware(client, store_dir, tmp_path, reference):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, "
                    "a model kept its experts on a fast disk. Numbers 0 1 2 3 4 5 6 7 8 9 10 42. " * 6)
    out = tmp_path / "profile.json"
    rc = calibrate_main(["--store", str(store_dir), "--model", "tiny", "--text", str(text), "--out", str(out),
                         "--tokens", "300", "--seq-len", "64", "--upload", "--no-progress"])
    assert rc == 0
    prof = validate_profile(json.loads(out.read_text()), L, E)
    assert prof["schema"] == PROFILE_SCHEMA and prof["tokens"] > 200
    assert all(f > 0 for f in prof["sensitivity"])
    assert prof["prefetch_accuracy"][0] == 0.0 and all(0 < a <= 1 for a in prof["prefetch_accuracy"][1:])
    assert all(abs(sum(row) - 1) < 1e-9 for row in prof["popularity"])
    # the store now serves it next to the model
    with StoreClient.open(str(store_dir)) as c2:
        served = c2.manifest("tiny").profile
    assert served["sensitivity"] == prof["sensitivity"]

    # no budget given: the one calibrate stored for a 25% single-expert ratio
    with StoreClient.open(str(store_dir)) as c2:
        with Engine.from_store(c2, "tiny", gating="adaptive") as eng:
            assert eng.model.gating.budget == prof["budget_for_single_ratio"]["0.25"] > 0
            eng.forward_logits(IDS)
            assert eng.stats()["single_expert_ratio"] > 0

    T = prof["budget_for_single_ratio"]["0.5"]
    with StoreClient.open(str(store_dir)) as c2:
        with Engine.from_store(c2, "tiny", gating="adaptive", budget=T) as eng:
            logits = eng.forward_logits(IDS)
            s = eng.stats()
            assert 0 < s["single_expert_ratio"] < 1
            assert s["gating_stats"]["single_expert_ratio"] == pytest.approx(s["single_expert_ratio"])
            assert s["gating_stats"]["est_loss_per_token"] > 0
            assert not torch.equal(logits, reference["bf16"][0])

        slot, hslot = slot_bytes(c2, "bf16")
        # cost-aware with one GPU slot per layer: experts off the GPU get dropped under the budget
        with Engine.from_store(c2, "tiny", gating="cost-aware", budget=T, gpu_cache_bytes=(L + 2) * slot,
                               host_cache_bytes=2 * hslot, gating_options={"loss_bound": 1e9}) as eng:
            g = eng.model.gating
            assert isinstance(g, CostAwareGating) and g.provider is eng.provider
            eng.generate(IDS[:4], max_tokens=8)
            gs = eng.stats()["gating_stats"]
            assert sum(gs["expert2_location"].values()) > 0
            assert gs["single_expert_ratio"] > 0
        # cost-aware with every expert resident on the GPU keeps expert 2: exactly top-k
        with Engine.from_store(c2, "tiny", gating="cost-aware", budget=T, gpu_cache_bytes=None,
                               host_cache_bytes=0, prefetch=False) as eng:
            for l in range(L):
                eng.provider.prefetch(l, list(range(E)))
            assert eng.provider.wait_idle()
            assert torch.equal(eng.forward_logits(IDS), reference["bf16"][0])
            assert eng.stats()["gating_stats"]["single_expert_ratio"] == 0.0


def test_grpc_store_same_logits(store_dir, reference):
    from service_procs import ServiceProcess

    with ServiceProcess.expert_store(store_dir) as server, StoreClient.open(server.address) as c:
        slot, hslot = slot_bytes(c, "bf16")
        with Engine.from_store(c, "tiny", gpu_cache_bytes=(L + 2) * slot, host_cache_bytes=2 * hslot) as eng:
            assert torch.equal(eng.forward_logits(IDS), reference["bf16"][0])
            s = eng.stats()["provider"]
            assert s["tiers"]["store"]["lookups"] > 0 and s["load_cost_measured"]["store"] > 0


def test_miss_precision_int8_for_low_weight_experts(client):
    """HOBBIT-style: with one GPU slot per layer, low-weight experts that miss come as int8.
    One-token forwards (decode-like: weights are per token). Stated accuracy cost on this model:
    max |logit diff| <= 2% of max |logit| (int8, group 32)."""
    slot, _ = slot_bytes(client, "bf16")
    with Engine.from_store(client, "tiny") as ref:
        want = [ref.forward_logits([t]) for t in IDS]
    with Engine.from_store(client, "tiny", gating="uniform", budget=0.0, gpu_cache_bytes=(L + 2) * slot,
                           host_cache_bytes=0, prefetch=False,
                           cache_options={"miss_precision": "int8"},
                           gating_options={"miss_precision_threshold": 0.45}) as eng:
        got = [eng.forward_logits([t]) for t in IDS]
        s = eng.stats()
    low = s["tiers"]["gpu-int8"]
    assert low["lookups"] > 0 and low["hits"] + low["misses"] == low["lookups"]
    diffs = [float((g - w).abs().max()) / float(w.abs().max()) for g, w in zip(got, want)]
    assert max(diffs) <= 0.02 and sum(d > 0 for d in diffs) > 0
    assert s["single_expert_ratio"] == 0.0   # uniform threshold 0 drops nothing: only precision changed
