"""The decoder on a co-located store, on the CPU: a real `expert-store colocate` process
publishing into a shared-memory arena and the decoder's host tier reading it in place
(`local-shm://`; decoder/experts/host_tier.py). Each case compares logits or tokens with the
same engine reading the store directory.

Covers: raw payloads (int8) copied from the mapping into GPU slots and bf16 byte planes decoded
from it into the pool, with no blob copied out of the arena; replace while reading (the store
reuses a slot halfway through the decoder's copy out of it: the torn copy is detected and
redone; and an arena smaller than the working set, slots replaced while the decoder reads
them: every expert it computes with is whole); a scribbled arena caught on the raw path; an
arena full of pinned blobs (RESOURCE_EXHAUSTED, the decoder carries on once it has room); the
store killed and restarted with another layout under a running decoder (it reads on, maps the
new file, no crash), also under `moe-decoder serve` answering requests throughout; `moe-decoder
serve --store local-shm://...` end to end and restarted (the second process fetches nothing);
`fill_host` publishing into the arena (a cold fill with its rate); bf16 published raw (`--publish
raw`: planes joined once by the store, read in place by the decoder).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import torch

from service_procs import ServiceProcess, child_env, wait_until

from decoder.client import DecoderClient
from decoder.engine import Engine
from expert_store.client import StoreClient
from expert_store.colocate import ColocatedStore
from expert_store.errors import ResourceExhausted
from expert_store.shm_arena import RECORD_BYTES, ArenaReader

MODEL = "tiny"
LAYERS, EXPERTS = 2, 8
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
IDS = list(range(3, 43))
# GPU slots for ~3 of 8 experts per layer: most experts are loaded through the host tier
KW = dict(gpu_cache_bytes=3 * LAYERS * 40_000, host_cache_bytes=4 * 60_000, prefetch=False)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A tiny random Mixtral (8 experts, top-2) packed at bf16 (coded byte planes) and int8 (raw)."""
    from checkpoints import make_mixtral_checkpoint
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    root = tmp_path_factory.mktemp("colocated-decoder")
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", hidden=64, ffn=96, layers=LAYERS, experts=EXPERTS, seed=14,
                                      max_position_embeddings=256)
    pack_checkpoint(ckpt, NvmeTier(root / "store"), model=MODEL, precisions=("bf16", "int8"), progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def slot_bytes(store_dir) -> int:
    with StoreClient.open(str(store_dir)) as c:
        return -(-max(e[0] for e in c.manifest(MODEL).blobs.values()) // 4096) * 4096


@pytest.fixture
def arena_path(tmp_path):
    base = SHM if SHM is not None and shutil.disk_usage(SHM).free > (64 << 20) else tmp_path
    path = base / f"adapmoe-test-{uuid.uuid4().hex[:12]}.arena"
    yield path
    for p in (path, *base.glob(path.name + ".new-*")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def budget(slots: int, slot_bytes: int) -> int:
    """Arena bytes that hold exactly `slots` slots."""
    return slots * (slot_bytes + RECORD_BYTES) + 8192


def colocated(store_dir: Path, arena: Path, arena_bytes: int, listen: str = "127.0.0.1:0",
              *extra: str) -> ColocatedStore:
    return ColocatedStore(str(store_dir), str(arena), arena_bytes, MODEL, listen=listen, extra=extra, env=child_env())


def reference_logits(store_dir: Path, precision: str, **kw) -> torch.Tensor:
    with Engine.from_store(str(store_dir), MODEL, precision=precision, **{**KW, **kw}) as engine:
        return engine.forward_logits(IDS)


def arena_reads(engine: Engine) -> dict:
    return engine.client.stat()["arena"]["reader"]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_the_host_tier_reads_the_arena_in_place(store_dir, slot_bytes, arena_path, precision):
    """int8 payloads go from the mapping to GPU slots (nothing in the host pool), bf16 planes are
    decoded from the mapping into the pool; no blob is copied out of the arena (the one read is
    the cache's size probe at start); logits equal the store directory's."""
    want = reference_logits(store_dir, precision)
    with colocated(store_dir, arena_path, budget(64, slot_bytes)) as store, \
            Engine.from_store(store.target, MODEL, precision=precision, **KW) as engine:
        got = engine.forward_logits(IDS)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert arena_reads(engine)["bytes"] == engine.provider.source.blob_size(0, 0)   # only the probe's copy
        tiers = engine.provider.stats()["tiers"]
        published = engine.client.arena_info().publishes
        assert tiers["store"]["loads"] == published - 1 > 0   # the probe's blob was published for the probe
        host = engine.provider.host
        if precision == "int8":
            assert not host.entries
        else:
            assert host.entries and all(h.slot >= 0 and h.lease is None for h in host.entries.values())
        # a second pass: every expert the GPU evicts comes back from host memory (the arena), no store load
        engine.provider.reset_stats()
        torch.testing.assert_close(engine.forward_logits(IDS), want, rtol=0, atol=0)
        tiers = engine.provider.stats()["tiers"]
        assert tiers["store"]["loads"] == 0 and tiers["host"]["hits"] > 0
        assert engine.client.arena_info().publishes == published


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_an_arena_smaller_than_the_working_set_never_gives_a_torn_expert(store_dir, slot_bytes, arena_path,
                                                                        precision):
    """4 arena slots for 16 experts, two loader threads and the prefetcher: slots are replaced
    while the decoder copies out of them; what it computes with is whole (logits and greedy
    tokens equal the store directory's)."""
    kw = dict(KW, prefetch=True, cache_options={"workers": 2})
    want = reference_logits(store_dir, precision, **kw)
    with Engine.from_store(str(store_dir), MODEL, precision=precision, **kw) as engine:
        want_tokens = engine.generate(IDS[:8], max_tokens=12, temperature=0.0, stop_at_eos=False).token_ids
    with colocated(store_dir, arena_path, budget(4, slot_bytes)) as store, \
            Engine.from_store(store.target, MODEL, precision=precision, **kw) as engine:
        for _ in range(2):
            torch.testing.assert_close(engine.forward_logits(IDS), want, rtol=0, atol=0)
        assert engine.generate(IDS[:8], max_tokens=12, temperature=0.0, stop_at_eos=False).token_ids == want_tokens
        info = engine.client.arena_info()
        assert info.slots == 4 and info.evictions > 0 and info.data_loss == 0


def test_a_scribbled_raw_blob_is_caught_before_use(store_dir, slot_bytes, arena_path):
    """A raw (int8) blob found in the arena is checked once before the decoder first copies it
    to the GPU: a byte flipped after the store published it is a checksum error, not a wrong
    logit."""
    with colocated(store_dir, arena_path, budget(64, slot_bytes)) as store:
        with StoreClient.open(store.target) as client:
            for e in range(EXPERTS):
                client.fetch_expert(MODEL, 0, e, "int8")
        reader = ArenaReader(arena_path)
        slot = reader.find(MODEL, 0, 1, "int8")
        offset = reader.m.data_offset + slot * reader.slot_bytes + reader.m.word(slot, 3) // 2
        reader.close()
        with open(arena_path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x5A]))
        with Engine.from_store(store.target, MODEL, precision="int8", **KW) as engine:
            with pytest.raises(ValueError, match="seal|checksum"):   # format.BlobError
                engine.provider.fill_host([(0, 1)])


def test_an_arena_full_of_pinned_blobs_is_an_error_then_the_decoder_carries_on(store_dir, slot_bytes,
                                                                             arena_path):
    """Another client leases every slot: a load that needs a slot fails with RESOURCE_EXHAUSTED
    (no hang, no crash); once the pins are gone the same engine computes the right logits."""
    want = reference_logits(store_dir, "int8")
    with colocated(store_dir, arena_path, budget(3, slot_bytes)) as store, \
            StoreClient.open(store.target) as other, \
            Engine.from_store(store.target, MODEL, precision="int8", **KW) as engine:
        pinned = [(1, e, "int8") for e in range(3)]
        other.publish(MODEL, pinned, pin_s=600)
        with pytest.raises(ResourceExhausted, match="full"):
            engine.provider.fill_host([(0, 0)])
        assert other.arena_info().pinned == 3
    # a new store adopts the arena and its blobs (pins are cleared on adoption)
    with colocated(store_dir, arena_path, budget(3, slot_bytes)) as store, \
            Engine.from_store(store.target, MODEL, precision="int8", **KW) as engine:
        torch.testing.assert_close(engine.forward_logits(IDS), want, rtol=0, atol=0)


def test_store_killed_and_restarted_with_another_layout_under_a_running_decoder(store_dir, slot_bytes,
                                                                               arena_path):
    """The store dies: the decoder reads on from the mapped arena. It comes back with another
    layout: it writes a new file and retires the old; the decoder maps the new one and carries on."""
    want = reference_logits(store_dir, "int8")
    first = colocated(store_dir, arena_path, budget(64, slot_bytes))
    port = first.address.rsplit(":", 1)[1]
    try:
        with Engine.from_store(first.target, MODEL, precision="int8", **KW) as engine:
            torch.testing.assert_close(engine.forward_logits(IDS), want, rtol=0, atol=0)
            first.kill()   # SIGKILL: no goodbye
            engine.provider.reset_stats()
            torch.testing.assert_close(engine.forward_logits(IDS), want, rtol=0, atol=0)   # no store at all
            assert engine.provider.stats()["tiers"]["store"]["loads"] == 0
            with colocated(store_dir, arena_path, budget(32, slot_bytes), f"127.0.0.1:{port}"):
                engine.provider.reset_stats()
                torch.testing.assert_close(engine.forward_logits(IDS), want, rtol=0, atol=0)
                assert arena_reads(engine)["remaps"] == 1
                assert engine.provider.stats()["tiers"]["store"]["loads"] > 0   # the new file started empty
                assert engine.client.arena_info().slots == 32
    finally:
        first.kill()


def test_moe_decoder_serve_on_local_shm_and_a_decoder_restart(store_dir, slot_bytes, arena_path):
    """`moe-decoder serve --store local-shm://...` answers Generate with the tokens the store
    directory gives; a restarted decoder process finds every blob mapped and publishes nothing."""
    with Engine.from_store(str(store_dir), MODEL, precision="int8", **KW) as engine:
        want = engine.generate(IDS[:6], max_tokens=8, temperature=0.0, stop_at_eos=False).token_ids
    flags = ("--precision", "int8", "--gpu-cache-bytes", str(KW["gpu_cache_bytes"]), "--host-cache-bytes",
             str(KW["host_cache_bytes"]), "--no-prefetch")
    with colocated(store_dir, arena_path, budget(64, slot_bytes)) as store, \
            StoreClient.open(store.target) as probe:
        publishes = []
        for _ in range(2):
            with ServiceProcess.decoder(store.target, MODEL, *flags) as dec:
                with DecoderClient(dec.address) as client:
                    got = client.generate(IDS[:6], max_tokens=8, temperature=0.0)
                assert list(got.token_ids) == list(want), dec.stderr_text()
            publishes.append(probe.arena_info().publishes)
        assert publishes[0] > 0 and publishes[1] == publishes[0]


def test_fill_host_publishes_into_the_arena_and_reports_its_rate(store_dir, slot_bytes, arena_path):
    """fill_host on a co-located store: the store publishes the keys into its arena (rate in
    fill_stats); int8 needs no host pool (read in place), so host_cache_bytes=0 holds them all."""
    keys = [(l, e) for l in range(LAYERS) for e in range(EXPERTS)]
    with colocated(store_dir, arena_path, budget(64, slot_bytes)) as store, \
            Engine.from_store(store.target, MODEL, precision="int8", gpu_cache_bytes=KW["gpu_cache_bytes"],
                              host_cache_bytes=0, prefetch=False) as engine:
        cache = engine.provider
        assert cache.location(1, 3) == "store"   # not in the arena yet: a miss costs a store fetch
        assert engine.provider.fill_host(keys) == len(keys)
        # in the arena: host memory (what the prefetcher's lookahead and cost-aware gating price)
        assert all(cache.location(l, e) in ("gpu", "host") for l, e in keys)
        assert cache.location(1, 3) == "host"
        fs = engine.provider.host.fill_stats
        assert fs["arena_bytes"] > 0 and fs["arena_gbps"] > 0 and fs["experts"] == len(keys)
        assert engine.client.arena_info().used == len(keys)
        engine.provider.reset_stats()
        engine.forward_logits(IDS)
        tiers = engine.provider.stats()["tiers"]
        assert tiers["store"]["loads"] == 0 and tiers["host"]["misses"] == 0


def test_a_copy_from_a_slot_the_store_replaces_midway_is_redone(store_dir, slot_bytes, arena_path):
    """Deterministic replace-while-reading through the decoder's host tier: halfway through the
    copy of an expert out of the arena, the store reuses its slot for other blobs (a 2-slot
    arena, another client asking for two more). The copy it made is torn; the lease check after
    the copy says so, and the load copies again from the blob's new place: the bytes it ends
    with are the expert's."""
    with StoreClient.open(str(store_dir)) as local:
        from expert_store import format as blob_format

        _, raw = blob_format.decode_raw(local.fetch_expert(MODEL, 0, 1, "int8"))
        want = bytes(raw)
    with colocated(store_dir, arena_path, budget(2, slot_bytes)) as store, \
            StoreClient.open(store.target) as other, \
            Engine.from_store(store.target, MODEL, precision="int8", gpu_cache_bytes=KW["gpu_cache_bytes"],
                              host_cache_bytes=0, prefetch=False) as engine:
        host = engine.provider.host
        copies: list[bytes] = []

        def copy(h) -> None:
            src = host.payload(h)
            half = src.numel() // 2
            first = src[:half].numpy().tobytes()
            if not copies:   # the first attempt: the store takes the slot over now
                other.fetch_expert(MODEL, 1, 0, "int8")
                other.fetch_expert(MODEL, 1, 1, "int8")
            copies.append(first + src[half:].numpy().tobytes())
            host.copied(h, None)

        host.load(0, 1, "demand", copy)
        assert len(copies) == 2
        assert copies[0] != want   # torn: its second half is another blob's
        assert copies[1] == want
        assert arena_reads(engine)["torn"] >= 1


def test_a_serving_decoder_rides_out_a_store_restart_with_another_layout(store_dir, slot_bytes, arena_path):
    """`moe-decoder serve` on local-shm:// answers requests in a loop while its co-located store
    is killed and started again with another layout (a new arena file): every request completes
    with the right tokens, the decoder process never exits, and it maps the new file."""
    import threading

    with Engine.from_store(str(store_dir), MODEL, precision="int8", **KW) as engine:
        want = engine.generate(IDS[:6], max_tokens=6, temperature=0.0, stop_at_eos=False).token_ids
    flags = ("--precision", "int8", "--gpu-cache-bytes", str(KW["gpu_cache_bytes"]), "--host-cache-bytes", "0",
             "--no-prefetch")
    first = colocated(store_dir, arena_path, budget(6, slot_bytes))   # fewer slots than experts: misses go on
    port = first.address.rsplit(":", 1)[1]
    results: list = []
    stop = threading.Event()
    try:
        with ServiceProcess.decoder(first.target, MODEL, *flags) as dec:
            def ask() -> None:
                with DecoderClient(dec.address) as client:
                    while not stop.is_set():
                        try:
                            results.append(list(client.generate(IDS[:6], max_tokens=6, temperature=0.0).token_ids))
                        except Exception as e:  # noqa: BLE001 - recorded, asserted below
                            results.append(e)

            asker = threading.Thread(target=ask)
            asker.start()
            try:
                while len(results) < 2:
                    asker.join(0.05)
                first.kill()
                n = len(results)
                with colocated(store_dir, arena_path, budget(5, slot_bytes), f"127.0.0.1:{port}") as second:
                    while len(results) < n + 3:
                        asker.join(0.05)
                        assert dec.running(), dec.stderr_text()
                    stop.set()
                    asker.join(120)   # the last request finishes while the store is up
                    with StoreClient.open(second.target) as probe:
                        assert probe.arena_info().slots == 5 and probe.arena_info().publishes > 0
            finally:
                stop.set()
                asker.join(120)
            assert dec.running(), dec.stderr_text()
    finally:
        first.kill()
    assert results and all(r == list(want) for r in results), [r for r in results if r != list(want)][:3]


def test_bf16_published_raw_goes_from_the_arena_to_the_gpu_as_it_lies(store_dir, arena_path):
    """`--publish raw`: the store joins a bf16 blob's byte planes once as it publishes it (codec
    none, a new seal), so the decoder reads it in place like an int8 one (nothing decoded into
    the host pool); logits equal the store directory's; the port's ExpertStore face still serves
    the blob as stored."""
    from expert_store import format as blob_format
    from expert_store.arena_publisher import raw_slot_bytes

    want = reference_logits(store_dir, "bf16")
    with StoreClient.open(str(store_dir)) as local:
        m = local.manifest(MODEL)
        sb = raw_slot_bytes(local, [m], ["bf16"])
        stored = bytes(local.fetch_expert(MODEL, 1, 2, "bf16"))
    assert blob_format.read_header(stored)[0].codec != "none"
    with colocated(store_dir, arena_path, budget(64, sb), "127.0.0.1:0", "--publish", "raw",
                   "--precisions", "bf16") as store, \
            Engine.from_store(store.target, MODEL, precision="bf16", **KW) as engine:
        torch.testing.assert_close(engine.forward_logits(IDS), want, rtol=0, atol=0)
        assert not engine.provider.host.entries   # read in place, as raw payloads are
        assert engine.client.arena_info().slot_bytes == sb
        published = bytes(engine.client.fetch_expert(MODEL, 1, 2, "bf16"))   # what the arena holds
        header, raw = blob_format.decode_raw(published)
        assert header.codec == "none" and bytes(raw) == bytes(blob_format.decode_raw(stored)[1])
        with StoreClient.open(f"grpc://{store.address}") as grpc_client:
            assert bytes(grpc_client.fetch_expert(MODEL, 1, 2, "bf16")) == stored


def test_arena_pins_the_blobs_a_decoder_copies_while_the_arena_holds_the_model(store_dir, slot_bytes, arena_path):
    """host_tier.ArenaPins against a real co-located store: the blobs it is asked for get pinned
    (the lease shows it; a copy from them then needs no check after it ends) while the arena
    has a slot for every expert of the model; with a smaller arena it pins nothing."""
    import time

    from decoder.experts.host_tier import PIN_MARGIN_S, PIN_S, ArenaPins

    def settle(pins, done):
        assert wait_until(lambda: done(pins.stats()), 60)
        return pins.stats()

    n_model = LAYERS * EXPERTS
    with colocated(store_dir, arena_path, budget(n_model, slot_bytes)) as store, \
            StoreClient.open(store.target) as client:
        client.publish(MODEL, [(l, e, "int8") for l in range(LAYERS) for e in range(EXPERTS)])
        before = client.lease(MODEL, 0, 3, "int8")[0]
        assert not client.pinned_past(before, PIN_MARGIN_S)
        pins = ArenaPins(client, MODEL, "int8", n_model)
        try:
            pins.want((0, 3))
            pins.want((1, 5))
            st = settle(pins, lambda st: st["pin_requests"] + st["pin_errors"] >= 2)
            assert st["pinning"] and st["pin_requests"] == 2 and st["pin_errors"] == 0
            for l, e in ((0, 3), (1, 5)):
                lease = client.lease(MODEL, l, e, "int8")[0]
                assert lease.pinned_until > time.monotonic_ns() + (PIN_S - 30) * 1e9
                assert client.pinned_past(lease, PIN_MARGIN_S)
            assert not client.pinned_past(client.lease(MODEL, 0, 4, "int8")[0], PIN_MARGIN_S)
            assert client.arena_info().pinned == 2
        finally:
            pins.close()
    arena_path.unlink()
    with colocated(store_dir, arena_path, budget(4, slot_bytes)) as store, \
            StoreClient.open(store.target) as client:
        client.publish(MODEL, [(0, e, "int8") for e in range(4)])
        pins = ArenaPins(client, MODEL, "int8", n_model)
        try:
            pins.want((0, 1))
            st = settle(pins, lambda st: st["batches"] >= 1)
            assert st["pinning"] is False and st["pin_requests"] == 0
            assert client.arena_info().pinned == 0
        finally:
            pins.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_from_pinned_arena_blobs_are_not_waited_for_and_give_the_same_logits(store_dir, slot_bytes,
                                                                                       arena_path):
    """On CUDA with an arena holding the whole model: the first pass waits for and checks its
    copies and pins their blobs; once pinned, copies count as loaded when issued; every pass
    gives the store directory's logits (the same CUDA kernels)."""
    fp32_slot = 3 * 64 * 96 * 4   # an int8 expert dequantized into an fp32 slot (hidden 64, ffn 96)
    kw = dict(KW, device="cuda", dtype=torch.float32, gpu_cache_bytes=(3 * LAYERS + 2) * fp32_slot)
    with Engine.from_store(str(store_dir), MODEL, precision="int8", **kw) as engine:
        want = engine.forward_logits(IDS)
    with colocated(store_dir, arena_path, budget(LAYERS * EXPERTS, slot_bytes)) as store, \
            Engine.from_store(store.target, MODEL, precision="int8", **kw) as engine:
        torch.testing.assert_close(engine.forward_logits(IDS), want, rtol=0, atol=0)
        pins = engine.provider.host.pins
        assert pins is not None
        assert wait_until(lambda: pins.stats()["pin_requests"] > 0, 60)
        for _ in range(3):   # the GPU tier holds 3 of 8 experts per layer: the arena is read again
            torch.testing.assert_close(engine.forward_logits(IDS), want, rtol=0, atol=0)
        st = engine.stats()["provider"]["arena_copies"]
        assert st["pinning"] and st["pinned_copies"] > 0 and st["checked_copies"] > 0
        assert arena_reads(engine)["torn"] == 0
