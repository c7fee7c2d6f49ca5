"""ModelStore over real tiers: manifest, validated reads, tier fallback on corruption,
PutBlob checks, verify and inspect. Blobs are real ones from expert_store.quant."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from expert_store import format as fmt
from expert_store import quant
from expert_store.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted
from expert_store.manifest import Manifest
from expert_store.store import ModelStore
from expert_store.tiers import NvmeTier
from store_model import EXPERTS, LAYERS, MODEL, PRECISIONS, expert_weights, flip_byte, make_blob, write_model

@pytest.fixture
def packed(tmp_path):
    info = write_model(tmp_path)
    store = ModelStore.open(tmp_path, ram_bytes=1 << 20)
    yield store, info
    store.close()


def test_models_and_manifest(packed, tmp_path):
    store, info = packed
    NvmeTier(tmp_path).put("half-imported/config.json", b"{}")  # no manifest yet: not a model
    assert store.models() == [MODEL]
    m = store.manifest(MODEL)
    assert m.model == MODEL and m.num_layers == LAYERS and m.num_experts == EXPERTS
    assert m.precisions == tuple(PRECISIONS)
    assert m.config_json == info["config"].decode() and m.tokenizer_json == info["tokenizer"]
    assert m.dense_size == len(info["dense"]) and m.dense_xxh3 == fmt.blob_checksum(info["dense"])
    assert m.profile_json == "" and m.profile is None
    assert len(m.blobs) == LAYERS * EXPERTS * len(PRECISIONS)
    assert m.blobs[(0, 0, "int8")].xxh3 == fmt.blob_checksum(make_blob(0, 0, "int8"))
    msg = m.to_proto()  # what GetManifest answers, blobs by layer, expert, precision
    assert msg.num_layers == LAYERS and len(msg.blobs) == len(m.blobs)
    b = msg.blobs[1]
    assert (b.layer, b.expert, b.precision) == (0, 0, "int8")
    assert b.xxh3 == fmt.blob_checksum(make_blob(0, 0, "int8"))
    back = Manifest.from_proto(msg)  # the message carries every served field
    assert back.to_proto() == msg and (back.blobs, back.config, back.tokenizer_json) == (m.blobs, m.config, m.tokenizer_json)


def test_expert_blob_is_the_packed_blob(packed):
    store, _ = packed
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            data = store.expert_blob(MODEL, layer, expert, "bf16")
            assert data == make_blob(layer, expert, "bf16")
            assert store.expert_size(MODEL, layer, expert, "bf16") == len(data)
    got = quant.blob_to_tensors(store.expert_blob(MODEL, 1, 2, "bf16"))
    want = expert_weights(1, 2)
    for name in ("w1", "w3", "w2"):
        assert torch.equal(got[name], want[name].to(torch.bfloat16))
    s = store.stats()
    assert s["nvme"]["hits"] == LAYERS * EXPERTS  # metadata reads are not counted
    assert s["memory"]["hits"] == 1  # the 7th read: promoted into RAM by the 6th
    store.verify()
    assert store.stats()["nvme"]["hits"] == LAYERS * EXPERTS  # nor are verify's reads


@pytest.mark.parametrize(
    "args, error",
    [
        (("../etc", 0, 0, "bf16"), InvalidArgument),
        (("a/b", 0, 0, "bf16"), InvalidArgument),
        ((MODEL, 0, 0, "fp8"), InvalidArgument),
        ((MODEL, LAYERS, 0, "bf16"), InvalidArgument),
        ((MODEL, 0, EXPERTS, "bf16"), InvalidArgument),
        ((MODEL, -1, 0, "bf16"), InvalidArgument),
        ((MODEL, True, 0, "bf16"), InvalidArgument),
        ((MODEL, "0", 0, "bf16"), InvalidArgument),
        (("no-such-model", 0, 0, "bf16"), NotFound),
        ((MODEL, 0, 0, "int4"), NotFound),  # not packed at int4
    ],
)
def test_bad_refs(packed, args, error):
    store, _ = packed
    with pytest.raises(error) as info:
        store.expert_blob(*args)
    assert info.value.code == error.code


def test_missing_blob_file_is_not_found(packed):
    store, _ = packed
    store.nvme.delete(fmt.expert_key(MODEL, 1, 1, "int8"))
    with pytest.raises(NotFound):
        store.expert_blob(MODEL, 1, 1, "int8")


def test_corrupt_nvme_blob_is_data_loss(packed):
    store, _ = packed
    flip_byte(store.nvme.path(fmt.expert_key(MODEL, 0, 1, "bf16")))
    with pytest.raises(DataLoss) as info:
        store.expert_blob(MODEL, 0, 1, "bf16")
    assert info.value.code == "DATA_LOSS"
    assert store.expert_blob(MODEL, 0, 2, "bf16") == make_blob(0, 2, "bf16")  # others unaffected


def test_corrupt_ram_copy_is_evicted_and_nvme_serves(packed):
    store, _ = packed
    key = fmt.expert_key(MODEL, 1, 0, "int8")
    good = store.expert_blob(MODEL, 1, 0, "int8")
    bad = bytearray(good)
    bad[100] ^= 1
    store.tiered.memory.put(key, bytes(bad))
    assert store.expert_blob(MODEL, 1, 0, "int8") == good
    assert store.tiered.memory.get(key) == good
    assert store.tiered.totals()["corrupt_copies"] == 1



def test_expert_into_reads_the_file_into_the_buffer_and_checks_it(packed):
    store, _ = packed
    want = make_blob(1, 2, "bf16")
    out = bytearray(len(want) + 100)
    view = store.expert_into(MODEL, 1, 2, "bf16", memoryview(out))
    assert bytes(view) == want and view.obj is out                 # in the caller's buffer
    key = fmt.expert_key(MODEL, 1, 2, "bf16")
    assert store.tiered.memory.get(key) is None                     # not promoted: the buffer is the cache
    assert store.expert_into(MODEL, 1, 2, "bf16", memoryview(bytearray(len(want))))  # again: checked once
    with pytest.raises(ValueError):
        store.expert_into(MODEL, 1, 2, "bf16", memoryview(bytearray(len(want) - 1)))
    flip_byte(store.nvme.path(fmt.expert_key(MODEL, 0, 2, "int8")))
    with pytest.raises(DataLoss):
        store.expert_into(MODEL, 0, 2, "int8", memoryview(bytearray(len(want) * 2)))
    assert store.tiered.totals()["corrupt_copies"] == 1
    store.nvme.delete(fmt.expert_key(MODEL, 1, 1, "int8"))
    with pytest.raises(NotFound):
        store.expert_into(MODEL, 1, 1, "int8", memoryview(out))
    # a RAM copy (checked when it entered) is copied from
    good = store.expert_blob(MODEL, 1, 0, "int8")
    assert store.tiered.memory.get(fmt.expert_key(MODEL, 1, 0, "int8")) == good
    assert bytes(store.expert_into(MODEL, 1, 0, "int8", memoryview(out))) == good

def test_blob_without_manifest_entry_is_checked_by_its_seal(packed):
    """A blob the manifest does not list (e.g. uploaded after it) is served only when its
    own header and seal check out and name the requested ref."""
    store, info = packed
    manifest = dict(info["manifest"], blobs=[])
    store.put_file(MODEL, "manifest", json.dumps(manifest).encode(), fmt.blob_checksum(json.dumps(manifest).encode()))
    assert store.expert_blob(MODEL, 0, 0, "bf16") == make_blob(0, 0, "bf16")
    # a well-formed blob of another expert under this key: refused
    store.nvme.put(fmt.expert_key(MODEL, 0, 1, "bf16"), make_blob(0, 2, "bf16"))
    with pytest.raises(DataLoss):
        store.expert_blob(MODEL, 0, 1, "bf16")


def test_stale_cached_copy_after_repack_is_replaced(packed):
    store, info = packed
    key = fmt.expert_key(MODEL, 0, 0, "bf16")
    old = store.expert_blob(MODEL, 0, 0, "bf16")
    assert store.tiered.memory.get(key) == old
    # another process re-packs the expert with different weights and a new manifest
    new = quant.expert_to_blob(MODEL, 0, 0, "bf16", expert_weights(9, 9))
    nvme = NvmeTier(store.root)
    nvme.put(key, new)
    manifest = info["manifest"]
    for b in manifest["blobs"]:
        if (b["layer"], b["expert"], b["precision"]) == (0, 0, "bf16"):
            b.update(size=len(new), xxh3=fmt.blob_checksum(new))
    data = json.dumps(manifest).encode() + b" "  # new size: the cached index is reloaded
    nvme.put(fmt.file_key(MODEL, "manifest.json"), data)
    assert store.expert_blob(MODEL, 0, 0, "bf16") == new


def test_dense(packed):
    store, info = packed
    assert store.dense(MODEL) == info["dense"]
    store.tiered.memory.clear()
    flip_byte(store.nvme.path(fmt.dense_key(MODEL)), 10)
    with pytest.raises(DataLoss):
        store.dense(MODEL)
    store.nvme.delete(fmt.dense_key(MODEL))
    with pytest.raises(NotFound):
        store.dense(MODEL)
    with pytest.raises(NotFound):
        store.dense("absent")
    with pytest.raises(InvalidArgument):
        store.dense("..")


def test_put_file_expert_and_files(tmp_path):
    store = ModelStore.open(tmp_path, ram_bytes=0)
    config = json.dumps({"num_hidden_layers": 2, "num_local_experts": 3}).encode()
    assert store.put_file(MODEL, "config", config, fmt.blob_checksum(config)) == (f"{MODEL}/config.json", len(config))
    blob = make_blob(1, 2, "int8")
    key, size = store.put_file(MODEL, "expert", blob, fmt.blob_checksum(blob), layer=1, expert=2, precision="int8")
    assert key == fmt.expert_key(MODEL, 1, 2, "int8") and size == len(blob)
    assert store.nvme.get(key) == blob
    assert store.models() == []  # no manifest yet
    manifest = json.dumps({"model": MODEL, "num_layers": 2, "num_experts": 3, "precisions": ["int8"],
                           "blobs": [{"layer": 1, "expert": 2, "precision": "int8", "size": len(blob),
                                      "xxh3": fmt.blob_checksum(blob)}]}).encode()
    store.put_file(MODEL, "manifest", manifest, fmt.blob_checksum(manifest))
    assert store.models() == [MODEL]
    assert store.expert_blob(MODEL, 1, 2, "int8") == blob
    profile = b'{"sensitivity": [1.0, 2.0]}'
    store.put_file(MODEL, "profile", profile, fmt.blob_checksum(profile))
    assert store.manifest(MODEL).profile_json == profile.decode()
    assert store.manifest(MODEL).profile == {"sensitivity": [1.0, 2.0]}


@pytest.mark.parametrize(
    "kind, kwargs, payload, checksum_ok, error",
    [
        ("expert", dict(layer=0, expert=0, precision="bf16"), "blob", False, DataLoss),
        ("expert", dict(layer=0, expert=1, precision="bf16"), "blob", True, InvalidArgument),  # header says E0
        ("expert", dict(layer=0, expert=0, precision="int8"), "blob", True, InvalidArgument),  # header says bf16
        ("expert", dict(layer=0, expert=0, precision="bf16"), "truncated", True, InvalidArgument),
        ("expert", dict(layer=5, expert=0, precision="bf16"), "blob", True, InvalidArgument),  # config: 2 layers
        ("expert", dict(layer=0, expert=0, precision="fp8"), "blob", True, InvalidArgument),
        ("weights", {}, "blob", True, InvalidArgument),
        ("config", {}, "notjson", True, InvalidArgument),
        ("manifest", {}, "othermodel", True, InvalidArgument),
    ],
)
def test_put_file_rejects_before_anything_is_visible(tmp_path, kind, kwargs, payload, checksum_ok, error):
    store = ModelStore.open(tmp_path, ram_bytes=0)
    config = json.dumps({"num_hidden_layers": 2, "num_local_experts": 3}).encode()
    store.put_file(MODEL, "config", config, fmt.blob_checksum(config))
    data = {
        "blob": make_blob(0, 0, "bf16"),
        "truncated": make_blob(0, 0, "bf16")[:-10],
        "notjson": b"{not json",
        "othermodel": b'{"model": "someone-else"}',
    }[payload]
    checksum = fmt.blob_checksum(data) if checksum_ok else fmt.blob_checksum(data + b"x")
    before = sorted(store.nvme.keys())
    with pytest.raises(error):
        store.put_file(MODEL, kind, data, checksum, **kwargs)
    assert sorted(store.nvme.keys()) == before
    assert not any(".tmp-" in f for _, _, fs in os.walk(tmp_path) for f in fs)


def test_put_file_disk_full_is_resource_exhausted(tmp_path, monkeypatch):
    store = ModelStore.open(tmp_path, ram_bytes=0)
    blob = make_blob(0, 0, "bf16")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ResourceExhausted):
        store.put_file(MODEL, "expert", blob, fmt.blob_checksum(blob), layer=0, expert=0, precision="bf16")
    monkeypatch.undo()
    assert list(store.nvme.keys()) == []


def test_verify_and_inspect(packed, tmp_path):
    store, info = packed
    assert store.verify() == [] and store.verify(MODEL) == []
    corrupt = fmt.expert_key(MODEL, 0, 1, "int8")
    missing = fmt.expert_key(MODEL, 1, 2, "bf16")
    flip_byte(store.nvme.path(corrupt))
    store.nvme.delete(missing)
    flip_byte(store.nvme.path(fmt.dense_key(MODEL)), 0)
    store.nvme.put(fmt.file_key(MODEL, "tokenizer.json"), b'{"version": "2.0"}')
    orphan = fmt.expert_key(MODEL, 1, 1, "int4")  # not in the manifest, and malformed
    store.nvme.put(orphan, b"AMOEBLOB garbage")
    bad = store.verify(MODEL)
    assert sorted(bad) == sorted([corrupt, missing, fmt.dense_key(MODEL), orphan,
                                  fmt.file_key(MODEL, "tokenizer.json")])
    with pytest.raises(NotFound):
        store.verify("absent")

    rows = {(r["model"], r["kind"], r["precision"]): r for r in store.inspect()}
    bf16 = rows[(MODEL, "expert", "bf16")]
    assert bf16["count"] == LAYERS * EXPERTS - 1
    assert bf16["bytes"] == sum(store.nvme.size(k) for k in store.nvme.keys(f"{MODEL}/experts/") if k.endswith(".bf16.blob"))
    assert rows[(MODEL, "expert", "int8")]["count"] == LAYERS * EXPERTS
    assert rows[(MODEL, "expert", "int4")]["count"] == 1
    assert rows[(MODEL, "dense", "")]["bytes"] == len(info["dense"])
    assert rows[(MODEL, "file", "")]["count"] == 3  # config, tokenizer, manifest
