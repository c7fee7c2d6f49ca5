"""NvmeTier atomicity (incl. a full disk), MemoryTier LRU budget, TieredStore promotion,
write-through, validation and counters. No Redis here (see tests/integration)."""

from __future__ import annotations

import errno
import os

import pytest

from expert_store.errors import DataLoss, InvalidArgument, ResourceExhausted
from expert_store.tiers import MemoryTier, NvmeTier, TieredStore, check_key

KEY = "m/experts/L000/E001.bf16.blob"


def visible_files(root) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(out)


# -- NvmeTier ---------------------------------------------------------------------------


def test_nvme_round_trip_keys_size(tmp_path):
    tier = NvmeTier(tmp_path)
    tier.put(KEY, b"abc" * 100)
    tier.put("m/dense.safetensors", b"d" * 7)
    tier.put("other/config.json", b"{}")
    assert tier.get(KEY) == b"abc" * 100
    assert tier.path(KEY) == tmp_path.resolve() / "models" / KEY
    assert tier.size(KEY) == 300 and tier.size("m/missing") is None and tier.size("m/experts") is None
    assert list(tier.keys("m/")) == ["m/dense.safetensors", KEY]
    assert list(tier.keys("m/exp")) == [KEY]
    assert list(tier.keys()) == ["m/dense.safetensors", KEY, "other/config.json"]
    assert tier.children("") == ["m", "other"]
    assert tier.read_range(KEY, 3, 4) == b"abca"
    assert tier.contains(KEY) and not tier.contains("m/nope")
    assert tier.get("m/nope") is None
    tier.put(KEY, b"new")  # overwrite
    assert tier.get(KEY) == b"new"
    tier.delete(KEY)
    tier.delete(KEY)  # idempotent
    assert tier.get(KEY) is None
    s = tier.stats()
    assert s["hits"] == 2 and s["misses"] == 2 and s["bytes_read"] == 303
    assert s["bytes_written"] == 300 + 7 + 2 + 3


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/.hidden", "..", "a/{tag}", "a\\b", "a/./b"])
def test_bad_keys_rejected(tmp_path, key):
    with pytest.raises(InvalidArgument):
        check_key(key)
    with pytest.raises(InvalidArgument):
        NvmeTier(tmp_path).put(key, b"x")


def test_nvme_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    tier = NvmeTier(tmp_path)
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    tier.put(KEY, b"payload")
    target = str(tier.path(KEY))
    # the temp file (renamed since, so its link shows the final path) before the directory
    assert synced[-1] == os.path.dirname(target)
    assert any(p.startswith(os.path.dirname(target) + "/.E001.bf16.blob.tmp-") or p == target for p in synced[:-1])


def test_nvme_enospc_mid_write_leaves_nothing(tmp_path, monkeypatch):
    tier = NvmeTier(tmp_path)
    tier.put(KEY, b"old version")
    before = visible_files(tmp_path)
    real_write = os.write
    calls = {"n": 0}

    def write_then_fill(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:  # the first piece lands, then the disk is full
            return real_write(fd, bytes(data)[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write_then_fill)
    with pytest.raises(ResourceExhausted) as info:
        tier.put(KEY, b"new version that does not fit")
    assert info.value.code == "RESOURCE_EXHAUSTED"
    monkeypatch.setattr(os, "write", real_write)
    assert tier.get(KEY) == b"old version"  # old bytes intact, no partial new ones
    assert visible_files(tmp_path) == before  # temp file removed


def test_nvme_failed_fsync_leaves_nothing(tmp_path, monkeypatch):
    tier = NvmeTier(tmp_path)

    def fail(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        tier.put(KEY, b"x" * 1000)
    monkeypatch.undo()
    assert not tier.contains(KEY)
    assert not any(".tmp-" in f for f in visible_files(tmp_path))


def test_nvme_streaming_writer_abort_and_stale_temp(tmp_path):
    tier = NvmeTier(tmp_path)
    with pytest.raises(RuntimeError):
        with tier.writer(KEY) as w:
            w.write(b"part one")
            raise RuntimeError("sender went away")
    assert not tier.contains(KEY) and visible_files(tmp_path) == []
    with tier.writer(KEY) as w:
        for _ in range(3):
            w.write(b"0123456789")
    assert tier.get(KEY) == b"0123456789" * 3
    # a temp file a crashed writer left behind is no key, and gets cleaned up
    stale = tier.path(KEY).parent / ".E001.bf16.blob.tmp-1-dead"
    stale.write_bytes(b"junk")
    assert list(tier.keys()) == [KEY]
    assert tier.remove_stale_temp_files(older_than_s=3600) == 0
    os.utime(stale, (0, 0))
    assert tier.remove_stale_temp_files(older_than_s=3600) == 1
    assert not stale.exists()


# -- MemoryTier -------------------------------------------------------------------------


def test_memory_lru_respects_byte_budget():
    mem = MemoryTier(100)
    mem.put("a", b"a" * 40)
    mem.put("b", b"b" * 40)
    assert mem.get("a") == b"a" * 40  # a is now most recent
    mem.put("c", b"c" * 40)  # evicts b (least recently used)
    assert mem.contains("a") and mem.contains("c") and not mem.contains("b")
    assert mem.used_bytes == 80
    mem.put("a", b"A" * 10)  # replacing shrinks usage
    assert mem.used_bytes == 50 and mem.get("a") == b"A" * 10
    mem.put("huge", b"h" * 101)  # larger than the budget: not kept, nothing evicted
    assert not mem.contains("huge") and mem.used_bytes == 50
    mem.put("d", b"d" * 60)  # needs c evicted (a was used more recently)
    assert sorted(mem._items) == ["a", "d"] and mem.used_bytes == 70
    s = mem.stats()
    assert s["evictions"] == 2 and s["entries"] == 2 and s["used_bytes"] == 70
    assert s["hits"] == 2 and s["misses"] == 0
    mem.delete("a")
    assert mem.get("a") is None and mem.used_bytes == 60


def test_memory_thread_safety_keeps_accounting_exact():
    import threading

    mem = MemoryTier(10_000)

    def worker(t):
        for i in range(300):
            mem.put(f"k{(t * 7 + i) % 50}", bytes(100 + (i % 37)))
            mem.get(f"k{i % 50}")
            if i % 11 == 0:
                mem.delete(f"k{(i + t) % 50}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mem.used_bytes == sum(len(v) for v in mem._items.values()) <= 10_000


# -- TieredStore ------------------------------------------------------------------------


def test_tiered_promotes_on_read_and_counts(tmp_path):
    nvme = NvmeTier(tmp_path)
    nvme.put(KEY, b"x" * 50)  # written behind the store's back: only on NVMe
    store = TieredStore(nvme, memory=MemoryTier(1000))
    assert store.get(KEY) == b"x" * 50
    assert store.memory.contains(KEY)  # promoted
    assert store.get(KEY) == b"x" * 50
    s = store.stats()
    assert list(s) == ["memory", "nvme"]
    assert (s["memory"]["hits"], s["memory"]["misses"]) == (1, 1)
    assert (s["nvme"]["hits"], s["nvme"]["misses"]) == (1, 0)
    assert s["nvme"]["bytes_read"] == 50 and s["memory"]["bytes_read"] == 50
    assert s["nvme"]["mean_read_latency_ms"] > 0
    assert store.get("m/absent") is None
    assert store.totals()["gets"] == 3 and store.totals()["misses"] == 1


def test_tiered_write_through_and_delete(tmp_path):
    store = TieredStore(NvmeTier(tmp_path), memory=MemoryTier(1000))
    store.put(KEY, b"v1")
    assert store.nvme.get(KEY) == b"v1" and store.memory.get(KEY) == b"v1"
    store.put(KEY, b"v2", cache=False)  # bulk write: stale cached copy dropped
    assert store.nvme.get(KEY) == b"v2" and not store.memory.contains(KEY)
    assert store.get(KEY) == b"v2"
    store.delete(KEY)
    assert not store.contains(KEY) and not store.memory.contains(KEY) and store.get(KEY) is None


def test_tiered_failed_nvme_write_does_not_reach_caches(tmp_path, monkeypatch):
    store = TieredStore(NvmeTier(tmp_path), memory=MemoryTier(1000))

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ResourceExhausted):
        store.put(KEY, b"data")
    monkeypatch.undo()
    assert not store.memory.contains(KEY) and store.get(KEY) is None


def test_tiered_bad_cached_copy_is_evicted_and_next_tier_serves(tmp_path):
    store = TieredStore(NvmeTier(tmp_path), memory=MemoryTier(1000))
    store.put(KEY, b"good")
    store.memory.put(KEY, b"evil")  # a corrupted RAM copy

    def validate(data):
        if data != b"good":
            raise ValueError("checksum mismatch")

    assert store.get(KEY, validate=validate) == b"good"
    assert store.memory.get(KEY) == b"good"  # re-promoted from NVMe
    assert store.totals()["corrupt_copies"] == 1
    # only a bad NVMe copy left: DataLoss, and the NVMe file is kept for `verify`
    store.nvme.put(KEY, b"rot!")
    store.memory.delete(KEY)
    with pytest.raises(DataLoss):
        store.get(KEY, validate=validate)
    assert store.nvme.contains(KEY) and not store.memory.contains(KEY)
