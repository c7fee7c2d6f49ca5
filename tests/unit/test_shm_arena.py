"""The shared-memory arena's file logic without a store (expert_store/shm_arena.py): layouts,
publish and read, misses (wrong generation, a record being written), LRU eviction that sees
the readers' stamps and skips pins, a restart that adopts the file (keeping verified blobs,
dropping a write cut off and a damaged one) or retires it for another layout, refusing to
overwrite a file that is not an arena, and a budget the filesystem cannot hold."""

from __future__ import annotations

import time

import pytest
import xxhash

from expert_store.errors import InvalidArgument, ResourceExhausted
from expert_store.shm_arena import KEY, LAST_USED, SEQ, ArenaReader, ArenaWriter, layout

SLOT = 8192
MODEL = "m"


def publish(w: ArenaWriter, slot: int, ref: tuple[int, int, str], data: bytes, pin_until: int = 0):
    view = w.begin(slot)
    view[:len(data)] = data
    return w.commit(slot, MODEL, *ref, len(data), xxhash.xxh3_128_digest(data), time.monotonic_ns(), pin_until)


def blob(i: int, n: int = 5000) -> bytes:
    return bytes((i * 7 + j) % 256 for j in range(n))


@pytest.fixture
def path(tmp_path):
    return tmp_path / "a.arena"


def test_layout_fits_the_budget_or_says_why():
    slots, index_offset, data_offset = layout(1 << 20, SLOT)
    assert data_offset % 4096 == 0 and index_offset + slots * 256 <= data_offset
    assert data_offset + slots * SLOT <= 1 << 20
    with pytest.raises(ResourceExhausted, match="holds no slot"):
        layout(SLOT, SLOT)
    with pytest.raises(InvalidArgument, match="multiple of 4096"):
        layout(1 << 20, 5000)


def test_publish_read_and_misses(path):
    w = ArenaWriter.open(path, 6 * SLOT, SLOT)
    r = ArenaReader(path)
    try:
        assert w.slots == r.slots >= 3
        loc = publish(w, 0, (1, 2, "int4"), blob(1))
        assert (loc.slot, loc.size) == (0, 5000)
        assert r.read(MODEL, 1, 2, "int4") == blob(1)
        assert r.read(MODEL, 1, 2, "int4", generation=loc.generation, verify=True) == blob(1)
        out = bytearray(SLOT)
        assert bytes(r.read(MODEL, 1, 2, "int4", out=out)) == blob(1)
        assert r.read(MODEL, 1, 2, "int4", generation=loc.generation + 1) is None   # replaced since
        assert r.read(MODEL, 1, 3, "int4") is None and r.read(MODEL, 1, 2, "int8") is None
        w.begin(0)   # being replaced: a miss, never the half-written bytes
        assert r.read(MODEL, 1, 2, "int4") is None
        loc2 = publish(w, 0, (1, 2, "int4"), blob(2))
        assert loc2.generation > loc.generation and r.read(MODEL, 1, 2, "int4") == blob(2)
        with pytest.raises(InvalidArgument, match="out holds"):
            r.read(MODEL, 1, 2, "int4", out=bytearray(10))
    finally:
        r.close()
        w.close()


def test_eviction_is_lru_over_reader_stamps_and_skips_pins(path):
    w = ArenaWriter.open(path, 3 * SLOT + 2 * 4096 + 3 * 256, SLOT)
    r = ArenaReader(path)
    try:
        assert w.slots == 3
        assert w.victim(time.monotonic_ns(), set()) == 0   # empty first
        for s in range(3):
            publish(w, s, (0, s, "bf16"), blob(s))
        now = time.monotonic_ns()
        # the store published 0, 1, 2 in that order; a reader then used 0: 1 is the LRU
        r.read(MODEL, 0, 0, "bf16")
        assert w.victim(time.monotonic_ns(), set()) == 1
        assert w.victim(time.monotonic_ns(), {1}) == 2          # held by the current request
        w.touch(1, now, pin_until_ns=now + 60 * 10**9)          # a lease
        w.touch(2, now, pin_until_ns=now + 60 * 10**9)
        w.touch(0, now, pin_until_ns=now + 60 * 10**9)
        assert w.victim(time.monotonic_ns(), set()) is None and w.pinned(time.monotonic_ns()) == 3
        assert w.victim(now + 61 * 10**9, set()) is not None    # leases run out
    finally:
        r.close()
        w.close()


def test_restart_adopts_verified_blobs_and_drops_a_cut_write_and_damage(path):
    w = ArenaWriter.open(path, 6 * SLOT, SLOT)
    for s in range(3):
        publish(w, s, (0, s, "bf16"), blob(s))
    epoch = w.epoch
    view = w.begin(1)              # the crash comes mid-write of slot 1
    view[:100] = b"x" * 100
    data = w.m.slot_view(2)
    data[10] ^= 0xFF               # slot 2's bytes rot
    w.close()

    r = ArenaReader(path)
    w2 = ArenaWriter.open(path, 6 * SLOT, SLOT)   # same layout: adopt
    try:
        assert w2.epoch != epoch and not r.retired
        assert w2.used() == 1 and w2.lookup(w2.m.word(0, KEY)) == 0
        assert w2.m.word(1, SEQ) % 2 == 0 and not w2.m.word(1, KEY) and not w2.m.word(2, KEY)
        assert r.read(MODEL, 0, 0, "bf16") == blob(0)     # the old reader carries on, same mapping
        assert r.read(MODEL, 0, 2, "bf16") is None
    finally:
        w2.close()
    w3 = ArenaWriter.open(path, 12 * SLOT, SLOT)  # another layout: a new file, the old one retired
    try:
        assert r.retired
        r.remap()
        assert not r.retired and r.slots == w3.slots and r.epoch == w3.epoch
        assert r.read(MODEL, 0, 0, "bf16") is None and r.counts["remaps"] == 1
    finally:
        r.close()
        w3.close()


def test_reader_stamps_last_use(path):
    w = ArenaWriter.open(path, 4 * SLOT, SLOT)
    r = ArenaReader(path)
    try:
        publish(w, 0, (0, 0, "bf16"), blob(0))
        before = w.m.word(0, LAST_USED)
        r.read(MODEL, 0, 0, "bf16")
        assert w.m.word(0, LAST_USED) > before
    finally:
        r.close()
        w.close()


def test_refuses_to_overwrite_a_file_that_is_not_an_arena(path):
    path.write_bytes(b"precious data" * 1000)
    with pytest.raises(InvalidArgument, match="not an adapmoe arena"):
        ArenaWriter.open(path, 4 * SLOT, SLOT)
    assert path.read_bytes() == b"precious data" * 1000


def test_slots_sized_for_the_precisions_served():
    from expert_store.arena_publisher import slot_bytes_for
    from expert_store.manifest import BlobEntry, Manifest

    m = Manifest(model=MODEL, num_layers=1, num_experts=2, precisions=("bf16", "int4"),
                 blobs={(0, 0, "bf16"): BlobEntry(40000, ""), (0, 1, "bf16"): BlobEntry(41000, ""),
                        (0, 0, "int4"): BlobEntry(11000, ""), (0, 1, "int4"): BlobEntry(12289, "")})
    assert slot_bytes_for([m]) == 45056                       # 41000 up to 4 KiB
    assert slot_bytes_for([m], ("int4",)) == 16384            # 12289 up to 4 KiB
    with pytest.raises(InvalidArgument, match="no expert blobs at"):
        slot_bytes_for([m], ("int8",))


def test_lease_for_a_zero_copy_consumer(path):
    """A consumer that copies from tensor() itself (a DMA to the GPU) checks valid() after its
    copy: True when untouched, False once the slot was replaced or evicted meanwhile."""
    import torch

    w = ArenaWriter.open(path, 6 * SLOT, SLOT)
    r = ArenaReader(path)
    try:
        publish(w, 1, (0, 3, "int4"), blob(3))
        lease = r.lease(MODEL, 0, 3, "int4")
        assert (lease.slot, lease.size) == (1, 5000)
        dst = r.tensor()[lease.slot, :lease.size].clone()      # stands for the H2D copy
        assert r.valid(lease) and bytes(dst.numpy()) == blob(3)
        assert r.lease(MODEL, 0, 4, "int4") is None
        publish(w, 1, (0, 3, "int4"), blob(4))                  # replaced under the consumer
        assert not r.valid(lease)
        lease2 = r.lease(MODEL, 0, 3, "int4")
        w.begin(1)                                              # evicted mid-copy
        assert not r.valid(lease2) and r.lease(MODEL, 0, 3, "int4") is None
        assert isinstance(r.tensor(), torch.Tensor) and r.tensor().shape == (r.slots, SLOT)
        assert r.pin() == torch.cuda.is_available()
    finally:
        r.close()
        w.close()


def test_the_read_through_store_answers_every_call_the_servicer_makes():
    """ExpertStoreServicer serves a ServedStore: ModelStore, or the co-located store's
    read-through face, which refuses writes and Verify (FAILED_PRECONDITION, not a crash)."""
    from expert_store.arena_publisher import ReadThroughStore
    from expert_store.errors import StoreError
    from expert_store.store import ModelStore, ServedStore

    calls = [n for n in vars(ServedStore) if not n.startswith("_")]
    assert {"manifest", "open_expert", "verify_expert", "verify_dense", "put_file"} <= set(calls)
    for cls in (ModelStore, ReadThroughStore):
        assert [n for n in calls if not callable(getattr(cls, n, None))] == [], cls
    store = ReadThroughStore(publisher=None)
    for call in (lambda: store.verify_expert(MODEL, 0, 0, "bf16"), lambda: store.verify_dense(MODEL),
                 lambda: store.put_file(MODEL, "expert", b"", "0")):
        with pytest.raises(StoreError) as e:
            call()
        assert e.value.code == "FAILED_PRECONDITION"


def test_a_lease_is_pinned_past_a_margin_only_while_nothing_can_replace_it(path):
    """pinned_past: the lease's pin reaches past now + margin, its seq and the arena's epoch are
    unchanged; a replacement (seq) or a store restart (epoch, which clears pins) ends it."""
    w = ArenaWriter.open(path, 6 * SLOT, SLOT)
    r = ArenaReader(path)
    try:
        now = time.monotonic_ns()
        publish(w, 0, (0, 0, "int4"), blob(1), pin_until=now + 60 * 10**9)
        publish(w, 1, (0, 1, "int4"), blob(2))                          # not pinned
        lease = r.lease(MODEL, 0, 0, "int4")
        assert lease.pinned_until == now + 60 * 10**9
        assert r.pinned_past(lease, time.monotonic_ns(), 5 * 10**9)
        assert not r.pinned_past(lease, time.monotonic_ns(), 61 * 10**9)   # the pin ends within the margin
        assert not r.pinned_past(r.lease(MODEL, 0, 1, "int4"), time.monotonic_ns(), 0)
        w.begin(0)                                                       # replaced (an expired pin, say)
        publish(w, 0, (0, 0, "int4"), blob(3), pin_until=now + 60 * 10**9)
        assert not r.pinned_past(lease, time.monotonic_ns(), 0)
        lease = r.lease(MODEL, 0, 0, "int4")
        assert r.pinned_past(lease, time.monotonic_ns(), 0)
    finally:
        w.close()
    w = ArenaWriter.open(path, 6 * SLOT, SLOT)                           # a restarted store adopts the file
    try:
        assert not r.pinned_past(lease, time.monotonic_ns(), 0)          # new epoch (and pins cleared)
        assert r.lease(MODEL, 0, 0, "int4").pinned_until == 0
    finally:
        r.close()
        w.close()
