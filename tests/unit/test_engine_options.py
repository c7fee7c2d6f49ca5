"""AdapMoE flags of `moe-decoder generate` and `moe-decoder serve` reach their components
(--cache-plan -> the expert cache's slot plan, --lookahead -> the prefetcher, --loss-bound ->
cost-aware gating, --miss-precision/--miss-threshold -> cache + gating), "topk" with gating
options stays bit-identical to the model's own top-k, reset_stats resets the gating, and the
teacher-forced decode path equals the full forward."""

from __future__ import annotations

import json

import pytest
import torch
import xxhash

from checkpoints import make_mixtral_checkpoint
from decoder import Engine
from decoder.cli import build_parser as cli_parser
from decoder.cli import engine_options, with_fetch_credentials
from decoder.experts.gpu_slots import plan_quotas
from decoder.gating import make_gating
from decoder.model.transformer import TopKGating
from decoder.cli import build_serve_parser as serve_parser
from expert_store.client import StoreClient
from expert_store.pack import pack_checkpoint
from expert_store.store import ModelStore

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)
L, E = 3, 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-options")
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", hidden=32, ffn=48, layers=L, experts=E, vocab=280, seed=3)
    with ModelStore.open(str(root / "store"), ram_bytes=0) as ms:
        pack_checkpoint(ckpt, ms.tiered, model="t", precisions=("bf16", "int4"), group_size=16, progress=False)
        # a profile whose popularity is far from uniform: the two planners give different quotas
        pop = [[0.85, 0.05, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]]
        profile = {"schema": "adapmoe.profile", "version": 1, "model": "t", "num_layers": L, "num_experts": E,
                   "top_k": 2, "sensitivity": [0.5, 1.0, 2.0], "prefetch_accuracy": [0.0, 0.6, 0.6],
                   "single_expert_ratio": [0.2, 0.2, 0.2], "popularity": pop, "budget": 0.01}
        data = json.dumps(profile).encode()
        ms.put_file("t", "profile", data, xxhash.xxh3_128_hexdigest(data))
    return str(root / "store")


GENERATE = ["generate", "--store", "S", "--model", "t", "--prompt", "x"]
SERVE = ["--store", "S", "--model", "t"]


def parsed(which: str, *flags: str):
    return cli_parser().parse_args(GENERATE + list(flags)) if which == "generate" \
        else serve_parser().parse_args(SERVE + list(flags))


@pytest.mark.parametrize("which", ["generate", "serve"])
def test_flags_become_engine_options(which):
    slot = 4 * 32 * 48 * 3 * 2
    args = parsed(which, "--gating", "cost-aware", "--budget", "0.1", "--gpu-cache-bytes", str(slot),
                  "--cache-plan", "popularity", "--lookahead", "2", "--loss-bound", "0.5",
                  "--miss-precision", "int4", "--miss-threshold", "0.2")
    # --lookahead is a GPU prefetch distance: it turns the GPU prefetch on; eviction defaults to lfru
    assert engine_options(args) == {"cache_options": {"plan": "popularity", "miss_precision": "int4",
                                                      "eviction": "lfru"},
                                    "gating_options": {"loss_bound": 0.5, "miss_precision_threshold": 0.2},
                                    "prefetch_options": {"lookahead": 2, "gpu": True}}
    assert engine_options(parsed(which)) == {"cache_options": {}, "gating_options": {}, "prefetch_options": {}}
    # with a cache, the defaults the H200 rows chose (benchmarks/README "Against lru")
    assert engine_options(parsed(which, "--gpu-cache-bytes", "1M")) == {
        "cache_options": {"eviction": "lfru"}, "gating_options": {}, "prefetch_options": {"gpu": False}}
    assert engine_options(parsed(which, "--gpu-cache-bytes", "1M", "--eviction", "lru", "--gpu-prefetch")) == {
        "cache_options": {"eviction": "lru"}, "gating_options": {}, "prefetch_options": {"gpu": True}}
    assert engine_options(parsed(which, "--gpu-cache-bytes", "1M", "--no-prefetch")) == {
        "cache_options": {"eviction": "lfru"}, "gating_options": {}, "prefetch_options": {}}
    # --fetch-workers: the host tier's receiving processes, with the decoder's store credentials
    fetch = engine_options(parsed(which, "--gpu-cache-bytes", "1M", "--host-cache-bytes", "4M", "--fetch-workers", "3"))
    assert fetch["cache_options"] == {"eviction": "lfru", "fetch_workers": 3}
    assert with_fetch_credentials(fetch, token="t", tls_ca=None, deadline_s=5.0)["cache_options"]["fetch_options"] \
        == {"token": "t", "deadline_s": 5.0}
    striped = engine_options(parsed(which, "--host-cache-bytes", "4M", "--fetch-workers", "3",
                                    "--fetch-demand-parts", "3", "--fetch-fill-parts", "6"))
    assert striped["cache_options"]["fetch_demand_parts"] == 3 and striped["cache_options"]["fetch_fill_parts"] == 6
    plain = engine_options(parsed(which, "--host-cache-bytes", "4M", "--fetch-workers", "0"))
    assert "fetch_workers" not in plain["cache_options"]
    assert "fetch_options" not in with_fetch_credentials(plain, token="t")["cache_options"]
    shm = (cli_parser().parse_args(["generate", "--store", "local-shm:///dev/shm/a", "--model", "t", "--prompt", "x"]
                                   + ["--host-cache-bytes", "4M", "--fetch-workers", "2"]) if which == "generate"
           else serve_parser().parse_args(["--store", "local-shm:///dev/shm/a", "--model", "t",
                                           "--host-cache-bytes", "4M", "--fetch-workers", "2"]))
    with pytest.raises(ValueError, match="local-shm:// store is read in place"):
        engine_options(shm)
    for bad, msg in [(["--fetch-workers", "2"], "give --host-cache-bytes"),
                     (["--fetch-workers", "2", "--gpu-cache-bytes", "1M"], "give --host-cache-bytes"),
                     (["--fetch-workers", "-1", "--host-cache-bytes", "4M"], "must be >= 0"),
                     (["--fetch-demand-parts", "4", "--host-cache-bytes", "4M"], "give --fetch-workers"),
                     (["--fetch-fill-parts", "2", "--host-cache-bytes", "4M"], "give --fetch-workers"),
                     (["--fetch-demand-parts", "0", "--host-cache-bytes", "4M", "--fetch-workers", "2"],
                      "--fetch-demand-parts must be >= 1"),
                     (["--cache-plan", "uniform"], "--cache-plan needs the expert cache"),
                     (["--lookahead", "2"], "--lookahead needs the expert cache"),
                     (["--lookahead", "0", "--gpu-cache-bytes", "1M"], "--lookahead must be >= 1"),
                     (["--lookahead", "1", "--gpu-cache-bytes", "1M", "--no-prefetch"], "contradict"),
                     (["--gpu-prefetch", "--gpu-cache-bytes", "1M", "--no-prefetch"], "contradict"),
                     (["--gpu-prefetch"], "--gpu-prefetch needs the expert cache"),
                     (["--eviction", "lru"], "--eviction needs the expert cache"),
                     (["--loss-bound", "1"], "cost-aware"),
                     (["--miss-threshold", "0.2"], "goes with --miss-precision")]:
        with pytest.raises(ValueError, match=msg):
            engine_options(parsed(which, *bad))
    with pytest.raises(SystemExit):
        parsed(which, "--cache-plan", "lru")


@pytest.mark.parametrize("which", ["generate", "serve"])
def test_each_flag_reaches_its_component(store, which):
    with StoreClient.open(store) as client:
        man = client.manifest("t")
        with Engine.from_store(client, "t", prefetch=False, gpu_cache_bytes=1 << 30) as probe:
            slot = probe.provider.slot_bytes
        # 11 slots = 2 scratch + 9 for 3 layers x 4 experts: the plan decides which layers get more
        # than top_k = 2 (every layer keeps 2: decoder/cache_plan.py, objective "top-k")
        budget = 11 * slot
        cfg_like = type("C", (), {"num_hidden_layers": L, "num_local_experts": E})
        quotas = {p: plan_quotas(cfg_like, slot, budget, 2, p, man.profile) for p in ("uniform", "popularity")}
        assert quotas["uniform"] != quotas["popularity"], quotas
        for plan in ("uniform", "popularity"):
            args = parsed(which, "--gating", "cost-aware", "--budget", "0.1", "--gpu-cache-bytes", str(budget),
                          "--host-cache-bytes", str(4 * slot), "--cache-plan", plan, "--lookahead", "2",
                          "--loss-bound", "0.25", "--miss-precision", "int4", "--miss-threshold", "0.2")
            with Engine.from_store(client, "t", gating=args.gating, budget=args.budget,
                                   gpu_cache_bytes=args.gpu_cache_bytes, host_cache_bytes=args.host_cache_bytes,
                                   **engine_options(args)) as eng:
                assert eng.provider.plan == plan and eng.provider.quota == quotas[plan]
                assert eng.provider.miss_precision == "int4"
                g = eng.model.gating
                assert g.name == "cost-aware" and g.loss_bound == 0.25 and g.budget == 0.1
                assert g.miss_threshold == 0.2 and g.miss_provider is eng.provider
                (pf,) = eng.prefetchers
                assert pf.fixed_k == 2
                eng.generate([1, 5, 9], max_tokens=3)
                assert max(pf.stats()["lookahead_hist"]) == 2
        # without --lookahead the prefetcher adapts
        args = parsed(which, "--gpu-cache-bytes", str(budget))
        with Engine.from_store(client, "t", gpu_cache_bytes=args.gpu_cache_bytes, **engine_options(args)) as eng:
            assert eng.prefetchers[0].fixed_k is None and eng.provider.plan == "uniform"
            assert eng.provider.policy.kind == "lfru" and eng.prefetchers[0].gpu is False


def test_topk_with_options_is_bit_identical_and_reset_stats(store):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, E, generator=g) * 3
    cfg = type("C", (), {"num_experts_per_tok": 2, "num_hidden_layers": L})
    counting = make_gating("topk", config=cfg)
    for layer in range(L):
        w1, i1 = counting.route(layer, logits)
        w2, i2 = TopKGating(2).route(layer, logits)
        assert torch.equal(w1, w2) and torch.equal(i1, i2)
    ids = [1, 7, 30, 2, 99, 150, 8, 4]
    with StoreClient.open(store) as client:
        with Engine.from_store(client, "t", gating="topk") as plain:
            ref = plain.forward_logits(ids)
            assert isinstance(plain.model.gating, TopKGating)
        # "topk" with options goes through decoder.gating (counting, with the miss-precision hint)
        with Engine.from_store(client, "t", gating="topk", gpu_cache_bytes=1 << 30,
                               cache_options={"miss_precision": "int4"},
                               gating_options={"miss_precision_threshold": 0.0}) as eng:
            assert eng.model.gating.name == "topk" and eng.model.gating.miss_threshold == 0.0
            assert torch.equal(eng.forward_logits(ids), ref)   # threshold 0: nothing at low precision
            assert eng.model.gating.stats()["decisions"] == L * len(ids)
            eng.reset_stats()
            assert eng.model.gating.stats()["decisions"] == 0
        # the teacher-forced decode path gives the full forward's logits, one token at a time
        with Engine.from_store(client, "t", gating="adaptive", budget=0.05) as eng:
            full = eng.forward_logits(ids)
            eng.reset_stats()
            dec = eng.decode_logits(ids)
            assert dec.shape == full.shape
            torch.testing.assert_close(dec, full, rtol=1e-4, atol=1e-4)
            st = eng.stats()
            assert st["routing"]["decode"]["decisions"] == L * len(ids)
            assert st["gating_stats"]["decisions"] == L * len(ids)
            assert st["single_expert_ratio"] == pytest.approx(st["gating_stats"]["single_expert_ratio"])
