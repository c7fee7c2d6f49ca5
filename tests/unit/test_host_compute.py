"""Misses computed on the host's cores (decoder/experts/host_compute.py), on the CPU.

- numerics: an expert packed for torch's CPU kernels (int4pack, int8pack, bf16 in place, and
  the dequantize fallback for shapes the kernels refuse) against the GPU path's expert math
  (provider.decode_expert_blob -> ExpertWeights.forward) on the same blob, per precision and
  activation dtype;
- the decision rule on recorded costs, and the cache's use of it (which misses `prepare`
  sends to the host, from measured costs and queue depth; prefills always copy);
- end to end: greedy fp32 generation with every eligible miss computed on the host gives the
  tokens (and close logits) of copying every miss, through the eager MoE block and through the
  decode step, for bf16, int8 and int4 stores.
"""

from __future__ import annotations

import threading

import pytest
import torch

from checkpoints import make_packed_store
from decoder.engine import Engine
from decoder.experts.host_compute import (CANDIDATES, HostExpert, HostExperts, MissRule, MissTokens,
                                          candidate_paths, cpu_kernels, int4pack_for_cpu, requantize_rows)
from decoder.experts.provider import decode_expert_blob
from expert_store import format as blob_format
from expert_store.client import StoreClient
from expert_store.quant import expert_to_blob

pytestmark = pytest.mark.timeout(240)
torch.set_num_threads(1)
L, E = 3, 4


def blob_and_raw(precision: str, ffn: int, hidden: int, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = {"w1": torch.randn(ffn, hidden, generator=g) * 0.1, "w3": torch.randn(ffn, hidden, generator=g) * 0.1,
         "w2": torch.randn(hidden, ffn, generator=g) * 0.1}
    blob = expert_to_blob("m", 0, 0, precision, w, group_size=group)
    header, raw = blob_format.decode_raw(blob)
    aligned = torch.empty(header.raw_size + 64, dtype=torch.uint8)[:header.raw_size]   # a fresh, aligned buffer
    aligned.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return blob, header, aligned


# (precision, ffn, hidden, group, the kernel torch's CPU ops give it when present)
CASES = [("int4", 96, 64, 32, "int4pack"),
         ("int4", 96, 64, 16, "dequant"),          # group 16: _weight_int4pack_mm_for_cpu refuses it
         ("int4", 40, 64, 32, "dequant"),          # w1/w3: 40 rows, not a multiple of 16; w2: 40 columns
         ("int8", 96, 64, 32, "int8pack"),
         ("int8", 96, 64, 64, "int8pack"),          # w2's input of 96 is not a multiple of 64: dequant
         ("bf16", 96, 64, 32, "linear")]


@pytest.mark.parametrize("precision,ffn,hidden,group,kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_expert_matches_the_gpu_paths_expert(precision, ffn, hidden, group, kernel, dtype):
    blob, header, raw = blob_and_raw(precision, ffn, hidden, group, seed=ffn + group)
    ref_w = decode_expert_blob(blob)                        # the GPU path's expert, on CPU tensors
    ex = HostExpert.from_raw(header, raw)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(5)).to(dtype)
    y, ref = ex(x), ref_w(x)
    assert y.dtype == dtype and y.shape == (3, hidden)
    scale = ref.float().abs().max().item()
    # fp32: the same sums in another order; bf16: the int kernels scale after the integer dot
    # product instead of rounding every dequantized weight to bf16 first
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=tol * scale)
    kinds = set(ex.kernel.split("/"))
    have = cpu_kernels()
    if precision == "bf16":
        assert kinds == {"linear"} and ex.nbytes == 0      # read in place
    elif not have[precision]:
        assert kinds == {"dequant"}
    elif precision == "int8" and group == 64:
        assert kinds == {"int8pack", "dequant"}
    else:
        assert kinds == {kernel}


@pytest.mark.skipif(not cpu_kernels()["int4"], reason="this torch has no int4 CPU kernel")
@pytest.mark.parametrize("N,K", [(128, 64), (192, 256), (96, 64)])
def test_int4_layout_built_with_bytes_equals_torchs_conversion(N, K):
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(N))
    vals = torch.stack([(q & 0xF).to(torch.int32), (q >> 4).to(torch.int32)], dim=-1).view(N, K)
    assert torch.equal(int4pack_for_cpu(q, K), torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals, 1))


@pytest.mark.skipif(not cpu_kernels()["int4"], reason="this torch has no int4 CPU kernel")
def test_int4_byte_layout_is_used_only_where_it_is_torchs():
    # torch's int4 CPU layout depends on the CPU (AVX-512: 64-row blocks); the byte-built one
    # must equal the op's wherever int4pack_for_cpu picks it
    from decoder.experts.host_compute import _bytes_layout_matches, _int4pack_bytes, _int4pack_op

    q = torch.randint(0, 256, (64, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    assert _bytes_layout_matches() == torch.equal(_int4pack_bytes(q, 96), _int4pack_op(q, 96))


def test_unaligned_payload_is_copied_and_owned():
    blob, header, raw = blob_and_raw("bf16", 96, 64, 32, seed=1)
    buf = torch.zeros(raw.numel() + 1, dtype=torch.uint8)
    buf[1:] = raw
    ex = HostExpert.from_raw(header, buf[1:])               # odd address: bf16 cannot be viewed there
    assert ex.nbytes == sum(t.nbytes for t in header.tensors)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ex(x), decode_expert_blob(blob)(x), rtol=1e-5, atol=1e-5)


def test_packed_experts_stay_within_their_budget():
    _, header, raw = blob_and_raw("int4", 96, 64, 32, seed=3)
    one = HostExpert.from_raw(header, raw).nbytes
    hx = HostExperts(pack_bytes=2 * one)
    try:
        for key in range(4):
            hx.expert(key, header, raw)
        assert hx.packed_bytes <= 2 * one and hx.packed(3) is not None and hx.packed(0) is None
        _, hb, rb = blob_and_raw("bf16", 96, 64, 32, seed=3)
        hx.expert("bf16", hb, rb)
        assert hx.packed("bf16") is None                    # in place: never kept
    finally:
        hx.close()


# --- int4/int8 requantized to per-row int8 (the int8row path) ---------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_per_row_requantization_error_is_within_its_bound(bits):
    from expert_store.quant import dequantize, quantize

    g = torch.Generator().manual_seed(bits)
    N, K, group = 48, 256, 32
    # rows whose groups differ in magnitude (the case per-row scales lose most on), and a zero row
    w = torch.randn(N, K, generator=g) * torch.rand(N, K // group, generator=g).repeat_interleave(group, 1)
    w[7] = 0
    q, scales = quantize(w, bits, group)
    W = dequantize(q, scales, bits, group, (N, K), torch.float32)        # the store's own dequantization
    Q, s = requantize_rows(q, scales, bits, group, (N, K), block=20)     # blocks that split the rows unevenly
    assert Q.dtype == torch.int8 and Q.shape == (N, K) and s.dtype == torch.float32 and s.shape == (N,)
    assert int(Q.abs().max()) <= 127 and torch.equal(s.to(torch.bfloat16).float(), s)   # bf16-exact scales
    amax = W.abs().amax(dim=1)
    live = amax > 0
    assert torch.all(s[live] >= amax[live] / 127) and torch.all(s[live] <= amax[live] / 127 * (1 + 2.0**-7))
    err = (Q.float() * s[:, None] - W).abs()
    assert torch.all(err <= s[:, None] / 2 * (1 + 2.0**-14))
    assert torch.all(err.amax(dim=1)[live] <= amax[live] / 254 * (1 + 2.0**-7) * (1 + 2.0**-14))
    assert torch.all(Q[7] == 0)
    if bits == 4:        # |q - 8| <= 7: under 1/36 of the row's largest int4 step
        smax = scales.float().amax(dim=1)
        assert torch.all(err.amax(dim=1) <= smax * 7 / 254 * (1 + 2.0**-7) * (1 + 2.0**-14))
        assert torch.all(err.amax(dim=1)[live] < smax[live] / 36)


@pytest.mark.skipif(not cpu_kernels()["int8"], reason="this torch has no int8 CPU kernel")
@pytest.mark.parametrize("precision", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8row_expert_computes_the_requantized_expert(precision, dtype):
    blob, header, raw = blob_and_raw(precision, 96, 64, 32, seed=21)
    ex = HostExpert.from_raw(header, raw, path="int8row")
    assert ex.kernel == "int8row"
    ref_w = decode_expert_blob(blob)                        # the GPU path's expert (store dequantization)
    # the same expert with each matrix requantized per row, in float32
    mats = {n: m.q.float() * m.scales[:, None] for n, m in (("w1", ex.w1), ("w3", ex.w3), ("w2", ex.w2))}
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    xf = x.float()
    ref8 = (torch.nn.functional.silu(xf @ mats["w1"].t()) * (xf @ mats["w3"].t())) @ mats["w2"].t()
    y = ex(x)
    assert y.dtype == dtype and y.shape == (3, 64)
    scale = ref8.abs().max().item()
    torch.testing.assert_close(y.float(), ref8, rtol=0, atol=(2e-5 if dtype == torch.float32 else 3e-2) * scale)
    # against the store's own dequantization: the requantization's error (bounded above) on top
    torch.testing.assert_close(y.float(), ref_w(x).float(), rtol=0, atol=5e-2 * scale)
    # memory: one int8 byte per weight (twice int4's, the same as int8's) and a float32 scale per row
    assert ex.nbytes == sum(N * K + 4 * N for N, K in ((96, 64), (96, 64), (64, 96)))


@pytest.mark.skipif(not all(cpu_kernels().values()), reason="this torch lacks an int CPU kernel")
def test_paths_and_their_candidates():
    _, header, raw = blob_and_raw("int4", 96, 64, 32, seed=4)
    assert HostExpert.from_raw(header, raw).kernel == "int4pack"                   # native: exact
    assert HostExpert.from_raw(header, raw, path="dequant").kernel == "dequant"
    assert HostExpert.from_raw(header, raw, path="int8pack").kernel == "int4pack"  # not int4's: native
    int4, int8 = HostExpert.from_raw(header, raw, path="int4pack"), HostExpert.from_raw(header, raw, path="int8row")
    assert sum(m.q.numel() for m in (int8.w1, int8.w3, int8.w2)) == 2 * sum(
        m.packed.numel() * m.packed.element_size() for m in (int4.w1, int4.w3, int4.w2))
    with pytest.raises(ValueError):
        HostExpert.from_raw(header, raw, path="fp8")
    assert candidate_paths("int4", cpu_kernels()) == CANDIDATES["int4"] == ("int4pack", "int8row", "dequant")
    assert candidate_paths("int8", {"int8": False, "int4": True}) == ("dequant",)
    assert candidate_paths("bf16", cpu_kernels()) == ()


class FakeTimer:
    """Recorded seconds per path (by the expert's kernel name); counts the calls."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, ex, x):
        assert x.shape[0] == 1 and x.dtype == torch.bfloat16
        self.calls.append(ex.kernel)
        return self.seconds[ex.kernel]


@pytest.mark.skipif(not all(cpu_kernels().values()), reason="this torch lacks an int CPU kernel")
def test_calibration_keeps_the_fastest_path_per_kind():
    _, header, raw = blob_and_raw("int4", 96, 64, 32, seed=5)
    _, h8, r8 = blob_and_raw("int8", 96, 64, 32, seed=5)
    timer = FakeTimer({"int4pack": 2.0, "int8row": 1.0, "dequant": 3.0, "int8pack": 0.5})
    hx = HostExperts(calib_min_bytes=0, timer=timer)
    try:
        assert hx.expert((0, 0), header, raw).kernel == "int8row"
        assert timer.calls == ["int4pack", "int8row", "dequant"]       # each candidate timed once
        assert hx.expert((0, 1), header, raw).kernel == "int8row" and len(timer.calls) == 3   # kept
        assert hx.expert((1, 0), h8, r8).kernel == "int8pack"          # int8: its own calibration
        assert timer.calls[3:] == ["int8pack", "int8row", "dequant"]
        st = hx.stats()
        assert st["paths"] == {f"int4/{header.raw_size}": "int8row", f"int8/{h8.raw_size}": "int8pack"}
        assert st["calibration"][f"int4/{header.raw_size}"] == {"int4pack": 2.0, "int8row": 1.0, "dequant": 3.0,
                                                               "chosen": "int8row"}
        # the kept expert is the one calibration built: int8row's bytes counted in the LRU
        assert hx.packed_bytes == 2 * hx.packed((0, 0)).nbytes + hx.packed((1, 0)).nbytes
        _, hb, rb = blob_and_raw("bf16", 96, 64, 32, seed=5)
        assert hx.expert("b", hb, rb).kernel == "linear" and len(timer.calls) == 6    # bf16: nothing to time
    finally:
        hx.close()
    # ties go to the earlier candidate
    hx = HostExperts(calib_min_bytes=0, timer=FakeTimer({"int4pack": 1.0, "int8row": 1.0, "dequant": 1.0}))
    try:
        assert hx.path_for(header, raw) == "int4pack"
    finally:
        hx.close()


def test_without_calibration_the_path_is_given_or_native():
    _, header, raw = blob_and_raw("int4", 96, 64, 32, seed=6)
    timer = FakeTimer({})
    for kw in ({"calibrate": False, "calib_min_bytes": 0}, {}):      # off, or an expert below calib_min_bytes
        hx = HostExperts(timer=timer, **kw)
        try:
            assert hx.path_for(header, raw) == "native" and hx.stats()["calibration"] == {}
        finally:
            hx.close()
    hx = HostExperts(timer=timer, calib_min_bytes=0, paths={"int4": "dequant"})
    try:
        assert hx.expert(0, header, raw).kernel == "dequant"
    finally:
        hx.close()
    assert timer.calls == []
    with pytest.raises(ValueError):
        HostExperts(paths={"int4": "int2"})


def test_packing_a_key_twice_counts_its_bytes_once():
    _, header, raw = blob_and_raw("int8", 96, 64, 32, seed=8)
    hx = HostExperts()
    try:
        one = hx.expert(0, header, raw).nbytes
        hx.forget(0)
        hx.expert(0, header, raw)
        with hx._lock:                       # another thread packed it meanwhile
            ex = hx._packed.pop(0)
            hx._bytes -= ex.nbytes
        hx._packed[0] = ex
        hx._bytes += ex.nbytes
        hx.expert(1, header, raw)
        assert hx.packed_bytes == 2 * one
    finally:
        hx.close()


# --- several workers ------------------------------------------------------------------------------
def test_each_worker_runs_on_its_share_of_the_threads():
    hx = HostExperts(threads=4, workers=2)
    try:
        assert hx.worker_threads == 2
        got = [hx.submit(torch.get_num_threads).result(timeout=30) for _ in range(4)]
        assert got == [2] * 4 and torch.get_num_threads() == 1     # per thread: the test's own is untouched
        assert hx.stats()["workers"] == 2
    finally:
        hx.close()


def test_workers_run_jobs_side_by_side():
    hx = HostExperts(workers=2)
    barrier = threading.Barrier(2, timeout=30)
    try:
        # each job waits for the other: both finish only if two workers run them at once
        futs = [hx.submit(barrier.wait) for _ in range(2)]
        assert sorted(f.result(timeout=60) for f in futs) == [0, 1]
    finally:
        hx.close()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_submit_layer_sums_the_same_bits_for_any_worker_count(workers):
    g = torch.Generator().manual_seed(9)
    B, H = 4, 64
    x = torch.randn(B, H, generator=g)
    mats = {e: torch.randn(H, H, generator=g) for e in range(5)}
    groups = {3: ([0, 2], [0.25, 0.5]), 0: ([1], [0.75]), 4: ([0, 1, 3], [0.1, 0.2, 0.3]), 1: ([2], [1.0])}
    ref = torch.zeros(B, H)
    for e in sorted(groups):
        rows = torch.tensor(groups[e][0])
        ref.index_add_(0, rows, (x[rows] @ mats[e]) * torch.tensor(groups[e][1])[:, None])
    hx = HostExperts(workers=workers)
    try:
        out = torch.full((B, H), float("nan"))
        hx.submit_layer(groups, x, out, lambda e, xe: xe @ mats[e]).result(timeout=60)
        assert torch.equal(out, ref) and hx.queued == 0
        # an expert's failure reaches the waiter, after every call is done
        def bad(e, xe):
            if e == 3:
                raise RuntimeError("expert 3")
            return xe @ mats[e]
        with pytest.raises(RuntimeError, match="expert 3"):
            hx.submit_layer(groups, x, out, bad).result(timeout=60)
        assert hx.queued == 0
        hx.submit_layer({}, x, out, bad).result(timeout=60)
        assert torch.all(out == 0)
    finally:
        hx.close()


# --- the decision rule on recorded costs -------------------------------------------------------
def test_rule_modes():
    assert MissRule("copy").assign([1, 2], 1e-3, 0.0, 1e-6, 0.0) == []
    assert MissRule("cpu").assign([1, 2], 1e-6, 0.0, 1.0, 5.0) == [1, 2]
    with pytest.raises(ValueError):
        MissRule("gpu")


def test_rule_auto_schedules_each_miss_where_it_finishes_first():
    rule = MissRule("auto", credit_reuse=False)
    # B's int4 expert on the H200 host (copy 1.7 ms) against a CPU call of 1.0 ms: the first miss
    # goes to the idle CPU; the second would finish at 2.0 ms there, 1.7 ms over the link
    assert rule.assign([3, 5], 1.7e-3, 0.0, 1.0e-3, 0.0) == [3]
    # a bf16 expert (copy 6.8 ms, CPU 7.9 ms): copied while the link is free ...
    assert rule.assign([2], 6.8e-3, 0.0, 7.9e-3, 0.0) == []
    # ... computed on the host when two copies are already ahead of it
    assert rule.assign([2], 6.8e-3, 2 * 6.8e-3, 7.9e-3, 0.0) == [2]
    # a busy CPU sends everything to the link; equal finishing times go to the link
    assert rule.assign([0, 1, 2], 1e-3, 0.0, 1e-3, 10e-3) == []
    assert rule.assign([0], 1e-3, 0.0, 1e-3, 0.0) == []
    # six misses, the CPU twice as fast as the link: two thirds of them to the CPU
    assert rule.assign([0, 1, 2, 3, 4, 5], 2e-3, 0.0, 1e-3, 0.0) == [0, 2, 3, 5]


def test_rule_spreads_the_host_queue_over_its_workers():
    rule = MissRule("auto", credit_reuse=False)
    # copy 3 ms, a CPU call 2 ms: one worker takes the first miss, the link the second (3 < 4),
    # the worker the third (4 < 6); two workers take the first two at once, the link the third
    assert rule.assign([0, 1, 2], 3e-3, 0.0, 2e-3, 0.0) == [0, 2]
    assert rule.assign([0, 1, 2], 3e-3, 0.0, 2e-3, 0.0, workers=2) == [0, 1]
    assert MissRule("auto", workers=2, credit_reuse=False).assign([0, 1, 2], 3e-3, 0.0, 2e-3, 0.0) == [0, 1]
    # 4 ms of calls queued: 4 ms ahead of one worker (6 > 3: copied), 2 ms ahead of each of two (4 > 3)
    assert rule.assign([0], 3e-3, 0.0, 2e-3, 4e-3) == []
    assert rule.assign([0], 3e-3, 0.0, 2e-3, 4e-3, workers=2) == []
    assert rule.assign([0], 5e-3, 0.0, 2e-3, 4e-3, workers=2) == [0]        # 4 < 5
    assert rule.assign([0], 5e-3, 0.0, 2e-3, 4e-3) == []                    # 6 > 5


def test_rule_credits_a_copy_with_the_hits_it_buys():
    rule = MissRule("auto")
    # the first H200 figures for B: copy 1.6 ms; a host call of 1.0 ms (what a faster kernel
    # needs): with no reuse the idle CPU wins by 0.6 ms ...
    assert rule.assign([4], 1.6e-3, 0.0, 1.0e-3, 0.0, reuse=0.0) == [4]
    # ... but if the layer's experts come back at the next token 50% of the time, the copy's
    # expected later hit is worth 0.8 ms: the copy wins; at 30% (0.48 ms) the CPU still does
    assert rule.assign([4], 1.6e-3, 0.0, 1.0e-3, 0.0, reuse=0.5) == []
    assert rule.assign([4], 1.6e-3, 0.0, 1.0e-3, 0.0, reuse=0.3) == [4]
    # a busy link (two copies ahead) still loses to the host with the credit
    assert rule.assign([4], 1.6e-3, 3.2e-3, 1.0e-3, 0.0, reuse=0.5) == [4]
    # unmeasured layers have no credit; measured ones use their own rate, the layer observed last by default
    assert rule.reuse(0) == 0.0 and rule.assign([4], 1.6e-3, 0.0, 1.0e-3, 0.0, layer=0) == [4]
    rule.observe(0, [1, 2])
    rule.observe(0, [2, 3])             # one of the two came back: 0.5
    rule.observe(1, [5, 6])
    rule.observe(1, [0, 7])             # none came back: 0
    assert rule.reuse(0) == pytest.approx(0.5) and rule.reuse(1) == 0.0 and rule.reuse() == 0.0
    assert rule.assign([4], 1.6e-3, 0.0, 1.0e-3, 0.0, layer=0) == []
    assert rule.assign([4], 1.6e-3, 0.0, 1.0e-3, 0.0) == [4]              # layer 1, observed last
    rule.observe(0, [2, -1])            # 2 of {2, 3}: 0.5 again; -1 (a dropped choice) is no expert
    assert rule.reuse() == pytest.approx(0.5)
    assert rule.assign([4], 1.6e-3, 0.0, 1.0e-3, 0.0) == []
    assert rule.stats()["reuse"] == {0: 0.5, 1: 0.0}
    # without the credit the measured rate is not used: the fastest finish wins again
    plain = MissRule("auto", credit_reuse=False)
    plain.observe(0, [1, 2])
    plain.observe(0, [1, 2])
    assert plain.reuse(0) > 0 and plain.assign([4], 1.6e-3, 0.0, 1.0e-3, 0.0) == [4]


def test_miss_tokens_feeds_the_rules_reuse_on_decode_steps():
    class Cache:
        def __init__(self):
            self.miss_rule, self.expected = MissRule("auto"), []

        def expect_tokens(self, layer, counts):
            self.expected.append((layer, counts))

    cache = Cache()
    obs = MissTokens(cache, max_rows=2)
    obs.on_routing_host(0, [[1, 2]])
    obs.on_routing_host(0, [[2, 3]])
    assert cache.miss_rule.reuse(0) == pytest.approx(0.5)
    obs.on_routing_host(0, [[5, 6], [7, 8], [9, 10]])          # a prefill: counted, not observed
    assert cache.miss_rule.reuse(0) == pytest.approx(0.5)
    assert cache.expected[-1] == (0, {5: 1, 6: 1, 7: 1, 8: 1, 9: 1, 10: 1})


# --- the cache's decisions ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_packed_store(tmp_path_factory.mktemp("hostc"), precisions=("bf16", "int8", "int4"), group_size=32,
                             hidden=64, ffn=96, layers=L, experts=E, seed=11)


def cache_engine(store_dir, precision="int8", miss_compute="copy", decode_step="eager", pack=True, **options):
    client = StoreClient.open(str(store_dir))
    opts = {"gpu_slots": [2, 1, 2], "miss_compute": miss_compute, **options}
    if precision != "bf16":
        opts.setdefault("dense_slots", True)      # the step's bank in fp32 on the CPU
    eng = Engine.from_store(client, "tiny", precision=precision, decode_step=decode_step, gpu_cache_bytes=0,
                            host_cache_bytes=1 << 22, prefetch=False, cache_options=opts)
    eng._owns_client = True
    keys = [(l, e) for l in range(L) for e in range(E)]
    eng.provider.fill_host(keys)
    if pack:
        assert eng.provider.pack_host(keys) == (0 if precision == "bf16" or miss_compute == "copy" else L * E)
    return eng


def test_prepare_sends_misses_to_the_host_by_measured_cost(store_dir):
    with cache_engine(store_dir, miss_compute="auto") as eng:
        cache = eng.provider
        assert any(isinstance(o, MissTokens) for o in eng.model.observers)
        cache.costs.host.value, cache.host_experts.cost.value = 2e-3, 1e-3      # recorded costs
        cache.begin_token()
        cache.expect_tokens(0, {0: 1, 1: 1, 2: 1})
        cache.prepare(0, [0, 1, 2])
        assert cache.on_host(0) == [0, 2]          # CPU at 1 and 2 ms, the link at 2 ms (tie: link)
        w = cache.get(0, 0)
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
        ref = decode_expert_blob(bytes(cache.source.fetch(0, 0))).materialize(torch.float32)(x)
        torch.testing.assert_close(w(x), ref, rtol=1e-5, atol=1e-5)
        cache.get(0, 1)
        cache.release(0, [0, 1, 2])
        assert cache.on_host(0) == [] and cache.resident(0) == [1]
        st = cache.stats()
        assert st["cpu_misses"] == 2 and st["tiers"]["gpu"]["misses"] == 3 and st["tiers"]["gpu"]["loads"] == 1
        assert st["host_compute"]["calls"] == 1
        # a prefill (more tokens than cpu_max_tokens) is copied; so is a miss without a routing hint
        cache.begin_token()
        cache.expect_tokens(1, {0: 16})
        cache.prepare(1, [0])
        assert cache.on_host(1) == []
        cache.get(1, 0)
        cache.release(1, [0])
        cache.begin_token()
        cache.prepare(2, [3])
        assert cache.on_host(2) == []
        cache.get(2, 3)
        cache.release(2, [3])
        # a slow CPU: everything is copied
        cache.host_experts.cost.value = 1.0
        cache.begin_token()
        cache.expect_tokens(2, {0: 1, 1: 1})
        cache.prepare(2, [0, 1])
        assert cache.on_host(2) == []
        cache.release(2, [0, 1])


def test_an_unpacked_expert_is_copied_and_packed_for_next_time(store_dir):
    with cache_engine(store_dir, miss_compute="cpu", pack=False) as eng:
        cache = eng.provider
        cache.begin_token()
        cache.expect_tokens(0, {1: 1})
        cache.prepare(0, [1])
        assert cache.on_host(0) == []                       # int8: not packed yet, so copied
        cache.get(0, 1)
        cache.release(0, [1])
        for _ in range(500):                                # the packer thread packs it meanwhile
            if cache.host_experts.packed((0, 1)) is not None:
                break
            threading.Event().wait(0.01)
        assert cache.host_experts.packed((0, 1)) is not None
        cache.begin_token()
        cache.expect_tokens(2, {1: 1})                      # another layer's expert 1: still unpacked
        cache.prepare(2, [1])
        assert cache.on_host(2) == []
        cache.release(2, [1])


def test_packed_budget_bounds_pack_host(store_dir):
    with cache_engine(store_dir, miss_compute="cpu", pack=False, cpu_pack_bytes=1) as eng:
        assert eng.provider.pack_host([(0, 0), (0, 1)]) == 1 and eng.provider.host_experts.packed_bytes == 0


def test_cpu_mode_needs_silu_experts_and_copy_mode_builds_no_pool(store_dir):
    with cache_engine(store_dir, miss_compute="copy") as eng:
        assert eng.provider.host_experts is None
        assert not any(isinstance(o, MissTokens) for o in eng.model.observers)
        assert eng.provider.stats()["miss_compute"] == "copy"


# --- end to end: the tokens of copying every miss -------------------------------------------------
@pytest.mark.parametrize("precision,decode_step", [("bf16", "eager"), ("int8", "eager"), ("int8", "step"),
                                                    ("int4", "step")])
def test_generation_with_misses_on_the_host_equals_copying_them(store_dir, precision, decode_step):
    ids = torch.randint(3, 300, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    probe = torch.randint(3, 300, (10,), generator=torch.Generator().manual_seed(2))
    runs = {}
    for mode in ("copy", "cpu", "auto"):
        with cache_engine(store_dir, precision, mode, decode_step) as eng:
            tokens = eng.generate(ids, max_tokens=12, stop_at_eos=False).token_ids
            logits = eng.decode_logits(probe)
            runs[mode] = (tokens, logits, eng.stats(), eng._step)
    (t_copy, l_copy, s_copy, _), (t_cpu, l_cpu, s_cpu, step) = runs["copy"], runs["cpu"]
    assert t_cpu == t_copy and runs["auto"][0] == t_copy
    torch.testing.assert_close(l_cpu, l_copy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runs["auto"][1], l_copy, rtol=1e-4, atol=1e-4)
    assert s_copy["provider"]["cpu_misses"] == 0 and s_cpu["provider"]["cpu_misses"] > 10
    # the host's misses move no bytes into the GPU tier
    assert s_cpu["provider"]["tiers"]["gpu"]["bytes"] < s_copy["provider"]["tiers"]["gpu"]["bytes"]
    assert s_cpu["routing"] == s_copy["routing"]
    if decode_step == "step":
        assert step is not None and step.host_inputs > 0 and step.layered_steps > 0


def test_generation_with_several_host_workers_gives_the_bits_of_one(store_dir):
    """cpu_workers=3: a layer's host experts run on three workers at once; their sum is taken
    in expert order, so tokens and logits are those of one worker, bit for bit."""
    ids = torch.randint(3, 300, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    probe = torch.randint(3, 300, (10,), generator=torch.Generator().manual_seed(2))
    runs = {}
    for workers in (1, 3):
        with cache_engine(store_dir, "int8", "cpu", "step", cpu_workers=workers) as eng:
            assert eng.provider.host_experts.workers == workers and eng.provider.miss_rule.workers == workers
            tokens = eng.generate(ids, max_tokens=12, stop_at_eos=False).token_ids
            runs[workers] = (tokens, eng.decode_logits(probe), eng.stats())
    assert runs[3][0] == runs[1][0]
    assert torch.equal(runs[3][1], runs[1][1])
    assert runs[3][2]["provider"]["cpu_misses"] > 10
    assert runs[3][2]["provider"]["host_compute"]["miss_rule"]["workers"] == 3


@pytest.mark.skipif(not cpu_kernels()["int8"], reason="this torch has no int8 CPU kernel")
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_generation_with_int8row_misses_on_the_host_stays_close_to_copying_them(store_dir, precision):
    ids = torch.randint(3, 300, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    probe = torch.randint(3, 300, (10,), generator=torch.Generator().manual_seed(2))
    runs = {}
    for mode in ("copy", "cpu"):
        with cache_engine(store_dir, precision, mode, "step", pack=False) as eng:
            if mode == "cpu":
                eng.provider.host_experts.paths = {precision: "int8row"}     # what calibration may pick
                assert eng.provider.pack_host([(l, e) for l in range(L) for e in range(E)]) == L * E
                assert {eng.provider.host_experts.packed((l, e)).kernel for l in range(L) for e in range(E)} \
                    == {"int8row"}
            tokens = eng.generate(ids, max_tokens=12, stop_at_eos=False).token_ids
            runs[mode] = (tokens, eng.decode_logits(probe), eng.stats())
    (t_copy, l_copy, _), (t_cpu, l_cpu, s_cpu) = runs["copy"], runs["cpu"]
    assert s_cpu["provider"]["cpu_misses"] > 10
    assert t_cpu == t_copy
    # per-row requantization: within 1/254 of each row's largest weight (requantize_rows)
    torch.testing.assert_close(l_cpu, l_copy, rtol=0, atol=5e-3 * l_copy.abs().max().item())


def test_cli_flag_becomes_the_cache_option():
    from decoder.cli import build_parser, engine_options

    base = ["generate", "--store", "S", "--model", "t", "--prompt", "x"]
    args = build_parser().parse_args(base + ["--miss-compute", "auto", "--gpu-cache-bytes", "1M"])
    assert engine_options(args)["cache_options"] == {"miss_compute": "auto", "eviction": "lfru"}
    with pytest.raises(ValueError, match="--miss-compute needs the expert cache"):
        engine_options(build_parser().parse_args(base + ["--miss-compute", "cpu"]))
    args = build_parser().parse_args(base + ["--miss-compute", "cpu", "--cpu-workers", "2", "--gpu-cache-bytes", "1M"])
    assert engine_options(args)["cache_options"] == {"miss_compute": "cpu", "cpu_workers": 2, "eviction": "lfru"}
    with pytest.raises(ValueError, match="--cpu-workers applies to --miss-compute"):
        engine_options(build_parser().parse_args(base + ["--cpu-workers", "2", "--gpu-cache-bytes", "1M"]))
