"""A stored blob is checked once at rest, not on every read: a RAM copy when it enters the
tier, an NVMe file while its stat signature (inode, size, mtime, ctime) is unchanged and
settled. Any change to the file - in place, same size, even with its mtime put back - is
checked again, and a corrupt copy is still DataLoss, never served."""

from __future__ import annotations

import os
import time

import pytest

from store_model import MODEL, flip_byte, make_blob, write_model

from expert_store import format as fmt
from expert_store.errors import DataLoss
from expert_store.store import ModelStore
from expert_store.tiers import nvme as nvme_tier
from expert_store.tiers.nvme import file_signature

OLD_NS = 1_000_000_000_000_000_000  # 2001: a file written long ago


def age(path) -> None:
    """The file as if written long ago (its ctime stays now: settle it with SETTLE_NS=0)."""
    os.utime(path, ns=(OLD_NS, OLD_NS))
    time.sleep(0.05)  # past the kernel's coarse timestamp tick: a later write stamps a new ctime


def checked(store, key, path, token) -> bool:
    return store.tiered.nvme.checked(key, file_signature(os.stat(path)), token)


@pytest.fixture
def settled_store(tmp_path, monkeypatch):
    info = write_model(tmp_path)
    monkeypatch.setattr(nvme_tier, "SETTLE_NS", 0)
    with ModelStore.open(tmp_path, ram_bytes=0) as store:
        yield store, info


def entry(info, layer, expert, precision):
    return next(b for b in info["manifest"]["blobs"]
                if (b["layer"], b["expert"], b["precision"]) == (layer, expert, precision))


def test_settled_file_is_checked_once_and_again_after_any_change(settled_store):
    store, info = settled_store
    key = fmt.expert_key(MODEL, 0, 1, "bf16")
    path = store.nvme.path(key)
    e = entry(info, 0, 1, "bf16")
    token = ("xxh3", e["size"], e["xxh3"])
    age(path)
    assert not checked(store, key, path, token)
    assert store.expert_blob(MODEL, 0, 1, "bf16") == make_blob(0, 1, "bf16")
    assert checked(store, key, path, token)  # remembered: the next read does not hash
    assert store.expert_blob(MODEL, 0, 1, "bf16") == make_blob(0, 1, "bf16")
    # rot in place, same inode and size, mtime put back: ctime still moves
    flip_byte(path)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    assert not checked(store, key, path, token)
    with pytest.raises(DataLoss):
        store.expert_blob(MODEL, 0, 1, "bf16")
    with pytest.raises(DataLoss):  # and stays refused: a bad file is never remembered
        store.expert_blob(MODEL, 0, 1, "bf16")
    # a good copy written over it (rename: a new inode) is checked and served
    store.nvme.put(key, make_blob(0, 1, "bf16"))
    assert store.expert_blob(MODEL, 0, 1, "bf16") == make_blob(0, 1, "bf16")


def test_recently_written_file_is_checked_on_every_read(tmp_path):
    """Within SETTLE_NS of a write the stat may not show the next write (coarse timestamps):
    nothing is remembered, so a flip right after a good read is still caught."""
    write_model(tmp_path)
    with ModelStore.open(tmp_path, ram_bytes=0) as store:
        key = fmt.expert_key(MODEL, 1, 2, "int8")
        path = store.nvme.path(key)
        assert store.expert_blob(MODEL, 1, 2, "int8") == make_blob(1, 2, "int8")
        assert not store.tiered.nvme._checked
        flip_byte(path, at=200)
        with pytest.raises(DataLoss):
            store.expert_blob(MODEL, 1, 2, "int8")


def test_ram_copy_is_checked_when_it_enters_and_a_new_copy_is_checked_again(tmp_path):
    info = write_model(tmp_path)
    with ModelStore.open(tmp_path, ram_bytes=1 << 20) as store:
        key = fmt.expert_key(MODEL, 1, 0, "bf16")
        good = store.expert_blob(MODEL, 1, 0, "bf16")  # read from NVMe, checked, promoted
        e = entry(info, 1, 0, "bf16")
        assert store.tiered.memory.get_entry(key) == (good, ("xxh3", e["size"], e["xxh3"]))
        assert store.expert_blob(MODEL, 1, 0, "bf16") is good  # the RAM copy, as it is
        bad = bytearray(good)
        bad[50] ^= 1
        store.tiered.memory.put(key, bytes(bad))  # a copy from elsewhere: unchecked
        assert store.tiered.memory.get_entry(key)[1] is None
        assert store.expert_blob(MODEL, 1, 0, "bf16") == good
        assert store.tiered.totals()["corrupt_copies"] == 1


def test_ranged_stream_of_a_checked_file_skips_the_hash_but_not_a_change(settled_store, monkeypatch):
    store, info = settled_store
    monkeypatch.setattr(nvme_tier, "READ_BLOCK_BYTES", 1000)  # the file is read in several blocks
    blob = make_blob(0, 0, "bf16")
    key = fmt.expert_key(MODEL, 0, 0, "bf16")
    path = store.nvme.path(key)
    store.stream_above_bytes = 100  # every blob streams from NVMe in chunks
    age(path)
    with store.open_expert(MODEL, 0, 0, "bf16", chunk_bytes=1000) as reader:
        assert not reader.trusted
        assert b"".join(c[1] for c in reader) == blob
    with store.open_expert(MODEL, 0, 0, "bf16", offset=1234, chunk_bytes=1000) as reader:
        assert reader.trusted  # checked by the stream above: no hash, the resume seeks
        pieces = list(reader)
        assert pieces[0][0] == 1234 and b"".join(c[1] for c in pieces) == blob[1234:] and pieces[-1][2]
    # a write while a checked file streams (after its first block was read): its last chunk
    # never goes out
    with store.open_expert(MODEL, 0, 0, "bf16", chunk_bytes=1000) as reader:
        assert reader.trusted
        next(reader)
        flip_byte(path, at=-10)
        with pytest.raises(DataLoss):
            list(reader)
    with pytest.raises(DataLoss):  # and the flipped file is hashed again, and refused
        with store.open_expert(MODEL, 0, 0, "bf16", chunk_bytes=1000) as reader:
            assert not reader.trusted
            list(reader)
