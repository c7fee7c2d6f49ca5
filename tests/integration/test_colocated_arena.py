"""The co-located path end to end on the CPU: a real `expert-store colocate` process publishing
into a shared-memory arena (a file under /dev/shm), readers in this and other processes
mapping it (`local-shm://PATH?control=HOST:PORT`), and the decoder on top.

Covers: publish, map, read (bytes equal the store's; a second read costs no call); replace
while reading (a reader in another process never returns a torn copy); corruption caught
(upstream bytes that fail the manifest's xxh3 -> DATA_LOSS, nothing published; arena bytes
scribbled after publishing -> DataLoss with verify=1, and the decoder's own payload check);
a full arena (every slot pinned -> RESOURCE_EXHAUSTED; unpinned -> LRU eviction that readers
survive); a store restart (same layout: the arena is adopted with its blobs; another layout:
the old file is retired and the reader maps the new one; no reader crashes); a decoder restart
(a new process reads what the old one had published, with no call); a path that is not the
store's arena (FAILED_PRECONDITION).
"""

from __future__ import annotations

import multiprocessing
import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest

from service_procs import child_env, cli, moe_decoder, pack_tiny_model

from expert_store._proto.adapmoe.v1 import expert_arena_pb2 as apb
from expert_store._proto.adapmoe.v1 import expert_arena_pb2_grpc as apb_grpc
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store.arena_client import ArenaStoreClient, parse_target
from expert_store.client import StoreClient
from expert_store.colocate import ColocatedStore
from expert_store.errors import DataLoss, InvalidArgument, ResourceExhausted, StoreError
from expert_store.shm_arena import ArenaReader, ArenaWriter

MODEL = "tiny"
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return pack_tiny_model(tmp_path_factory.mktemp("colocated"), MODEL, layers=2, experts=4)


@pytest.fixture(scope="module")
def blobs(store_dir):
    """{ref: the store's bytes} for every blob of the model."""
    with StoreClient.open(str(store_dir)) as c:
        m = c.manifest(MODEL)
        return {ref: bytes(c.fetch_expert(MODEL, *ref)) for ref in sorted(m.blobs)}


@pytest.fixture
def arena_path(tmp_path):
    """A fresh arena path on /dev/shm when it has room (a container's default is 64 MiB), else
    in tmp_path (the arena works on any filesystem)."""
    base = SHM if SHM is not None and shutil.disk_usage(SHM).free > (64 << 20) else tmp_path
    path = base / f"adapmoe-test-{uuid.uuid4().hex[:12]}.arena"
    yield path
    for p in (path, *base.glob(path.name + ".new-*")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def slot_bytes(blobs) -> int:
    return -(-max(len(b) for b in blobs.values()) // 4096) * 4096


class Colocated(ColocatedStore):
    """`expert-store colocate` as a child process (expert_store.colocate.ColocatedStore)."""

    def __init__(self, upstream: Path, arena: Path, arena_bytes: int, listen: str = "127.0.0.1:0",
                 *extra: str) -> None:
        super().__init__(str(upstream), str(arena), arena_bytes, MODEL, listen=listen, extra=extra, env=child_env())

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def target(self, path: Path, verify: bool = False) -> str:
        return f"local-shm://{path}?control={self.address}" + ("&verify=1" if verify else "")

    def stub(self) -> tuple[grpc.Channel, apb_grpc.ExpertArenaStub]:
        ch = grpc.insecure_channel(self.address)
        return ch, apb_grpc.ExpertArenaStub(ch)


# ---- publish, map, read ---------------------------------------------------------------------


def test_publish_map_read_and_second_read_costs_no_call(store_dir, blobs, arena_path):
    with Colocated(store_dir, arena_path, 64 * slot_bytes(blobs)) as store, \
            StoreClient.open(store.target(arena_path)) as client:
        assert isinstance(client, ArenaStoreClient)
        for ref, want in blobs.items():
            assert bytes(client.fetch_expert(MODEL, *ref)) == want
        ensures = client.counts["ensures"]
        assert ensures == len(blobs)
        buf = bytearray(slot_bytes(blobs))
        for ref, want in blobs.items():   # mapped: straight out of the arena, no call
            got = client.fetch_expert(MODEL, *ref, out=buf)
            assert bytes(got) == want
        assert client.counts["ensures"] == ensures
        assert dict(client.fetch_experts(MODEL, list(blobs))) == blobs
        info = client.arena_info()
        assert (info.used, info.misses, info.data_loss) == (len(blobs), len(blobs), 0)
        assert client.manifest(MODEL).blobs.keys() == blobs.keys()
        with StoreClient.open(str(store_dir)) as local:
            assert bytes(client.fetch_dense(MODEL)) == bytes(local.fetch_dense(MODEL))
        # the same port serves ExpertStore: a plain gRPC client reads through the arena too
        with StoreClient.open(f"grpc://{store.address}") as grpc_client:
            ref = next(iter(blobs))
            assert bytes(grpc_client.fetch_expert(MODEL, *ref)) == blobs[ref]


def test_engine_over_the_arena_matches_the_store(store_dir, blobs, arena_path):
    """The decoder's host tier fills from local-shm:// (fetch into its host slots) and computes
    the same logits as from the store directory; `moe-decoder generate` runs on it."""
    import torch

    from decoder.engine import Engine

    kw = dict(gpu_cache_bytes=200_000, host_cache_bytes=260_000, prefetch=False)   # ~5 and ~6 of 8 experts
    ids = list(range(3, 40))
    with Engine.from_store(str(store_dir), MODEL, **kw) as ref_engine:
        want = ref_engine.forward_logits(ids)
    with Colocated(store_dir, arena_path, 64 * slot_bytes(blobs)) as store:
        with Engine.from_store(store.target(arena_path), MODEL, **kw) as engine:
            got = engine.forward_logits(ids)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        r = moe_decoder("generate", "--store", store.target(arena_path), "--model", MODEL, "--prompt", "Hello",
                        "--max-tokens", "4", "--host-cache-bytes", "260000", "--gpu-cache-bytes", "200000")
        assert r.returncode == 0, r.stderr
        assert "decode tokens/s" in r.stdout


# ---- replace while reading ------------------------------------------------------------------


def _pattern(i: int, n: int) -> bytes:
    return i.to_bytes(8, "little") + bytes([i % 251]) * (n - 8)


def _read_until_done(path: str, n: int, done, results) -> None:
    """A reader process: reads the one blob until `done`, then once more; reports what it saw."""
    reader = ArenaReader(path)
    good = bad = 0
    buf = bytearray(n)
    final = False
    while True:
        last = done.is_set()
        got = reader.read(MODEL, 0, 0, "bf16", out=buf)
        if got is not None:
            i = int.from_bytes(got[:8], "little")
            if len(got) == n and bytes(got) == _pattern(i, n):
                good += 1
            else:
                bad += 1
            final = last
        if last and final:
            break
    results.put((good, bad, reader.counts["torn"]))
    reader.close()


def test_replace_while_reading_is_never_torn(arena_path):
    """One writer republishes one blob 300 times with different bytes while a reader process
    copies it in a loop: every copy it returns is one whole generation's bytes."""
    n = 4 << 20   # big enough that a copy spans many writes
    writer = ArenaWriter.open(arena_path, 4 * n + (1 << 20), n)
    ctx = multiprocessing.get_context("spawn")
    done, results = ctx.Event(), ctx.Queue()

    def publish(i: int) -> None:
        view = writer.begin(0)
        view[:n] = _pattern(i, n)
        writer.commit(0, MODEL, 0, 0, "bf16", n, b"\0" * 16, time.monotonic_ns())

    publish(0)
    reader = ctx.Process(target=_read_until_done, args=(str(arena_path), n, done, results))
    reader.start()
    try:
        rng = random.Random(14)
        for i in range(1, 300):
            time.sleep(rng.uniform(0, 0.002))   # reads start between writes too, and writes start mid-copy
            publish(i)
        done.set()
        good, bad, torn = results.get(timeout=120)
    finally:
        reader.join(30)
        if reader.is_alive():
            reader.kill()
        writer.close()
    assert bad == 0
    assert good >= 1


# ---- corruption -------------------------------------------------------------------------------


def test_corrupt_upstream_blob_is_data_loss_and_not_published(tmp_path, blobs, arena_path):
    store = pack_tiny_model(tmp_path / "m", MODEL, layers=2, experts=4)
    victim = next(store.rglob("E001.bf16.blob"))   # layer 0 or 1, expert 1
    layer = int(victim.parent.name[1:])
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with Colocated(store, arena_path, 64 * slot_bytes(blobs)) as srv:
        ch, stub = srv.stub()
        with ch:
            with pytest.raises(grpc.RpcError) as e:
                stub.Ensure(apb.EnsureRequest(
                    model=MODEL, refs=[pb.ExpertRef(layer=layer, expert=1, precision="bf16")]), timeout=30)
            assert e.value.code() == grpc.StatusCode.DATA_LOSS
            with pytest.raises(grpc.RpcError) as e:   # an unknown ref is NOT_FOUND
                stub.Ensure(apb.EnsureRequest(model=MODEL, refs=[pb.ExpertRef(layer=0, expert=99, precision="bf16")]),
                            timeout=30)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            info = stub.DescribeArena(apb.DescribeArenaRequest(), timeout=30)
            assert info.used == 0 and info.publishes == 0
        with StoreClient.open(srv.target(arena_path)) as client:
            with pytest.raises(StoreError) as err:
                client.fetch_expert(MODEL, layer, 1, "bf16")
            assert err.value.code == "DATA_LOSS"
            assert bytes(client.fetch_expert(MODEL, layer, 0, "bf16")) == blobs[(layer, 0, "bf16")]


def test_scribbled_arena_bytes_are_caught(store_dir, blobs, arena_path):
    from decoder.engine import Engine

    with Colocated(store_dir, arena_path, 64 * slot_bytes(blobs)) as store:
        with StoreClient.open(store.target(arena_path)) as client:
            for ref in blobs:
                client.fetch_expert(MODEL, *ref)
        _scribble(arena_path, (0, 0, "bf16"))
        with StoreClient.open(store.target(arena_path, verify=True)) as checked:
            with pytest.raises(DataLoss):
                checked.fetch_expert(MODEL, 0, 0, "bf16")
            assert bytes(checked.fetch_expert(MODEL, 0, 1, "bf16")) == blobs[(0, 1, "bf16")]
        # without verify=1 the decoder's host tier checks the payload as it decodes it
        with Engine.from_store(store.target(arena_path), MODEL, gpu_cache_bytes=200_000,
                               host_cache_bytes=260_000, prefetch=False) as engine:
            with pytest.raises(ValueError, match="seal|checksum"):   # format.BlobError
                engine.provider.fill_host([(0, 0)])


def _scribble(path: Path, ref: tuple[int, int, str]) -> None:
    """Flip one byte in the middle of a published blob (what bit rot or a stray write does)."""
    reader = ArenaReader(path)
    slot = reader.find(MODEL, *ref)
    assert slot is not None
    offset = reader.m.data_offset + slot * reader.slot_bytes + reader.m.word(slot, 3) // 2
    reader.close()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


# ---- a full arena -----------------------------------------------------------------------------


def test_arena_full_of_pinned_blobs_is_resource_exhausted_and_lru_evicts_otherwise(store_dir, blobs, arena_path):
    refs = list(blobs)
    sb = slot_bytes(blobs)
    with Colocated(store_dir, arena_path, 3 * (sb + 256) + 8192) as store, \
            StoreClient.open(store.target(arena_path)) as client:
        assert client.arena_info().slots == 3
        # unpinned: more blobs than slots cycle through by LRU, every read whole
        for _ in range(2):
            for ref in refs:
                assert bytes(client.fetch_expert(MODEL, *ref)) == blobs[ref]
        info = client.arena_info()
        assert info.evictions >= len(refs) and info.used == 3
        # pinned: three leases hold every slot, a fourth blob has nowhere to go
        client.publish(MODEL, refs[:3], pin_s=600)
        with pytest.raises(ResourceExhausted, match="full"):
            client.fetch_expert(MODEL, *refs[3])
        assert client.arena_info().pinned == 3
        for ref in refs[:3]:   # the pinned ones still read
            assert bytes(client.fetch_expert(MODEL, *ref)) == blobs[ref]
        ch, stub = store.stub()
        with ch:
            with pytest.raises(grpc.RpcError) as e:   # more refs than slots in one call
                stub.Ensure(apb.EnsureRequest(model=MODEL, refs=[
                    pb.ExpertRef(layer=l, expert=x, precision=p) for l, x, p in refs[:4]]), timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- restarts ---------------------------------------------------------------------------------


def test_store_restart_adopts_or_retires_the_arena_and_the_reader_carries_on(store_dir, blobs, arena_path):
    refs = list(blobs)
    sb = slot_bytes(blobs)
    first = Colocated(store_dir, arena_path, 64 * sb)
    port = first.port
    client = StoreClient.open(first.target(arena_path))
    try:
        for ref in refs[:4]:
            client.fetch_expert(MODEL, *ref)
        epoch = client.arena_info().epoch
        first.kill()   # a crash: no goodbye
        for ref in refs[:4]:   # the published blobs are still mapped and read with no store
            assert bytes(client.fetch_expert(MODEL, *ref)) == blobs[ref]
        with Colocated(store_dir, arena_path, 64 * sb, f"127.0.0.1:{port}") as second:
            info = client.arena_info()
            assert info.epoch != epoch and info.used == 4   # same layout: adopted, its blobs verified and kept
            for ref in refs:
                assert bytes(client.fetch_expert(MODEL, *ref)) == blobs[ref]
            assert second.proc.poll() is None
        with Colocated(store_dir, arena_path, 32 * sb, f"127.0.0.1:{port}"):   # another layout: a new file
            for ref in refs:
                assert bytes(client.fetch_expert(MODEL, *ref)) == blobs[ref]
            assert client.stat()["arena"]["reader"]["remaps"] == 1
            assert client.arena_info().slots == client._reader.slots
    finally:
        client.close()
        first.kill()


def _read_without_calls(target: str, refs, results) -> None:
    client = StoreClient.open(target)
    try:
        results.put(({ref: bytes(client.fetch_expert(MODEL, *ref)) for ref in refs}, client.counts["ensures"]))
    finally:
        client.close()


def test_decoder_restart_reads_what_was_published_without_a_call(store_dir, blobs, arena_path):
    refs = list(blobs)[:5]
    ctx = multiprocessing.get_context("spawn")
    with Colocated(store_dir, arena_path, 64 * slot_bytes(blobs)) as store:
        for run in range(2):   # the first decoder process publishes, the second finds them mapped
            results = ctx.Queue()
            p = ctx.Process(target=_read_without_calls, args=(store.target(arena_path), refs, results))
            p.start()
            got, ensures = results.get(timeout=120)
            p.join(30)
            assert got == {ref: blobs[ref] for ref in refs}
            assert ensures == (len(refs) if run == 0 else 0)


def test_a_path_that_is_not_the_stores_arena_is_failed_precondition(store_dir, blobs, arena_path, tmp_path):
    other = arena_path.with_name(arena_path.name + ".other")
    ArenaWriter.open(other, 8 * slot_bytes(blobs), slot_bytes(blobs)).close()
    try:
        with Colocated(store_dir, arena_path, 64 * slot_bytes(blobs)) as store, \
                StoreClient.open(f"local-shm://{other}?control={store.address}") as client:
            with pytest.raises(StoreError, match="not the arena") as e:
                client.fetch_expert(MODEL, 0, 0, "bf16")
            assert e.value.code == "FAILED_PRECONDITION"
    finally:
        other.unlink()


def test_target_parsing():
    assert parse_target("local-shm:///dev/shm/a.arena?control=127.0.0.1:50061") == \
        ("/dev/shm/a.arena", "127.0.0.1:50061", False)
    assert parse_target("local-shm:///x?control=h:1&verify=1")[2] is True
    for bad in ("local-shm:///x", "local-shm://?control=h:1", "local-shm:///x?control=nope",
                "local-shm:///x?control=h:1&colour=red", "local-shm:///x?control=h:1&verify=yes"):
        with pytest.raises(InvalidArgument):
            parse_target(bad)
    with pytest.raises(InvalidArgument, match="no TLS"):   # never silently plaintext
        StoreClient.open("local-shm:///x?control=127.0.0.1:1", tls_ca=b"pem")


def test_waits_for_its_model_live_but_not_ready_then_serves(tmp_path, arena_path):
    """Started before the model is packed (a pod before the pack Job): liveness SERVING,
    readiness NOT_SERVING and Ensure UNAVAILABLE; once the model is in the upstream, SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from checkpoints import make_mixtral_checkpoint
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    store = pack_tiny_model(tmp_path / "m", MODEL, layers=2, experts=4)
    argv = cli("expert-store") + ["colocate", "--upstream", str(store), "--arena", str(arena_path),
                                  "--arena-bytes", "4M", "--model", "late", "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), (line, proc.stderr.read() if proc.poll() is not None else "")
        address = line.split()[-1]
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def status(service: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

            assert status("liveness") == health_pb2.HealthCheckResponse.SERVING
            assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                apb_grpc.ExpertArenaStub(ch).Ensure(apb.EnsureRequest(
                    model="late", refs=[pb.ExpertRef(layer=0, expert=0, precision="bf16")]), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "waiting for late" in e.value.details()
            ckpt, _ = make_mixtral_checkpoint(tmp_path / "late-ckpt", hidden=64, ffn=96, layers=2, experts=4, seed=5)
            pack_checkpoint(ckpt, NvmeTier(store), model="late", precisions=("bf16",), progress=False)
            end = time.monotonic() + 60
            while status("") != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < end:
                time.sleep(0.1)
            assert status("") == health_pb2.HealthCheckResponse.SERVING
            reply = apb_grpc.ExpertArenaStub(ch).Ensure(apb.EnsureRequest(
                model="late", refs=[pb.ExpertRef(layer=1, expert=3, precision="bf16")]), timeout=30)
            assert reply.blobs[0].size > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("slots", [64, 5])
def test_prefill_publishes_the_model_up_to_the_arenas_size(store_dir, blobs, arena_path, slots):
    """--prefill bf16: a cold fill at prefetch priority after the arena is up (the store is
    ready before it ends); it publishes at most as many blobs as there are slots, never cycling
    the arena through itself."""
    sb = slot_bytes(blobs)
    budget = slots * (sb + 256) + 8192
    with Colocated(store_dir, arena_path, budget, "127.0.0.1:0", "--prefill", "bf16") as store, \
            StoreClient.open(store.target(arena_path)) as client:
        ref = list(blobs)[-1]
        assert bytes(client.fetch_expert(MODEL, *ref)) == blobs[ref]   # demand, while it fills
        capacity = client.arena_info().slots
        want = min(capacity, len(blobs))
        end = time.monotonic() + 120
        while client.arena_info().used < want and time.monotonic() < end:
            time.sleep(0.1)
        info = client.arena_info()
        assert info.used == want
        if capacity >= len(blobs):
            assert info.evictions == 0
            ensures = client.counts["ensures"]
            assert dict(client.fetch_experts(MODEL, list(blobs))) == blobs
            assert client.counts["ensures"] == ensures   # all of it was there already
