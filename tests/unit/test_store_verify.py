"""ModelStore.verify_expert / verify_dense (the Verify RPC's logic), without a server: every
copy is checked again in full whatever was remembered, a bad copy is removed from its tier,
a bad NVMe file takes the cached copies with it."""

from __future__ import annotations

import os

import pytest

from store_model import MODEL, flip_byte, make_blob, write_model

from expert_store import format as fmt
from expert_store.errors import InvalidArgument, NotFound
from expert_store.store import ModelStore
from expert_store.tiers import nvme as nvme_tier
from expert_store.tiers.nvme import file_signature


@pytest.fixture
def store(tmp_path):
    info = write_model(tmp_path)
    with ModelStore.open(tmp_path, ram_bytes=1 << 20) as s:
        yield s, info


def token_of(info, layer, expert, precision):
    e = next(b for b in info["manifest"]["blobs"] if (b["layer"], b["expert"], b["precision"]) == (layer, expert, precision))
    return ("xxh3", e["size"], e["xxh3"])


def test_good_blob_is_good_and_kept(store):
    s, _ = store
    assert s.expert_blob(MODEL, 0, 1, "int8") == make_blob(0, 1, "int8")  # cached in RAM too
    r = s.verify_expert(MODEL, 0, 1, "int8")
    assert r.good and not r.dropped and r.key == fmt.expert_key(MODEL, 0, 1, "int8")
    assert "nvme: good" in r.detail and "memory: good" in r.detail
    assert s.nvme.contains(r.key) and s.tiered.memory.contains(r.key)
    assert s.expert_blob(MODEL, 0, 1, "int8") == make_blob(0, 1, "int8")
    d = s.verify_dense(MODEL)
    assert d.good and not d.dropped and s.nvme.contains(fmt.dense_key(MODEL))


def test_bad_ram_copy_is_removed_nvme_kept(store):
    s, info = store
    key = fmt.expert_key(MODEL, 1, 0, "bf16")
    bad = bytearray(make_blob(1, 0, "bf16"))
    bad[-3] ^= 0x5A
    s.tiered.memory.put(key, bytes(bad), verified=token_of(info, 1, 0, "bf16"))  # a stale "checked" mark
    assert s.expert_blob(MODEL, 1, 0, "bf16") == bytes(bad)  # served on the mark
    r = s.verify_expert(MODEL, 1, 0, "bf16")
    assert not r.good and r.dropped and "memory: bad" in r.detail and "nvme: good" in r.detail
    assert not s.tiered.memory.contains(key) and s.nvme.contains(key)
    assert s.expert_blob(MODEL, 1, 0, "bf16") == make_blob(1, 0, "bf16")


def test_rotten_nvme_file_under_a_stale_mark_is_removed_with_its_copies(store, monkeypatch):
    monkeypatch.setattr(nvme_tier, "SETTLE_NS", 0)  # files count as settled at once (see test_verify_once)
    s, info = store
    key = fmt.expert_key(MODEL, 1, 1, "int8")
    path = s.nvme.path(key)
    s.expert_blob(MODEL, 1, 1, "int8")  # RAM holds a good copy
    flip_byte(path)
    # rot the stat cannot show: the store's mark says this very file was checked
    s.tiered.memory.delete(key)
    s.tiered.nvme.mark_checked(key, file_signature(os.stat(path)), token_of(info, 1, 1, "int8"))
    assert s.expert_blob(MODEL, 1, 1, "int8") != make_blob(1, 1, "int8")  # served bad, RAM holds it now
    assert s.tiered.memory.contains(key)
    r = s.verify_expert(MODEL, 1, 1, "int8")
    assert not r.good and r.dropped and "nvme: bad" in r.detail and "file removed" in r.detail
    assert not path.exists() and not s.tiered.memory.contains(key) and key not in s.tiered.nvme._checked
    with pytest.raises(NotFound):
        s.expert_blob(MODEL, 1, 1, "int8")
    with pytest.raises(NotFound):
        s.verify_expert(MODEL, 1, 1, "int8")
    assert s.verify(MODEL) == [key]  # `expert-store verify` reports it missing


def test_bad_refs_and_rotten_dense(store):
    s, _ = store
    with pytest.raises(InvalidArgument):
        s.verify_expert(MODEL, 0, 0, "fp7")
    with pytest.raises(InvalidArgument):
        s.verify_expert(MODEL, 99, 0, "bf16")
    with pytest.raises(InvalidArgument):
        s.verify_expert("../x", 0, 0, "bf16")
    with pytest.raises(NotFound):
        s.verify_expert("other", 0, 0, "bf16")
    path = s.nvme.path(fmt.dense_key(MODEL))
    flip_byte(path)
    d = s.verify_dense(MODEL)
    assert not d.good and d.dropped and not path.exists()
    with pytest.raises(NotFound):
        s.verify_dense(MODEL)
