"""The GPU-driven decode step (decoder/step.py) and the fused MoE over a slot table
(decoder/kernels/fused_moe.py), run eagerly on the CPU as CI runs them.

The step must give the eager Transformer's logits (fp32) for resident experts (one "whole"
step, device counters) and through the AdapMoE cache with evictions between steps (one read
per layer, the slot table rewritten every layer), with adaptive gating and the prefetcher
giving the same decisions and counts as on the eager path. The Triton kernels themselves run
under Triton's interpreter in tests/integration/test_triton_interpreter.py (a child process).
"""

from __future__ import annotations

import threading

import pytest
import torch

from checkpoints import make_packed_store
from decoder.engine import Engine
from decoder.kernels.fused_moe import ExpertBank, moe_torch
from decoder.model.config import ModelConfig
from decoder.model.transformer import Transformer
from decoder.routing import TopKGating
from decoder.step import DecodeStep, unsupported_reason
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(240)
torch.set_num_threads(1)
L, E = 3, 4


def tiny_model(seed: int = 0, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=64, **kw)
    m = Transformer(cfg)
    m.init_weights(std=0.3, seed=seed)
    return m.eval()


# --- fused MoE: torch path through a pool bank ----------------------------------------------
def test_moe_torch_through_a_pool_bank_equals_per_expert_compute():
    g = torch.Generator().manual_seed(3)
    Fd, H, slots = 24, 16, 5
    w = {n: torch.randn(slots, *shape, generator=g) for n, shape in (("w1", (Fd, H)), ("w3", (Fd, H)), ("w2", (H, Fd)))}
    # a uint8 pool whose slots hold w1, w3, w2 back to back with padding (like cache slots)
    item, pad = 4, 64
    offs = {"w1": 0, "w3": Fd * H * item + pad, "w2": 2 * (Fd * H * item + pad)}
    slot_bytes = offs["w2"] + H * Fd * item + pad
    pool = torch.zeros(slots, slot_bytes, dtype=torch.uint8)
    for n, off in offs.items():
        for s in range(slots):
            pool[s, off:off + w[n][s].numel() * item] = w[n][s].reshape(-1).view(torch.uint8)
    bank = ExpertBank.pool(pool, torch.float32, offs, Fd, H)
    slot_of = torch.tensor([3, -1, 0, 4], dtype=torch.int32)       # experts 0, 2, 3 in slots 3, 0, 4
    x = torch.randn(3, H, generator=g)
    ids = torch.tensor([[0, 2], [3, -1], [2, 0]])
    wts = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.6, 0.4]])
    out = moe_torch(x, wts, ids, slot_of, bank)

    def expert(s, v):
        return (torch.nn.functional.silu(v @ w["w1"][s].T) * (v @ w["w3"][s].T)) @ w["w2"][s].T
    ref = torch.stack([0.7 * expert(3, x[0]) + 0.3 * expert(0, x[0]), expert(4, x[1]),
                       0.6 * expert(0, x[2]) + 0.4 * expert(3, x[2])])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no GPU slot"):
        moe_torch(x, wts, torch.tensor([[1, 0], [0, -1], [0, 2]]), slot_of, bank)


def test_tuned_tiles_are_picked_by_precision_shape_and_token_count():
    from decoder.kernels.fused_moe import KernelConfig, config_file, pick_config

    w = torch.zeros(2, 8, 4)
    bank = ExpertBank.stacked(w, w.clone(), torch.zeros(2, 4, 8))           # bf16-like: bits 16, H 4, F 8
    tuned = {"bits=16,hidden=4,ffn=8": {"1": {"block_f": 32}, "8": {"block_f": 128, "down_warps": 8}},
             "bits=4,hidden=4,ffn=8": {"1": {"block_f": 16}}}
    assert pick_config(tuned, bank, 1) == KernelConfig(block_f=32)
    assert pick_config(tuned, bank, 2) == KernelConfig(block_f=128, down_warps=8)    # next tuned count up
    assert pick_config(tuned, bank, 16) == KernelConfig(block_f=128, down_warps=8)   # past the largest
    assert pick_config({}, bank, 1) == KernelConfig()
    assert config_file("NVIDIA H200").name == "NVIDIA_H200.json"


# --- the step on resident experts -------------------------------------------------------------
def test_whole_step_gives_the_eager_logits_and_counts():
    m = tiny_model()
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(1))
    eager = Engine.from_model(m, decode_step="eager")
    ref = eager.decode_logits(ids)
    ref_stats = eager.stats()
    eager.close()
    m2 = tiny_model()
    step = Engine.from_model(m2, decode_step="step")
    out = step.decode_logits(ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    st = step.stats()
    assert step._step.whole_steps == 12 and step._step.layered_steps == 0 and step._step.reads == 0
    assert st["routing"]["decode"] == ref_stats["routing"]["decode"]
    assert st["expert_loads"] == ref_stats["expert_loads"]
    assert st["provider"]["gets"] == ref_stats["provider"]["gets"]     # one lookup per used expert


FAMILIES = {
    "qwen3_moe": dict(family="qwen3_moe", qk_norm="head", o_bias=True),
    "olmoe": dict(family="olmoe", qk_norm="full", clip_qkv=1.5, norm_topk_prob=False),
    "qwen2_moe": dict(family="qwen2_moe", qkv_bias=True, norm_topk_prob=False, shared_expert_intermediate_size=20),
}


def family_model(family: str, seed: int = 0) -> Transformer:
    """A tiny model of `family` whose biases and norm weights are drawn too (HF's init leaves
    them 0 and 1, which would hide a step that skips them)."""
    m = tiny_model(seed=seed, **FAMILIES[family])
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters()):
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_blocks_through_the_step_give_the_eager_logits(family):
    """Qwen3-MoE's q/k head norms, OLMoE's full q/k norms, clamps and unrenormalised weights,
    Qwen2-MoE's q/k/v biases and gated shared expert: the step computes them as the eager
    path does (fp32: the same logits and tokens)."""
    ids = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(2))
    eager = Engine.from_model(family_model(family), decode_step="eager")
    step = Engine.from_model(family_model(family), decode_step="step")
    assert unsupported_reason(step.model) is None
    torch.testing.assert_close(step.decode_logits(ids), eager.decode_logits(ids), rtol=1e-4, atol=1e-4)
    assert step._step is not None and step._step.whole_steps == 10
    prompt = ids[:4].tolist()
    a = Engine.from_model(family_model(family, seed=5), decode_step="eager").generate(prompt, max_tokens=12,
                                                                                      stop_at_eos=False)
    b = Engine.from_model(family_model(family, seed=5), decode_step="step").generate(prompt, max_tokens=12,
                                                                                     stop_at_eos=False)
    assert a.token_ids == b.token_ids


def test_families_the_step_does_not_implement_keep_the_eager_path():
    for kw, why in ((dict(family="gpt_oss", attention_sinks=True), "sinks"),
                    (dict(family="qwen3_moe", dense_layers=(1,), dense_intermediate_size=16), "dense layers"),
                    (dict(family="olmoe", norm_topk_prob=False), None)):
        m = tiny_model(**kw)
        reason = unsupported_reason(m)
        assert (reason is None) if why is None else (why in reason), (kw, reason)
    m = tiny_model(family="olmoe", norm_topk_prob=False)
    m.gating = type("HostDecides", (TopKGating,), {"decides_on_host": True})(2)
    assert "unrenormalised" in unsupported_reason(m)


def test_generate_through_the_step_equals_eager_generation():
    ids = list(range(3, 10))
    a = Engine.from_model(tiny_model(seed=4), decode_step="eager").generate(ids, max_tokens=20, stop_at_eos=False)
    b = Engine.from_model(tiny_model(seed=4), decode_step="step").generate(ids, max_tokens=20, stop_at_eos=False)
    assert a.token_ids == b.token_ids


def test_sliding_window_and_batch_rows_with_padding():
    m = tiny_model(seed=2, sliding_window=4)
    m.setup_caches(2, 16)
    g = torch.Generator().manual_seed(5)
    seqs = torch.randint(0, 300, (2, 9), generator=g)
    with torch.inference_mode():
        ref = [m(seqs[b:b + 1], torch.arange(9))[0] for b in range(2)]
    m.clear_caches()
    m.setup_caches(2, 16)
    step = DecodeStep(m, batch=2)
    for i in range(9):
        # row 1 starts one step late: at step 0 it is padding (inactive)
        pos = torch.tensor([i, max(0, i - 1)])
        tok = torch.stack([seqs[0, i], seqs[1, max(0, i - 1)]])
        active = torch.tensor([True, i > 0])
        logits = step.run(tok, pos, active)
        torch.testing.assert_close(logits[0], ref[0][i], rtol=1e-4, atol=1e-4)
        if i > 0:
            torch.testing.assert_close(logits[1], ref[1][i - 1], rtol=1e-4, atol=1e-4)


def test_unsupported_models_keep_the_eager_path():
    from decoder.model.transformer import Gating, MoEObserver

    class DeviceObserver(MoEObserver):        # wants the block's device tensors every layer
        def on_routing(self, layer, router_logits, weights, idx):
            pass

    class OddGating(Gating):                   # unknown: may read anything
        def route(self, layer, router_logits):
            return TopKGating(2).route(layer, router_logits)

    from decoder.model.transformer import TopKGating

    m = tiny_model()
    m.setup_caches(1, 16)
    assert unsupported_reason(m) is None
    m.add_observer(DeviceObserver())
    assert "needs the MoE block's device tensors" in unsupported_reason(m)
    with pytest.raises(ValueError, match="cannot run this model"):
        DecodeStep(m)
    e = Engine.from_model(m, decode_step="auto")
    assert e.generate([3, 4], max_tokens=3, stop_at_eos=False).completion_tokens == 3 and e._step is None
    with pytest.raises(ValueError, match="decode_step='step'"):
        Engine.from_model(m, decode_step="step").generate([3, 4], max_tokens=2)
    m2 = tiny_model()
    m2.gating = OddGating()
    assert "not known to decide on the device" in unsupported_reason(m2)


# --- through the AdapMoE cache ------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_packed_store(tmp_path_factory.mktemp("step"), precisions=("bf16", "int8", "int4"), group_size=32,
                             hidden=64, ffn=96, layers=L, experts=E, seed=11)


def cache_engine(store_dir, decode_step, gpu_slots=(2, 1, 2), dense=True, cache_options=None, **kw):
    client = StoreClient.open(str(store_dir))
    eng = Engine.from_store(client, "tiny", precision="int8", decode_step=decode_step,
                            gpu_cache_bytes=0, host_cache_bytes=1 << 20,
                            cache_options={"gpu_slots": list(gpu_slots), "dense_slots": dense, **(cache_options or {})},
                            **kw)
    eng._owns_client = True
    return eng


@pytest.mark.parametrize("gating,dense", [("topk", True), ("adaptive", True), ("topk", False)])
def test_layered_step_through_an_evicting_cache(store_dir, gating, dense):
    """Quotas of 2/1/2 of 4 experts: nearly every step evicts and reloads, so the slot rows the
    kernels read change under the step between replays; logits, routing, gating and cache
    counts must equal the eager path's, with one host read per MoE layer. dense=False: the
    slots hold the raw int8 payloads, read in place through the bank's scales."""
    ids = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(2))
    kw = {"gating": gating, "prefetch": False}   # the prefetcher's plan depends on measured times
    if gating == "adaptive":
        kw.update(budget=0.2, gating_options={"sensitivity": [1.0, 0.5, 2.0]})
    runs = {}
    for mode in ("eager", "step"):
        with cache_engine(store_dir, mode, dense=dense, **kw) as eng:
            assert eng.provider.expert_bank(0).bits == (16 if dense else 8)
            logits = eng.decode_logits(ids)
            runs[mode] = (logits, eng.stats(), eng._step)
    (a, sa, _), (b, sb, step) = runs["eager"], runs["step"]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert step.layered_steps == 24 and step.whole_steps == 0 and step.reads == 24 * L
    assert sb["routing"] == sa["routing"] and sb["expert_loads"] == sa["expert_loads"]
    for key in ("hits", "misses", "loads"):
        assert sb["tiers"]["gpu"][key] == sa["tiers"]["gpu"][key], key
    assert sa["provider"]["evictions_gpu"] > 10
    if gating == "adaptive":
        ga, gb = sa["gating_stats"], sb["gating_stats"]
        assert ga["single_expert_ratio"] > 0.05
        assert gb["decisions"] == ga["decisions"] and gb["single_expert_ratio"] == ga["single_expert_ratio"]
        assert gb["est_loss_per_token"] == pytest.approx(ga["est_loss_per_token"], rel=1e-4)


def fixed_costs(loc):
    """Load costs fixed for a test (the cache measures them; cost-aware decisions follow them)."""
    return {"gpu": 0.0, "host": 1e-3, "store": 4e-3}[loc]


def test_cost_aware_gating_decides_from_the_steps_read(store_dir):
    """Cost-aware gating decides on the host from the step's one read per layer (expert
    locations live there) and writes the changed routing back for the MoE graph: the same
    decisions, locations and logits as the eager path."""
    ids = torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(6))
    runs = {}
    for mode in ("eager", "step"):
        with cache_engine(store_dir, mode, gating="cost-aware", budget=0.1, prefetch=False,
                          gating_options={"sensitivity": [1.0, 0.5, 2.0]}) as eng:
            eng.provider.load_cost = fixed_costs
            logits = eng.decode_logits(ids)
            runs[mode] = (logits, eng.stats(), eng._step)
    (a, sa, _), (b, sb, st) = runs["eager"], runs["step"]
    assert st.layered_steps == 20 and st.reads == 20 * L
    ga, gb = sa["gating_stats"], sb["gating_stats"]
    assert ga["single_expert_ratio"] > 0.05 and ga["expert2_location"].get("host", 0) > 0
    for key in ("decisions", "single_expert_ratio", "expert2_location", "capped_by_bound"):
        assert gb[key] == ga[key], key
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert sb["routing"] == sa["routing"]


def test_low_precision_on_miss_through_the_step(store_dir):
    """HOBBIT's hint from the step's read: low-weight misses come from the int4 tier (outside
    the slot bank, so that layer is computed through the provider's weights)."""
    ids = torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(8))
    runs = {}
    for mode in ("eager", "step"):
        with cache_engine(store_dir, mode, gating="topk", prefetch=False, cache_options={"miss_precision": "int4"},
                          gating_options={"miss_precision_threshold": 0.45}) as eng:
            runs[mode] = (eng.decode_logits(ids), eng.stats())
    (a, sa), (b, sb) = runs["eager"], runs["step"]
    low_a, low_b = sa["tiers"]["gpu-int4"], sb["tiers"]["gpu-int4"]
    assert low_a["lookups"] > 0 and low_b["lookups"] == low_a["lookups"] and low_b["hits"] == low_a["hits"]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_layered_step_with_the_prefetcher_issues_what_the_eager_path_issues(store_dir):
    ids = torch.randint(0, 320, (16,), generator=torch.Generator().manual_seed(9))
    runs = {}
    for mode in ("eager", "step"):
        with cache_engine(store_dir, mode, gpu_slots=(2, 2, 2), prefetch=True,
                          prefetch_options={"lookahead": 2, "policy": "all"}) as eng:
            eng.decode_logits(ids)
            eng.provider.wait_idle()
            runs[mode] = eng.stats()
    pa, pb = runs["eager"]["prefetch"], runs["step"]["prefetch"]
    assert pa["prefetches_issued"] > 0 and pa["skipped_resident"] == 0
    for key in ("prefetches_issued", "precision", "recall", "token_recall", "per_distance"):
        assert pb[key] == pa[key], key


def test_whole_step_on_a_fully_resident_cache(store_dir):
    ids = torch.randint(0, 320, (10,), generator=torch.Generator().manual_seed(4))
    with cache_engine(store_dir, "eager", gpu_slots=(E,) * L) as eng:
        ref = eng.decode_logits(ids)
    with cache_engine(store_dir, "step", gpu_slots=(E,) * L) as eng:
        eng.decode_logits(ids[:1])            # loads what the first token needs (layered)
        for l in range(L):                    # then everything: the step goes whole
            eng.provider.prefetch(l, list(range(E)))
        assert eng.provider.wait_idle()
        eng.model.clear_caches()
        eng._step = None
        out = eng.decode_logits(ids)
        st = eng._step
        assert eng.provider.all_resident() and st.whole_steps == 10 and st.reads == 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# --- the batching scheduler through the step ------------------------------------------------------
def test_batch_scheduler_through_the_step_equals_generate_alone():
    """Six prompts through four rows: batches of 1-4 sequences in buckets of 1, 2 and 4 rows
    (free rows ride along as inactive padding); every sequence gets the tokens it gets alone,
    and the per-row expert counts the step adds on the device reach the usage."""
    from decoder.batching import BatchScheduler, FinishEvent, SamplingSpec, TokenEvent

    prompts = [[3, 4, 5], [9, 8, 7, 6, 5], [11], [20, 21, 22, 23], [30, 31], [40, 41, 42]]
    alone = Engine.from_model(tiny_model(seed=6), decode_step="eager")
    refs = [alone.generate(p, max_tokens=12).token_ids for p in prompts]
    eng = Engine.from_model(tiny_model(seed=6), decode_step="step")
    results: dict[int, list] = {i: [] for i in range(len(prompts))}
    ends: dict[int, FinishEvent] = {}
    done = threading.Event()

    def sink(i):
        def take(ev):
            if isinstance(ev, TokenEvent):
                results[i].append(ev.token_id)
            else:
                ends[i] = ev
                if len(ends) == len(prompts):
                    done.set()
        return take

    with BatchScheduler(eng, max_active=4, max_queue=8) as sch:
        for i, p in enumerate(prompts):
            sch.submit(p, SamplingSpec(max_tokens=12), sink(i))
        assert done.wait(120)
        assert sch.stats.max_batch >= 3
    for i, ref in enumerate(refs):
        assert results[i] == ref
        assert isinstance(ends[i], FinishEvent) and ends[i].usage.experts_per_token == pytest.approx(2.0)
    assert 4 in eng._steps and set(eng._steps) <= {1, 2, 4} and all(s.whole_steps for s in eng._steps.values())


def test_gemv_fits_whole_groups_or_one_group_per_tile():
    from decoder.kernels.fused_moe import gemv_fits

    assert gemv_fits(128, 128) and gemv_fits(128, 64)          # the tile inside one group
    assert gemv_fits(128, 256) and gemv_fits(32, 128)          # whole groups of a power-of-two size
    assert not gemv_fits(48, 128) and not gemv_fits(48, 32)    # 24 stored columns: neither
    assert not gemv_fits(128, 96)                              # 48 columns: not within 64, not whole groups
