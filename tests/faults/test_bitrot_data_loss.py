"""Corrupt bytes that a replica serves without noticing: the status a user gets.

A store checks an NVMe file once at rest and then trusts it while its stat signature
(device, inode, size, mtime, ctime; tiers/nvme.py) is unchanged. So:

- An in-place write, even one that puts mtime/atime back with os.utime, moves ctime (utime
  cannot set it): the server re-checks the file and answers DATA_LOSS itself. Tested on a
  real `expert-store serve` after the file was fetched once settled (checked and trusted).
- True media bit rot (bytes change under an unchanged stat) cannot be made from user space.
  What it looks like to a client - a replica that streams a whole blob, last chunk and all,
  whose bytes fail the blob's seal - is made here by a replica whose manifest agrees with
  the corrupt file (its own size/xxh3 check passes; only the client's seal check fails).
  The client then answers DATA_LOSS naming the blob and the replicas when every replica
  answered with bad data, the good bytes when any replica has them, and UNAVAILABLE (naming
  the bad replica too) when the only other replica cannot be reached.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import grpc
import pytest

from fault_procs import failover_warnings, free_port, pack_tiny_model, store_proc, wait_until

from expert_store import format as blob_format
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as pb_grpc
from expert_store.client import StoreClient, rendezvous_order
from expert_store.errors import DataLoss, NotFound, Unavailable
from expert_store.tiers.nvme import SETTLE_NS

pytestmark = pytest.mark.timeout(120)
MODEL = "tiny"
LAYERS, EXPERTS = 2, 4


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return pack_tiny_model(tmp_path_factory.mktemp("bitrot"), MODEL)


def blob_path(store, layer, expert):
    return store / "models" / blob_format.expert_key(MODEL, layer, expert, "bf16")


def flip_in_place(path) -> None:
    """One bit deep in the payload, written into the same file (same inode and size)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size * 2 // 3)
        byte = f.read(1)
        f.seek(size * 2 // 3)
        f.write(bytes([byte[0] ^ 0x10]))
        f.flush()
        os.fsync(f.fileno())


def rotted_copy(good_dir, dest, refs=(), dense=False):
    """A copy of the store whose blobs `refs` (and dense file) hold a flipped bit AND whose
    manifest records the flipped files' size/xxh3: that replica's own check passes, as it
    would for a file it checked once and that rotted since under an unchanged stat."""
    shutil.copytree(good_dir, dest)
    manifest_path = dest / "models" / blob_format.file_key(MODEL, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    for layer, expert in refs:
        path = blob_path(dest, layer, expert)
        flip_in_place(path)
        entry = next(b for b in manifest["blobs"] if (b["layer"], b["expert"], b["precision"]) == (layer, expert, "bf16"))
        entry["xxh3"] = blob_format.blob_checksum(path.read_bytes())
        with pytest.raises(blob_format.BlobError):  # really bad bytes: the seal fails
            blob_format.check_blob(path.read_bytes())
    if dense:
        path = dest / "models" / blob_format.dense_key(MODEL)
        flip_in_place(path)
        manifest["dense_xxh3"] = blob_format.blob_checksum(path.read_bytes())
    manifest_path.write_text(json.dumps(manifest))
    return dest


def stream_whole(address, layer, expert) -> bytes:
    """FetchExperts straight through the stub: the bytes a replica streams, up to last=True."""
    with grpc.insecure_channel(address) as ch:
        parts, last = [], False
        for chunk in pb_grpc.ExpertStoreStub(ch).FetchExperts(
                pb.FetchExpertsRequest(model=MODEL, refs=[pb.ExpertRef(layer=layer, expert=expert, precision="bf16")]),
                timeout=10):
            parts.append(chunk.data)
            last = chunk.last
        assert last, "the stream ended without its last chunk"
        return b"".join(parts)


def ports_where(want, goods=50, bads=200) -> tuple[int, int]:
    """Free ports (g, b) for which want(f"127.0.0.1:{g}", f"127.0.0.1:{b}") holds (rendezvous
    ownership). Both are chosen: for a given good address a wanted order can be next to
    impossible (its score for a key near the top of the hash range leaves almost no address
    that beats it), so the good replica's port is picked too, not taken as it comes."""
    for _ in range(goods):
        g = free_port()
        for _ in range(bads):
            b = free_port()
            if b != g and want(f"127.0.0.1:{g}", f"127.0.0.1:{b}"):
                return g, b
    raise AssertionError("no pair of free ports gave the wanted rendezvous order")


def test_in_place_flip_with_mtime_put_back_is_data_loss_from_the_server(good_dir, tmp_path, caplog):
    """A settled file, fetched (checked, then trusted), flipped in place with its mtime/atime
    put back: ctime moved, so the server checks it again and answers DATA_LOSS itself."""
    work = tmp_path / "store"
    shutil.copytree(good_dir, work)
    path = blob_path(work, 1, 2)
    want = path.read_bytes()
    key = blob_format.expert_key(MODEL, 1, 2, "bf16")
    settled = lambda: time.time_ns() - max(path.stat().st_mtime_ns, path.stat().st_ctime_ns) > SETTLE_NS + 3e8  # noqa: E731
    assert wait_until(settled, timeout=10)
    with store_proc(work) as srv, StoreClient.open(srv.address, deadline_s=10) as c:
        assert bytes(c.fetch_expert(MODEL, 1, 2, "bf16")) == want  # checked once, settled: remembered
        assert bytes(c.fetch_expert(MODEL, 1, 2, "bf16")) == want  # served on the remembered check
        before = path.stat()
        time.sleep(0.05)  # past the kernel's coarse timestamp tick
        flip_in_place(path)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
        assert after.st_ctime_ns != before.st_ctime_ns  # what gives the change away
        caplog.set_level(logging.WARNING, logger="expert_store.client")
        with pytest.raises(DataLoss) as e:
            c.fetch_expert(MODEL, 1, 2, "bf16")
        assert e.value.code == "DATA_LOSS"
        assert key in str(e.value) and srv.address in str(e.value), str(e.value)
        assert not failover_warnings(caplog.records)  # not retried as an outage
        with pytest.raises(DataLoss):  # and stays refused
            c.fetch_expert(MODEL, 1, 2, "bf16")
        with pytest.raises(grpc.RpcError) as raw:  # the server said so, not only the client
            stream_whole(srv.address, 1, 2)
        assert raw.value.code() == grpc.StatusCode.DATA_LOSS
        assert bytes(c.fetch_expert(MODEL, 1, 1, "bf16")) == blob_path(work, 1, 1).read_bytes()


def test_bad_bytes_from_every_replica_are_data_loss_naming_blob_and_replicas(good_dir, tmp_path, caplog):
    a = rotted_copy(good_dir, tmp_path / "a", refs=[(0, 3)])
    b = rotted_copy(good_dir, tmp_path / "b", refs=[(0, 3)])
    key = blob_format.expert_key(MODEL, 0, 3, "bf16")
    caplog.set_level(logging.WARNING, logger="expert_store.client")
    with store_proc(a) as sa, store_proc(b) as sb:
        # each replica streams the whole corrupt blob, last chunk and all: it did not notice
        assert stream_whole(sa.address, 0, 3) == blob_path(a, 0, 3).read_bytes()
        assert stream_whole(sb.address, 0, 3) == blob_path(b, 0, 3).read_bytes()
        with StoreClient.open(f"{sa.address},{sb.address}", deadline_s=10) as c:
            with pytest.raises(DataLoss) as e:
                c.fetch_expert(MODEL, 0, 3, "bf16")
            assert not failover_warnings(caplog.records)  # both answered: no retry window waited out
            msg = str(e.value)
            assert e.value.code == "DATA_LOSS"
            assert key in msg and sa.address in msg and sb.address in msg and "seal" in msg, msg
            # each replica was told (Verify) and dropped its bad copy: now every one lacks it
            assert not blob_path(a, 0, 3).exists() and not blob_path(b, 0, 3).exists()
            with pytest.raises(NotFound) as e:  # the batch call too
                dict(c.fetch_experts(MODEL, [(0, 1, "bf16"), (0, 3, "bf16"), (1, 0, "bf16")]))
            assert key in str(e.value), str(e.value)
            # the other blobs are fine
            assert bytes(c.fetch_expert(MODEL, 0, 1, "bf16")) == blob_path(good_dir, 0, 1).read_bytes()
        for srv in (sa, sb):
            assert "DATA_LOSS" not in srv.stderr_text()
    logged = [r.getMessage() for r in caplog.records if "bad bytes" in r.getMessage()]
    assert any(sa.address in m and key in m for m in logged), logged
    assert any(sb.address in m and key in m for m in logged), logged


def test_good_copy_on_another_replica_is_served_and_the_bad_replica_logged(good_dir, tmp_path, caplog):
    key = blob_format.expert_key(MODEL, 1, 3, "bf16")
    good_port, port = ports_where(lambda good, bad: rendezvous_order(key, [good, bad])[0] == bad)
    good = store_proc(good_dir, port=good_port).start()
    try:
        bad_dir = rotted_copy(good_dir, tmp_path / "bad", refs=[(1, 3)])
        caplog.set_level(logging.WARNING, logger="expert_store.client")
        with store_proc(bad_dir, port=port) as bad, \
                StoreClient.open(f"{good.address},{bad.address}", deadline_s=10) as c:
            want = blob_path(good_dir, 1, 3).read_bytes()
            assert bytes(c.fetch_expert(MODEL, 1, 3, "bf16")) == want  # owner: bad; served: the good copy
            buf = bytearray(len(want) + 10)
            assert bytes(c.fetch_expert(MODEL, 1, 3, "bf16", out=buf)) == want
            got = dict(c.fetch_experts(MODEL, [(l, e, "bf16") for l in range(LAYERS) for e in range(EXPERTS)]))
            assert all(bytes(got[(l, e, "bf16")]) == blob_path(good_dir, l, e).read_bytes()
                       for l in range(LAYERS) for e in range(EXPERTS))
        logged = [r.getMessage() for r in caplog.records if "bad bytes" in r.getMessage()]
        assert logged and all(bad.address in m and key in m for m in logged), logged
    finally:
        good.stop()


def test_bad_bytes_and_an_unreachable_replica_is_unavailable_naming_both(good_dir, tmp_path):
    """The replica that cannot be reached may hold a good copy: retryable UNAVAILABLE, whose
    message still names the replica that sent bad bytes."""
    bad_dir = rotted_copy(good_dir, tmp_path / "bad", refs=[(0, 0)])
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    with store_proc(bad_dir) as bad, StoreClient.open(f"{bad.address},{down}", deadline_s=5) as c:
        with pytest.raises(Unavailable) as e:
            c.fetch_expert(MODEL, 0, 0, "bf16")
        msg = str(e.value)
        assert e.value.code == "UNAVAILABLE"
        assert down in msg and bad.address in msg and "bad bytes" in msg, msg
    assert not blob_path(bad_dir, 0, 0).exists()  # told (Verify), it dropped its bad copy
    # a bad replica alone: the only answers are bad data
    bad_dir = rotted_copy(good_dir, tmp_path / "bad2", refs=[(0, 0)])
    with store_proc(bad_dir) as bad, StoreClient.open(bad.address, deadline_s=5) as c:
        with pytest.raises(DataLoss) as e:
            c.fetch_expert(MODEL, 0, 0, "bf16")
        assert bad.address in str(e.value)


def test_dense_that_fails_the_manifest_is_fetched_from_another_replica(good_dir, tmp_path):
    """fetch_dense checks the manifest's size/xxh3 inside the failover: a replica whose dense
    file rotted (and whose own manifest agrees with it) is skipped, not the end of the call."""
    mkey, dkey = blob_format.file_key(MODEL, "manifest.json"), blob_format.dense_key(MODEL)
    good_port, port = ports_where(lambda good, bad: rendezvous_order(mkey, [good, bad])[0] == good
                                  and rendezvous_order(dkey, [good, bad])[0] == bad)
    good = store_proc(good_dir, port=good_port).start()
    try:
        bad_dir = rotted_copy(good_dir, tmp_path / "bad", dense=True)
        want = (good_dir / "models" / dkey).read_bytes()
        with store_proc(bad_dir, port=port) as bad:
            with StoreClient.open(f"{good.address},{bad.address}", deadline_s=10) as c:
                c.manifest(MODEL)  # from its owner, the good replica
                assert bytes(c.fetch_dense(MODEL)) == want
            with StoreClient.open(bad.address, deadline_s=10) as c:
                c.manifest(MODEL)  # the bad replica's own manifest agrees with its file
                assert bytes(c.fetch_dense(MODEL)) != want
            with StoreClient.open(f"{good.address},{bad.address}", deadline_s=10) as c:
                c.manifest(MODEL)  # the good one
                c.set_replicas([bad.address])  # the good replica leaves the set
                with pytest.raises(DataLoss) as e:
                    c.fetch_dense(MODEL)
                assert dkey in str(e.value) and bad.address in str(e.value), str(e.value)
    finally:
        good.stop()
