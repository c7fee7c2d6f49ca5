"""FetchPool on loopback against a real `expert-store serve --workers 2`: bytes identical to
single-client fetches, demand ahead of queued prefetches, a worker SIGKILLed mid-fetch (the
request completes on another worker), store errors surface as StoreErrors, and close()
leaves no shared-memory segment and no worker process behind."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
import xxhash

from service_procs import StoreServerProcess

from expert_store import format as blob_format
from expert_store.client import StoreClient
from expert_store.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from expert_store.fetch_pool import Completion, FetchPool
from expert_store.quant import expert_to_blob
from expert_store.store import ModelStore

pytestmark = pytest.mark.timeout(180)
MODEL = "pool"
LAYERS, EXPERTS, HIDDEN = 2, 4, 128


def build(root: Path, codec: str = "auto") -> dict:
    """Random experts at two precisions, of different sizes (ffn varies by expert); `codec`
    "none": bf16 blobs stored uncoded (`expert-store pack --codec none`)."""
    store = ModelStore.open(root, ram_bytes=0)

    def put(kind: str, data: bytes, **ref) -> None:
        store.put_file(MODEL, kind, data, xxhash.xxh3_128_hexdigest(data), **ref)

    put("config", json.dumps({"num_hidden_layers": LAYERS, "num_local_experts": EXPERTS, "hidden_size": HIDDEN,
                              "intermediate_size": 512}).encode())
    g = torch.Generator().manual_seed(1)
    blobs = {}
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            ffn = 256 + 64 * expert
            w = {"w1": torch.randn(ffn, HIDDEN, generator=g), "w3": torch.randn(ffn, HIDDEN, generator=g),
                 "w2": torch.randn(HIDDEN, ffn, generator=g)}
            for precision in ("bf16", "int8"):
                blob = expert_to_blob(MODEL, layer, expert, precision, w, codec=codec)
                put("expert", blob, layer=layer, expert=expert, precision=precision)
                blobs[(layer, expert, precision)] = blob
    put("manifest", json.dumps({
        "model": MODEL, "num_layers": LAYERS, "num_experts": EXPERTS, "precisions": ["bf16", "int8"],
        "blobs": [{"layer": l, "expert": e, "precision": p, "size": len(b), "xxh3": blob_format.blob_checksum(b)}
                  for (l, e, p), b in blobs.items()]}).encode())
    store.close()
    return blobs


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool") / "store"
    return root, build(root)


def corrupted_copy(root: Path, dest: Path, ref: tuple[int, int, str]) -> Path:
    """A copy of the store at `root` in `dest` with one byte of `ref`'s blob flipped."""
    import shutil

    shutil.copytree(root, dest)
    path = dest / "models" / blob_format.expert_key(MODEL, *ref)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    return dest


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name.lstrip('/')}")


def assert_cleaned_up(pool: FetchPool) -> None:
    assert not shm_exists(pool.shm_name)
    deadline = time.monotonic() + 10
    alive = [p for p in pool.all_worker_pids if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"worker processes left behind: {alive}"


def test_bytes_identical_to_single_client_fetches(store_dir, tmp_path):
    root, blobs = store_dir
    with StoreServerProcess(root, "--workers", "2", log_dir=tmp_path) as server:
        with StoreClient.open(server.address, deadline_s=30) as client:
            single = {ref: bytes(client.fetch_expert(MODEL, *ref)) for ref in blobs}
        assert single == blobs
        before = set(os.listdir("/dev/shm"))
        pool = FetchPool(server.address, MODEL, workers=2, slots=len(blobs))
        try:
            assert shm_exists(pool.shm_name)
            assert len(pool.worker_pids()) == 2
            futures = {ref: pool.submit(*ref, priority="prefetch" if ref[1] % 2 else "demand") for ref in blobs}
            arena = pool.numpy()
            tensor = pool.tensor()
            assert tensor.shape == (pool.slots, pool.slot_bytes) and pool.pin() is torch.cuda.is_available()
            workers_used = set()
            for ref, fut in futures.items():
                c = fut.result(timeout=60)
                assert isinstance(c, Completion) and c.ref == ref and c.size == len(blobs[ref])
                assert c.offset == pool.slot_offset(c.slot) and c.offset % 4096 == 0
                assert bytes(pool.arena[c.offset:c.offset + c.size]) == single[ref]
                assert arena[c.slot, :c.size].tobytes() == single[ref]
                assert bytes(tensor[c.slot, :c.size].numpy()) == single[ref]
                workers_used.add(c.worker_pid)
            assert len({f.result().slot for f in futures.values()}) == len(blobs)
            assert workers_used <= set(pool.all_worker_pids) and len(workers_used) == 2
            assert pool.free_slots() == 0
            with pytest.raises(ResourceExhausted):
                pool.submit(0, 0, "bf16")
            # a slot given back is reused; a caller-managed slot is written where asked
            first = futures[(0, 0, "bf16")].result()
            pool.release(first.slot)
            c = pool.submit(1, 3, "int8").result(timeout=60)
            assert c.slot == first.slot and bytes(pool.arena[c.offset:c.offset + c.size]) == single[(1, 3, "int8")]
            c = pool.submit(0, 2, "bf16", slot=c.slot).result(timeout=60)
            assert bytes(pool.arena[c.offset:c.offset + c.size]) == single[(0, 2, "bf16")]
            with pytest.raises(NotFound):
                pool.submit(0, 0, "int4")
            with pytest.raises(InvalidArgument):
                pool.submit(0, 0, "bf16", priority="urgent")
            del arena, tensor
            st = pool.stats()
            assert st["completed"] == len(blobs) + 2 and st["failed"] == 0 and st["worker_restarts"] == 0
        finally:
            pool.close()
        assert_cleaned_up(pool)
        assert set(os.listdir("/dev/shm")) <= before
        with pytest.raises(Unavailable):
            pool.submit(0, 0, "bf16")


def test_demand_goes_ahead_of_queued_prefetches(store_dir, tmp_path):
    root, blobs = store_dir
    with StoreServerProcess(root, "--workers", "2", "--inject-latency-ms", "150", log_dir=tmp_path) as server, \
            FetchPool(server.address, MODEL, workers=2, slots=len(blobs)) as pool:
        order: list[tuple[int, int, str]] = []
        prefetch_refs = [r for r in blobs if r != (1, 3, "bf16")]
        futures = [pool.submit(*r, priority="prefetch") for r in prefetch_refs]
        for f in futures:
            f.add_done_callback(lambda f: order.append(f.result().ref))
        time.sleep(0.05)  # the first prefetches are on the wire
        demand = pool.submit(1, 3, "bf16", priority="demand")
        # prefetches done by now finished before the demand existed (on a loaded machine the
        # sleep above can outlast a fetch); the demand may only wait for these and for the
        # ones on the wire when it was submitted (one per worker), never for a queued one
        done_before = len(order)
        demand.add_done_callback(lambda f: order.append(f.result().ref))
        c = demand.result(timeout=60)
        assert bytes(pool.arena[c.offset:c.offset + c.size]) == blobs[(1, 3, "bf16")]
        for f in futures:
            f.result(timeout=60)
        # the demand takes the first worker that frees up, ahead of every queued prefetch; so
        # only the prefetches on the wire when it was submitted (one per worker: 2) and the one
        # the other worker picks up while the demand is in flight (1) may finish before it.
        # In FIFO order it would finish last (index 15).
        assert order.index((1, 3, "bf16")) <= done_before + 3, (done_before, order)
        assert done_before + 3 < len(prefetch_refs) - 1, "the demand found no queued prefetch to overtake"
        assert len(order) == len(blobs)
        # a prefetch still queued can be cancelled; its slot goes back
        for f in futures:
            pool.release(f.result().slot)
        pool.release(c.slot)
        assert pool.free_slots() == pool.slots
        queued = [pool.submit(*r, priority="prefetch") for r in prefetch_refs[:6]]
        assert queued[-1].cancel()
        for f in queued[:-1]:
            f.result(timeout=60)
        deadline = time.monotonic() + 10
        while pool.free_slots() != pool.slots - 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.free_slots() == pool.slots - 5
    assert_cleaned_up(pool)


def test_worker_killed_mid_fetch_request_completes_on_another(store_dir, tmp_path):
    root, blobs = store_dir
    ref = (1, 2, "bf16")
    with StoreServerProcess(root, "--workers", "2", "--inject-latency-ms", "1500", log_dir=tmp_path) as server:
        pool = FetchPool(server.address, MODEL, workers=2, slots=4)
        try:
            fut = pool.submit(*ref, priority="demand")
            deadline = time.monotonic() + 20
            victim = None
            while victim is None and time.monotonic() < deadline:
                victim = next((pid for pid, r in pool.inflight().items() if r == ref), None)
                time.sleep(0.01)
            assert victim is not None
            time.sleep(0.3)  # the fetch is under way (the server holds it 1.5 s)
            os.kill(victim, signal.SIGKILL)
            c = fut.result(timeout=60)
            assert c.worker_pid != victim and c.attempts == 2
            assert bytes(pool.arena[c.offset:c.offset + c.size]) == blobs[ref]
            st = pool.stats()
            assert st["retried"] == 1 and st["worker_restarts"] == 1
            # the replacement worker serves too: the pool is back at two workers
            deadline = time.monotonic() + 30
            while len(pool.worker_pids()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(pool.worker_pids()) == 2 and victim not in pool.worker_pids()
            more = [pool.submit(0, e, "int8") for e in range(2)]
            for f, e in zip(more, range(2)):
                got = f.result(timeout=60)
                assert bytes(pool.arena[got.offset:got.offset + got.size]) == blobs[(0, e, "int8")]
            assert len(pool.all_worker_pids) == 3
        finally:
            pool.close()
        assert_cleaned_up(pool)


def test_local_store_directory_and_a_store_error(store_dir, tmp_path):
    """Workers can read a store directory in-process too; a blob that fails its check is a
    DataLoss on its Future, not bytes."""
    root, blobs = store_dir
    bad = corrupted_copy(root, tmp_path / "bad", (0, 1, "int8"))
    from expert_store.errors import DataLoss

    with FetchPool(str(bad), MODEL, workers=1, arena_bytes=4 << 20) as pool:
        good = pool.submit(0, 0, "int8").result(timeout=60)
        assert bytes(pool.arena[good.offset:good.offset + good.size]) == blobs[(0, 0, "int8")]
        with pytest.raises(DataLoss):
            pool.submit(0, 1, "int8").result(timeout=60)
        assert pool.free_slots() == pool.slots - 1  # the failed request gave its slot back
    assert_cleaned_up(pool)


def test_raw_mode_decodes_coded_bf16_blobs_in_the_workers(store_dir, tmp_path):
    """raw=True: a coded bf16 blob lands in its slot with codec none, the same raw payload
    (and a seal of its own); int8 blobs land as stored; a bf16 blob corrupted on disk is a
    DataLoss."""
    root, blobs = store_dir
    coded = [ref for ref, b in blobs.items() if blob_format.read_header(b)[0].codec != "none"]
    assert coded and all(ref[2] == "bf16" for ref in coded)   # the fixture's bf16 blobs are coded
    bad = corrupted_copy(root, tmp_path / "bad", (1, 2, "bf16"))
    from expert_store.errors import DataLoss

    raw_sizes = [blob_format.raw_blob_size(blob_format.read_header(b)[0]) for b in blobs.values()]
    with FetchPool(str(bad), MODEL, workers=2, slots=len(blobs), slot_bytes=-(-max(raw_sizes) // 4096) * 4096,
                   raw=True) as pool:
        for ref, blob in blobs.items():
            if ref == (1, 2, "bf16"):
                with pytest.raises(DataLoss):
                    pool.submit(*ref).result(timeout=60)
                continue
            c = pool.submit(*ref).result(timeout=60)
            got = bytes(pool.arena[c.offset:c.offset + c.size])
            header, payload = blob_format.decode_raw(got)
            assert header.codec == "none" and (header.layer, header.expert, header.precision) == ref
            assert bytes(payload) == bytes(blob_format.decode_raw(blob)[1])
            if ref[2] == "int8":
                assert got == blob
    assert_cleaned_up(pool)


def test_raw_mode_takes_uncoded_bf16_blobs_into_their_slots(tmp_path):
    """raw=True against a store packed with codec none: every bf16 blob lands in its slot as
    stored (received straight into it), a corrupted one is a DataLoss."""
    root = tmp_path / "plain"
    blobs = build(root, codec="none")
    assert {blob_format.read_header(b)[0].codec for b in blobs.values()} == {"none"}
    bad = corrupted_copy(root, tmp_path / "bad", (1, 3, "bf16"))
    from expert_store.errors import DataLoss

    with FetchPool(str(bad), MODEL, workers=1, slots=len(blobs),
                   slot_bytes=-(-max(map(len, blobs.values())) // 4096) * 4096, raw=True) as pool:
        for ref, blob in sorted(blobs.items()):
            if ref == (1, 3, "bf16"):
                with pytest.raises(DataLoss):
                    pool.submit(*ref).result(timeout=60)
                continue
            c = pool.submit(*ref).result(timeout=60)
            assert bytes(pool.arena[c.offset:c.offset + c.size]) == blob, ref
    assert_cleaned_up(pool)


# --------------------------------------------------------------------------------------------
# striped fetches: one blob in byte ranges received side by side, checked once joined
# --------------------------------------------------------------------------------------------
def test_split_ranges_cover_the_blob_in_aligned_parts():
    from expert_store.fetch_pool import MIN_PART_BYTES, RANGE_ALIGN, split_ranges

    for size, parts in ((92_274_688, 12), (92_274_688, 5), (344_064, 4), (10 << 20, 3), (MIN_PART_BYTES + 1, 8)):
        ranges = split_ranges(size, parts, min_part_bytes=RANGE_ALIGN if size < MIN_PART_BYTES else MIN_PART_BYTES)
        assert ranges[0][0] == 0 and ranges[-1][1] == size and 1 <= len(ranges) <= parts
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))          # no gap, no overlap
        assert all(start % RANGE_ALIGN == 0 for start, _ in ranges)
    assert len(split_ranges(92_274_688, 12)) == 12
    assert split_ranges(3 << 20, 8) == [(0, 3 << 20)]        # under two minimum parts: whole
    assert split_ranges(92_274_688, 1) == [(0, 92_274_688)]


def test_striped_fetches_join_into_the_blob_over_grpc(store_dir, tmp_path):
    """parts=4 over a real store: every blob arrives whole and identical, received by more than
    one process; the raw mode decodes a striped coded bf16 blob once joined; a blob that fails
    its check is a DataLoss once all its parts are back, and its slot is free again."""
    root, blobs = store_dir
    bad = corrupted_copy(root, tmp_path / "bad", (1, 1, "bf16"))
    from expert_store.errors import DataLoss

    with StoreServerProcess(bad, "--workers", "2", log_dir=tmp_path) as server:
        with FetchPool(server.address, MODEL, workers=3, slots=len(blobs), min_part_bytes=64 << 10) as pool:
            futures = {ref: pool.submit(*ref, parts=4) for ref in blobs if ref != (1, 1, "bf16")}
            receivers = set()
            for ref, fut in futures.items():
                c = fut.result(timeout=60)
                assert bytes(pool.arena[c.offset:c.offset + c.size]) == blobs[ref], ref
                assert c.parts == len(split(blobs[ref])) and set(c.receivers) <= set(pool.all_worker_pids)
                receivers |= set(c.receivers)
            assert len(receivers) >= 2
            st = pool.stats()
            striped = [ref for ref in futures if len(split(blobs[ref])) > 1]
            assert striped and st["striped"] == len(striped)
            assert st["parts"] == sum(len(split(blobs[ref])) for ref in striped) and st["failed"] == 0
            for fut in futures.values():
                pool.release(fut.result().slot)
            free = pool.free_slots()
            with pytest.raises(DataLoss):
                pool.submit(1, 1, "bf16", parts=4).result(timeout=60)
            assert pool.free_slots() == free and pool.stats()["failed"] == 1
            for bad_parts in (0, -2, True, 1.5):
                with pytest.raises(InvalidArgument):
                    pool.submit(0, 0, "bf16", parts=bad_parts)
            assert pool.free_slots() == free
        raw_sizes = [blob_format.raw_blob_size(blob_format.read_header(b)[0]) for b in blobs.values()]
        with FetchPool(server.address, MODEL, workers=3, slots=4, slot_bytes=-(-max(raw_sizes) // 4096) * 4096,
                       raw=True, min_part_bytes=64 << 10) as pool:
            for ref in [(0, 3, "bf16"), (1, 2, "bf16"), (0, 3, "int8")]:
                c = pool.submit(*ref, parts=4).result(timeout=60)
                got = bytes(pool.arena[c.offset:c.offset + c.size])
                header, payload = blob_format.decode_raw(got)
                assert header.codec == "none" and bytes(payload) == bytes(blob_format.decode_raw(blobs[ref])[1])
                assert c.parts > 1
                pool.release(c.slot)
    assert_cleaned_up(pool)


def split(blob: bytes) -> list:
    from expert_store.fetch_pool import split_ranges

    return split_ranges(len(blob), 4, min_part_bytes=64 << 10)


def test_striped_demand_worker_killed_mid_part_refetches_only_that_part(store_dir, tmp_path):
    """Two processes, three parts: the first two are received side by side, the third is
    killed on the wire; only that part is fetched again, and the blob is whole."""
    root, blobs = store_dir
    ref = (1, 3, "bf16")
    assert len(split(blobs[ref])) == 3
    with StoreServerProcess(root, "--workers", "2", "--inject-latency-ms", "1500", log_dir=tmp_path) as server:
        pool = FetchPool(server.address, MODEL, workers=2, slots=4, min_part_bytes=64 << 10)
        try:
            fut = pool.submit(*ref, parts=4)
            deadline = time.monotonic() + 30
            while pool.stats()["parts"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pool.stats()["parts"] == 2
            while not pool.inflight() and time.monotonic() < deadline:
                time.sleep(0.01)
            (victim, on_wire), = pool.inflight().items()   # the third part
            assert on_wire == ref
            time.sleep(0.3)  # under way (the server holds it 1.5 s)
            os.kill(victim, signal.SIGKILL)
            c = fut.result(timeout=60)
            assert bytes(pool.arena[c.offset:c.offset + c.size]) == blobs[ref]
            assert c.parts == 3 and c.attempts == 2 and len(c.receivers) >= 2
            st = pool.stats()
            assert st["retried"] == 1 and st["worker_restarts"] == 1 and st["completed"] == 1
            assert st["parts"] == 3  # the two parts in before the kill were not fetched again
        finally:
            pool.close()
        assert_cleaned_up(pool)


def test_promote_moves_a_queued_prefetch_ahead(store_dir, tmp_path):
    """A prefetch someone now waits for: promote() moves its queued jobs (here a striped
    request's two parts) ahead of the other queued prefetches."""
    root, blobs = store_dir
    refs = [(l, e, "int8") for l in range(LAYERS) for e in range(EXPERTS)]
    target = refs[-1]
    assert len(split(blobs[target])) == 2
    with StoreServerProcess(root, "--workers", "2", "--inject-latency-ms", "150", log_dir=tmp_path) as server, \
            FetchPool(server.address, MODEL, workers=1, slots=len(refs), min_part_bytes=64 << 10) as pool:
        order: list = []
        futures = [pool.submit(*r, priority="prefetch", parts=4 if r == target else 1) for r in refs]
        for f in futures:
            f.add_done_callback(lambda f: order.append(f.result().ref))
        done_before = len(order)
        assert pool.promote(futures[-1])
        assert not pool.promote(futures[-1])              # already at demand's place
        for f in futures:
            f.result(timeout=60)
        # one worker: what was on the wire at the promotion may finish first, then the target;
        # in FIFO order it would finish last
        assert order.index(target) <= done_before + 1, (done_before, order)
        assert len(order) == len(refs) and pool.stats()["promoted"] == 1
        assert not pool.promote(futures[0])              # done: no longer in the pool
        with pytest.raises(InvalidArgument):
            pool.promote(futures[0], priority="urgent")
        c = futures[-1].result()
        assert c.parts == 2 and bytes(pool.arena[c.offset:c.offset + c.size]) == blobs[target]
    assert_cleaned_up(pool)


def test_a_queued_striped_request_cancels_and_close_fails_one_on_the_wire(store_dir, tmp_path):
    """A striped request still queued can be cancelled (none of its parts is fetched, its slot
    goes back); close() with parts on the wire fails their request, and nothing is left behind."""
    root, blobs = store_dir
    target = (1, 3, "bf16")
    with StoreServerProcess(root, "--workers", "2", "--inject-latency-ms", "1000", log_dir=tmp_path) as server:
        pool = FetchPool(server.address, MODEL, workers=1, slots=4, min_part_bytes=64 << 10)
        try:
            first = pool.submit(0, 0, "int8")              # on the wire: the one worker is busy with it
            queued = pool.submit(*target, parts=4)
            assert queued.cancel()
            assert first.result(timeout=60).ref == (0, 0, "int8")
            deadline = time.monotonic() + 10
            while pool.free_slots() != pool.slots - 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert pool.free_slots() == pool.slots - 1 and pool.stats()["parts"] == 0
            on_wire = pool.submit(*target, parts=4)
            while not pool.inflight() and time.monotonic() < deadline + 20:
                time.sleep(0.01)
            assert set(pool.inflight().values()) == {target}
        finally:
            pool.close()
        with pytest.raises(Unavailable):
            on_wire.result(timeout=60)
        assert_cleaned_up(pool)
