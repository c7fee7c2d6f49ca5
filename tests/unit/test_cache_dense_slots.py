"""ExpertCache with dense slots: int8/int4 experts dequantized once per load into the compute dtype.

Against a real store directory (tiny Mixtral checkpoint packed at bf16, int8 and int4; group 64, so
w1/w3 ([96, 64]) dequantize group-aligned and w2 ([64, 96]) has a short last group):
- a dense-slot cache gives bitwise the same logits as the raw-slot cache and the decoded reference
  (the same dequantized values, only computed once per load instead of once per call);
- a dense slot's weights are plain views of the GPU pool, the slot is the dense expert's size,
  while the link (stats) carries the compact payload;
- slots and staging buffers are reused correctly under eviction over many tokens, with prefetches
  and two loader threads racing the demand path;
- the low-precision tier (HOBBIT) works with dense slots, itself dense or over a bf16 cache.
The CUDA test (skipped without a GPU) checks dense-slot logits against the resident reference.
"""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_mixtral_checkpoint
from decoder import Engine
from decoder.experts.cache import ExpertCache
from decoder.experts.gpu_slots import dense_slot_bytes, gpu_slot_bytes, raw_slot_bytes
from decoder.experts.provider import ExpertSource, decode_expert_blob
from decoder.model.config import ModelConfig
from expert_store import format as blob_format
from expert_store.client import StoreClient
from expert_store.pack import pack_checkpoint
from expert_store.tiers import NvmeTier

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)

L, E, H, FFN = 3, 4, 64, 96
IDS = [1, 17, 45, 99, 3, 250, 8, 8, 61, 120, 7, 33]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", hidden=H, ffn=FFN, layers=L, experts=E, seed=11)
    pack_checkpoint(ckpt, NvmeTier(root / "store"), model="tiny", precisions=("bf16", "int8", "int4"),
                    group_size=64, progress=False)
    with StoreClient.open(str(root / "store")) as c:
        yield c


def make_source(client, precision, dtype=torch.float32, device="cpu"):
    m = client.manifest("tiny")
    return ExpertSource(client=client, model="tiny", config=ModelConfig.from_hf(m.config), manifest=m,
                        precision=precision, dtype=dtype, device=device)


def reference(client, precision, dtype=torch.float32, device="cpu"):
    """Every expert decoded from its blob and dequantized once into `dtype` (the definition)."""
    return {(l, e): decode_expert_blob(client.fetch_expert("tiny", l, e, precision), device=device, dtype=dtype)
            for l in range(L) for e in range(E)}


def in_pool(t: torch.Tensor, pool: torch.Tensor) -> bool:
    start = pool.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + pool.numel()


def check_tiers(stats):
    for name, t in stats["tiers"].items():
        assert t["hits"] + t["misses"] == t["lookups"], (name, t)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_slot_logits_equal_raw_slot_logits(client, precision, dtype):
    with Engine.from_store(client, "tiny", dtype=dtype, precision=precision) as ref:   # decoded once, resident
        want = ref.forward_logits(IDS)
    got = {}
    for dense in (False, True):
        # one slot per layer + 2 scratch: experts are evicted and reloaded within the forward
        with Engine.from_store(client, "tiny", dtype=dtype, precision=precision, host_cache_bytes=0,
                               cache_options={"gpu_slots": [1, 2, 1], "dense_slots": dense}) as eng:
            cache = eng.provider
            assert isinstance(cache, ExpertCache) and cache.dense_slots is dense
            got[dense] = [eng.forward_logits(IDS), eng.forward_logits(IDS[:5])]
            assert cache.stats()["tiers"]["gpu"]["loads"] > L * 2
    assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])
    assert torch.equal(got[True][0], want)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_dense_slot_is_the_dense_expert_and_the_link_carries_the_compact_payload(client, precision):
    src = make_source(client, precision)
    header, _ = blob_format.read_header(bytes(client.fetch_expert("tiny", 0, 0, precision)))
    cache = ExpertCache(src, gpu_slots=[1, 2, 1], host_cache_bytes=0, dense_slots=True)
    try:
        assert cache.dense_slots and cache.raw_size == header.raw_size
        # three fp32 matrices of 64 x 96, each 256-byte aligned: 4x (int8) / 8x (int4) the payload
        assert cache.slot_bytes == dense_slot_bytes(header, torch.float32) == 3 * H * FFN * 4
        assert cache.slot_bytes > 3 * raw_slot_bytes(header)
        assert cache.gpu_pool.shape == (1 + 2 + 1 + cache.scratch_slots, cache.slot_bytes)
        ref = reference(client, precision)
        x = torch.randn(5, H)
        for l in range(L):
            for e in range(E):
                cache.prepare(l, [e])
                w = cache.get(l, e)
                for name in ("w1", "w3", "w2"):
                    m = getattr(w, name)
                    assert type(m) is torch.Tensor and m.dtype == torch.float32 and in_pool(m, cache.gpu_pool)
                    assert torch.equal(m, getattr(ref[(l, e)], name)), (l, e, name)
                assert torch.equal(w(x), ref[(l, e)](x))
                cache.release(l, [e])
        s = cache.stats()
        check_tiers(s)
        assert s["dense_slots"] and s["slot_bytes"] == cache.slot_bytes and s["raw_bytes"] == header.raw_size
        assert s["tiers"]["gpu"]["loads"] == L * E
        assert s["tiers"]["gpu"]["bytes"] == L * E * header.raw_size            # compact, not dense
        blobs = sum(src.blob_size(l, e) for l in range(L) for e in range(E))
        assert s["bytes_fetched"] == blobs == s["tiers"]["host"]["bytes"]
        assert cache.copies.staging_free == cache.staging_buffers == cache.workers + 1   # all back in the pool
    finally:
        cache.close()


def test_dense_slots_default_and_bf16(client):
    # the default turns dense slots on only for int8/int4 on CUDA; a bf16 payload is dense already
    h4, _ = blob_format.read_header(bytes(client.fetch_expert("tiny", 0, 0, "int4")))
    hb, _ = blob_format.read_header(bytes(client.fetch_expert("tiny", 0, 0, "bf16")))
    assert gpu_slot_bytes(h4, torch.bfloat16, "cuda") == dense_slot_bytes(h4, torch.bfloat16) == 3 * H * FFN * 2
    assert gpu_slot_bytes(h4, torch.bfloat16, "cuda", False) == raw_slot_bytes(h4) < 3 * H * FFN
    assert gpu_slot_bytes(hb, torch.bfloat16, "cuda") == raw_slot_bytes(hb)
    for precision, option, want in [("int4", None, False), ("int8", None, False), ("int4", True, True),
                                    ("bf16", True, False), ("bf16", None, False)]:
        cache = ExpertCache(make_source(client, precision), gpu_slots=[1] * L, host_cache_bytes=0,
                            dense_slots=option)
        try:
            assert cache.dense_slots is want and (cache.dense_layout is not None) is want
            assert cache.staging_buffers == (cache.workers + 1 if want else 0)
            header, _ = blob_format.read_header(bytes(client.fetch_expert("tiny", 0, 0, precision)))
            assert cache.slot_bytes == (dense_slot_bytes(header, torch.float32) if want else raw_slot_bytes(header))
            assert cache.slot_bytes == gpu_slot_bytes(header, torch.float32, "cpu", option)
        finally:
            cache.close()


def test_slot_reuse_under_eviction_with_prefetch_and_two_loaders(client):
    """60 tokens of random routing through one slot per layer (+1 scratch) and a 2-expert host
    tier, with prefetches of other experts racing the demand loads on two loader threads: every
    expert handed out holds its own weights, and every staging buffer comes back."""
    src = make_source(client, "int4")
    ref = reference(client, "int4")
    probe = ExpertCache(src, gpu_slots=[1] * L, host_cache_bytes=0, dense_slots=True)
    hslot = probe.host_slot_bytes
    probe.close()
    cache = ExpertCache(src, gpu_slots=[1, 1, 2], host_cache_bytes=2 * hslot, scratch_slots=1, workers=2,
                        dense_slots=True)
    rng = random.Random(5)
    x = torch.randn(2, H)
    try:
        for _ in range(60):
            cache.begin_token()
            for l in range(L):
                needed = rng.sample(range(E), rng.choice([1, 2]))
                if l + 1 < L:   # speculate on the next layer, as the prefetcher does
                    cache.prefetch(l + 1, rng.sample(range(E), 2), [0.9, 0.5])
                cache.prepare(l, needed)
                for e in needed:
                    w = cache.get(l, e)
                    assert torch.equal(w.w1, ref[(l, e)].w1) and torch.equal(w.w2, ref[(l, e)].w2), (l, e)
                    assert torch.equal(w(x), ref[(l, e)](x)), (l, e)
                cache.release(l, needed)
            assert [len(cache.resident(l)) <= q for l, q in enumerate(cache.quota)] == [True] * L
        assert cache.wait_idle()
        s = cache.stats()
        check_tiers(s)
        assert s["errors"] == 0 and s["evictions_gpu"] > 50 and s["prefetch_loads"] > 0
        assert s["tiers"]["gpu"]["bytes"] == s["tiers"]["gpu"]["loads"] * cache.raw_size
        assert cache.copies.staging_free == cache.staging_buffers == 3
        assert len(cache._gpu_free) + sum(1 for d in cache._gpu for en in d.values() if en.slot >= 0) \
            == cache.gpu_pool.shape[0]
    finally:
        cache.close()


def test_wide_layer_uses_scratch_and_transient_dense_slots(client):
    # prefill: one layer needs all 4 experts but owns 1 slot (+2 scratch): the 4th goes to a dense
    # buffer outside the pool, dropped again at release; twice, so the bookkeeping returns to zero
    ref = reference(client, "int4")
    cache = ExpertCache(make_source(client, "int4"), gpu_slots=[1, 1, 1], host_cache_bytes=0, scratch_slots=2,
                        dense_slots=True)
    x = torch.randn(3, H)
    try:
        for rnd in range(2):
            cache.begin_token()
            cache.prepare(0, [0, 1, 2, 3])
            ws = [cache.get(0, e) for e in range(4)]
            outside = [w for w in ws if not in_pool(w.w1, cache.gpu_pool)]
            assert len(outside) == 1 and outside[0].w1.dtype == torch.float32   # 1 resident + 2 scratch + 1
            for e, w in enumerate(ws):
                assert torch.equal(w(x), ref[(0, e)](x)), (rnd, e)
            cache.release(0, [0, 1, 2, 3])
            assert len(cache.resident(0)) == 1 and cache._transient == 0
            assert len(cache._gpu_free) == cache.gpu_pool.shape[0] - 1
        s = cache.stats()
        assert s["transient_loads"] == 2 and s["scratch_loads"] == 4
    finally:
        cache.close()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_tier_with_dense_slots(client, precision):
    # int8 cache: both tiers dense; bf16 cache: raw bf16 slots, the int4 tier dense
    src = make_source(client, precision)
    cache = ExpertCache(src, gpu_slots=[1, 1, 1], host_cache_bytes=0, miss_precision="int4", low_slots=2,
                        dense_slots=True)
    full, low = reference(client, precision), reference(client, "int4")
    header4, _ = blob_format.read_header(bytes(client.fetch_expert("tiny", 0, 0, "int4")))
    try:
        assert cache.dense_slots is (precision != "bf16") and cache._low.dense_layout is not None
        assert cache._low.slot_bytes == dense_slot_bytes(header4, torch.float32)
        x = torch.randn(3, H)
        cache.begin_token()
        cache.prepare(0, [0])
        assert torch.equal(cache.get(0, 0)(x), full[(0, 0)](x))
        cache.release(0, [0])
        cache.begin_token()
        cache.allow_low_precision(0, [0, 2])   # 0 is on the GPU at full precision: used as is
        cache.prepare(0, [0, 2])
        y0, w2 = cache.get(0, 0)(x), cache.get(0, 2)
        cache.release(0, [0, 2])
        assert torch.equal(y0, full[(0, 0)](x))
        assert type(w2.w1) is torch.Tensor and in_pool(w2.w1, cache._low.pool)
        assert torch.equal(w2.w1, low[(0, 2)].w1) and torch.equal(w2(x), low[(0, 2)](x))
        assert cache.resident(0) == [0]
        for l, e in [(0, 2), (1, 3), (2, 1), (0, 2), (1, 0), (1, 3)]:   # LRU of 2 low slots, reused
            cache.begin_token()
            cache.allow_low_precision(l, [e])
            cache.prepare(l, [e])
            assert torch.equal(cache.get(l, e)(x), low[(l, e)](x)), (l, e)
            cache.release(l, [e])
        s = cache.stats()
        check_tiers(s)
        lows = s["tiers"]["gpu-int4"]
        assert lows["lookups"] == 7 and lows["hits"] == 1 and lows["loads"] == 6
        assert lows["bytes"] == 6 * header4.raw_size                   # compact payloads
    finally:
        cache.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cuda_dense_slots_match_resident(client, precision):
    """On CUDA, dense slots are the default for int8/int4: logits equal the resident reference
    (dequantized once at load as well) under eviction, prefetch and the low-precision tier; the
    dequantization runs on its own stream; the measured host cost is the copy's (the link)."""
    dtype = torch.bfloat16
    with Engine.from_store(client, "tiny", device="cuda", dtype=dtype, precision=precision) as ref:
        want = ref.forward_logits(IDS)
        want_tokens = ref.generate(IDS[:4], max_tokens=6).token_ids
    for opts in [{"gpu_slots": [E] * L}, {"gpu_slots": [1, 2, 1]}, {"gpu_slots": [1, 1, 1], "workers": 2},
                 {"gpu_slots": [1, 1, 1], "dense_slots": False}]:
        with Engine.from_store(client, "tiny", device="cuda", dtype=dtype, precision=precision,
                               host_cache_bytes=1 << 20, cache_options=opts) as eng:
            cache = eng.provider
            dense = opts.get("dense_slots", True)
            assert cache.cuda and cache.dense_slots is dense and (cache.dequant_stream is not None) is dense
            for _ in range(2):
                assert torch.equal(eng.forward_logits(IDS), want), opts
            assert eng.generate(IDS[:4], max_tokens=6).token_ids == want_tokens
            torch.cuda.synchronize()
            s = cache.stats()
            check_tiers(s)
            assert s["tiers"]["gpu"]["bytes"] == s["tiers"]["gpu"]["loads"] * cache.raw_size
            assert s["load_cost_measured"]["host"] == s["tiers"]["gpu"]["loads"] > 0
            if dense:
                assert cache.copies.staging_free == cache.staging_buffers == 2
    # slot reuse on the GPU: one slot per layer, every get checked against the reference weights
    src = make_source(client, precision, dtype=dtype, device="cuda")
    refw = reference(client, precision, dtype=dtype, device="cuda")
    cache = ExpertCache(src, gpu_slots=[1, 1, 1], host_cache_bytes=0, miss_precision="int4" if precision == "int8"
                        else None, low_slots=2)
    lows = reference(client, "int4", dtype=dtype, device="cuda") if precision == "int8" else None
    x = torch.randn(4, H, device="cuda", dtype=dtype)
    rng = random.Random(3)
    try:
        for _ in range(30):
            cache.begin_token()
            for l in range(L):
                needed = rng.sample(range(E), 2)
                if lows is not None and rng.random() < 0.3:
                    cache.allow_low_precision(l, needed[1:])
                if l + 1 < L:
                    cache.prefetch(l + 1, rng.sample(range(E), 2), [0.9, 0.5])
                cache.prepare(l, needed)
                for e in needed:
                    w = cache.get(l, e)
                    is_low = w.precision == "int4" and precision == "int8"
                    assert torch.equal(w(x), (lows if is_low else refw)[(l, e)](x)), (l, e)
                cache.release(l, needed)
        torch.cuda.synchronize()
        assert cache.stats()["errors"] == 0
    finally:
        cache.close()
