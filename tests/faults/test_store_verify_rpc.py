"""The Verify RPC: a replica that served bad bytes is told so by the client and drops them.

Real `expert-store serve` processes on loopback (RAM tier off), real files. Media bit rot
(bytes that change under an unchanged stat) cannot be made from user space; as in
test_bitrot_data_loss.py, a file that rotted after its server checked it is made by flipping
a bit in place AFTER the server served (checked) it once and writing the flipped file's
size/xxh3 into that replica's manifest: the replica's own size/xxh3 check then passes and
it serves the bad bytes, which only the blob's seal (checked by the client, and by Verify)
shows.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import grpc
import pytest

from fault_procs import pack_tiny_model, store_proc, wait_until
from test_bitrot_data_loss import EXPERTS, LAYERS, MODEL, blob_path, flip_in_place, ports_where, stream_whole

from expert_store import format as blob_format
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as pb_grpc
from expert_store import client as client_module
from expert_store.client import StoreClient, rendezvous_order
from expert_store.errors import DataLoss, NotFound
from expert_store.store import ModelStore
from expert_store.tiers.nvme import SETTLE_NS

pytestmark = pytest.mark.timeout(120)
TOKEN = "verify-token-for-tests"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return pack_tiny_model(tmp_path_factory.mktemp("verify"), MODEL)


def rot(store, layer: int, expert: int) -> None:
    """Flip one bit of a blob in place and record the flipped file in the manifest (see the
    module docstring): the replica keeps serving it; only the seal check fails."""
    path = blob_path(store, layer, expert)
    flip_in_place(path)
    manifest_path = store / "models" / blob_format.file_key(MODEL, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    entry = next(b for b in manifest["blobs"] if (b["layer"], b["expert"], b["precision"]) == (layer, expert, "bf16"))
    entry["xxh3"] = blob_format.blob_checksum(path.read_bytes())
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(blob_format.BlobError):
        blob_format.check_blob(path.read_bytes())


def settle(path) -> None:
    """Wait until the file is old enough for a server to remember its check (SETTLE_NS)."""
    assert wait_until(lambda: time.time_ns() - max(path.stat().st_mtime_ns, path.stat().st_ctime_ns)
                      > SETTLE_NS + 3e8, timeout=10)


def ref(layer: int, expert: int, precision: str = "bf16") -> pb.ExpertRef:
    return pb.ExpertRef(layer=layer, expert=expert, precision=precision)


def verify(address: str, request: pb.VerifyRequest, metadata=None) -> pb.VerifyResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.ExpertStoreStub(ch).Verify(request, timeout=10, metadata=metadata)


def status_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def expert_count(store) -> int:
    with ModelStore.open(store, ram_bytes=0) as s:
        return sum(r["count"] for r in s.inspect(MODEL) if r["kind"] == "expert")


def test_rotten_replica_is_verified_and_drops_the_blob(good_dir, tmp_path, caplog):
    key = blob_format.expert_key(MODEL, 1, 2, "bf16")
    want = blob_path(good_dir, 1, 2).read_bytes()
    rotten_dir = tmp_path / "rotten"
    shutil.copytree(good_dir, rotten_dir)
    settle(blob_path(rotten_dir, 1, 2))
    good_before = blob_path(good_dir, 1, 2).stat()
    caplog.set_level(logging.WARNING, logger="expert_store.client")
    good_port, port = ports_where(lambda good, bad: rendezvous_order(key, [good, bad])[0] == bad)
    good = store_proc(good_dir, port=good_port).start()
    try:
        with store_proc(rotten_dir, port=port) as rotten, \
                StoreClient.open(f"{good.address},{rotten.address}", deadline_s=10) as c:
            assert bytes(c.fetch_expert(MODEL, 1, 2, "bf16")) == want  # from its owner, rotten: checked once
            assert bytes(c.fetch_expert(MODEL, 1, 2, "bf16")) == want  # served on the remembered check
            rot(rotten_dir, 1, 2)  # rots after the check
            assert stream_whole(rotten.address, 1, 2) != want  # the replica serves the bad bytes
            assert expert_count(rotten_dir) == LAYERS * EXPERTS

            assert bytes(c.fetch_expert(MODEL, 1, 2, "bf16")) == want  # the good replica's copy
            # the rotten replica got Verify and dropped its copy
            assert not blob_path(rotten_dir, 1, 2).exists()
            assert expert_count(rotten_dir) == LAYERS * EXPERTS - 1
            assert status_of(lambda: stream_whole(rotten.address, 1, 2)) == grpc.StatusCode.NOT_FOUND
            assert status_of(lambda: verify(rotten.address, pb.VerifyRequest(model=MODEL, ref=ref(1, 2)))) \
                == grpc.StatusCode.NOT_FOUND
            told = [r.getMessage() for r in caplog.records if "Verify on replica" in r.getMessage()]
            assert len(told) == 1 and rotten.address in told[0] and "dropped its copy" in told[0], told
            assert "Verify" in rotten.stderr_text()
            # the next fetch: NOT_FOUND there, the good copy from the other replica, no Verify
            assert bytes(c.fetch_expert(MODEL, 1, 2, "bf16")) == want
            got = dict(c.fetch_experts(MODEL, [(l, e, "bf16") for l in range(LAYERS) for e in range(EXPERTS)]))
            assert all(bytes(got[(l, e, "bf16")]) == blob_path(good_dir, l, e).read_bytes()
                       for l in range(LAYERS) for e in range(EXPERTS))
            assert len([r for r in caplog.records if "Verify on replica" in r.getMessage()]) == 1
            # the rotten replica's other blobs stay
            assert stream_whole(rotten.address, 1, 1) == blob_path(good_dir, 1, 1).read_bytes()
        # the good replica is untouched
        after = blob_path(good_dir, 1, 2).stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == \
            (good_before.st_ino, good_before.st_mtime_ns, good_before.st_ctime_ns)
        assert blob_path(good_dir, 1, 2).read_bytes() == want
        assert stream_whole(good.address, 1, 2) == want
        assert expert_count(good_dir) == LAYERS * EXPERTS
    finally:
        good.stop()


def test_every_replica_rotten_is_still_data_loss_then_not_found(good_dir, tmp_path, caplog):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        shutil.copytree(good_dir, d)
        rot(d, 0, 3)
    key = blob_format.expert_key(MODEL, 0, 3, "bf16")
    caplog.set_level(logging.WARNING, logger="expert_store.client")
    with store_proc(dirs[0]) as a, store_proc(dirs[1]) as b, \
            StoreClient.open(f"{a.address},{b.address}", deadline_s=10) as c:
        with pytest.raises(DataLoss) as e:  # unchanged: every replica answered bad data
            c.fetch_expert(MODEL, 0, 3, "bf16")
        assert key in str(e.value) and a.address in str(e.value) and b.address in str(e.value), str(e.value)
        assert not any(blob_path(d, 0, 3).exists() for d in dirs)  # both told, both dropped it
        with pytest.raises(NotFound) as e:  # now every replica lacks it (a resumed pack uploads it)
            c.fetch_expert(MODEL, 0, 3, "bf16")
        assert key in str(e.value)
    told = [r.getMessage() for r in caplog.records if "Verify on replica" in r.getMessage()]
    assert len(told) == 2 and all("dropped its copy" in m for m in told), told


def test_failed_verify_is_logged_and_the_fetch_goes_on(good_dir, tmp_path, caplog, monkeypatch):
    """Verify is best effort: one that fails is logged, never raised, and the fetch still fails
    over to the good replica. Here it fails by its deadline: the rotten replica holds every
    Verify (and every blob) for 3 s (--inject-latency-ms) and the client gives Verify 0.3 s, so
    no answer can come in time however loaded the machine is."""
    monkeypatch.setattr(client_module, "VERIFY_DEADLINE_S", 0.3)
    key = blob_format.expert_key(MODEL, 0, 1, "bf16")
    rotten_dir = tmp_path / "rotten"
    shutil.copytree(good_dir, rotten_dir)
    rot(rotten_dir, 0, 1)
    want = blob_path(good_dir, 0, 1).read_bytes()
    caplog.set_level(logging.WARNING, logger="expert_store.client")
    good_port, port = ports_where(lambda good, bad: rendezvous_order(key, [good, bad])[0] == bad)
    with store_proc(good_dir, port=good_port) as good:
        with store_proc(rotten_dir, "--inject-latency-ms", "3000", port=port) as rotten, \
                StoreClient.open(f"{good.address},{rotten.address}", deadline_s=20) as c:
            assert bytes(c.fetch_expert(MODEL, 0, 1, "bf16")) == want
            failed = [r.getMessage() for r in caplog.records if "Verify on replica" in r.getMessage()]
            assert len(failed) == 1 and rotten.address in failed[0] and "failed" in failed[0], failed
            assert "DEADLINE_EXCEEDED" in failed[0], failed
            # (the replica may still have run it: a deadline past on arrival does not stop a
            # unary handler; whether it did is not this client's concern)
            assert bytes(c.fetch_expert(MODEL, 0, 1, "bf16")) == want


def _token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def test_verify_good_blob_and_dense_keeps_them(good_dir):
    with store_proc(good_dir) as srv:
        before = blob_path(good_dir, 0, 0).stat()
        r = verify(srv.address, pb.VerifyRequest(model=MODEL, ref=ref(0, 0)))
        assert r.good and not r.dropped and r.key == blob_format.expert_key(MODEL, 0, 0, "bf16"), r
        assert "nvme: good" in r.detail
        after = blob_path(good_dir, 0, 0).stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
        assert stream_whole(srv.address, 0, 0) == blob_path(good_dir, 0, 0).read_bytes()
        r = verify(srv.address, pb.VerifyRequest(model=MODEL, dense=True))
        assert r.good and not r.dropped and r.key == blob_format.dense_key(MODEL), r
        assert (good_dir / "models" / blob_format.dense_key(MODEL)).exists()
        assert expert_count(good_dir) == LAYERS * EXPERTS


@pytest.mark.parametrize("request_, code", [
    (pb.VerifyRequest(model=MODEL, ref=ref(0, 0, "fp7")), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.VerifyRequest(model=MODEL, ref=ref(LAYERS, 0)), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.VerifyRequest(model=MODEL, ref=ref(0, EXPERTS)), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.VerifyRequest(model="../etc", ref=ref(0, 0)), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.VerifyRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT),  # names no blob
    (pb.VerifyRequest(model=MODEL, ref=ref(0, 0), dense=True), grpc.StatusCode.INVALID_ARGUMENT),  # two
    (pb.VerifyRequest(model="no-such-model", ref=ref(0, 0)), grpc.StatusCode.NOT_FOUND),
    (pb.VerifyRequest(model=MODEL, ref=ref(0, 0, "int4")), grpc.StatusCode.NOT_FOUND),  # not packed at int4
])
def test_verify_status_codes(good_dir, request_, code):
    with store_proc(good_dir) as srv:
        assert status_of(lambda: verify(srv.address, request_)) == code


def test_verify_of_an_absent_blob_is_not_found(good_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(good_dir, store)
    blob_path(store, 1, 3).unlink()  # the manifest still lists it
    with store_proc(store) as srv:
        assert status_of(lambda: verify(srv.address, pb.VerifyRequest(model=MODEL, ref=ref(1, 3)))) \
            == grpc.StatusCode.NOT_FOUND
        assert verify(srv.address, pb.VerifyRequest(model=MODEL, ref=ref(1, 2))).good


def test_verify_needs_the_token_like_every_rpc(good_dir, tmp_path):
    with store_proc(good_dir, "--token-file", str(_token_file(tmp_path))) as srv:
        request = pb.VerifyRequest(model=MODEL, ref=ref(0, 0))
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            assert status_of(lambda: verify(srv.address, request, metadata)) == grpc.StatusCode.UNAUTHENTICATED
            with grpc.insecure_channel(srv.address) as ch:  # as FetchExperts and Stat are
                stub = pb_grpc.ExpertStoreStub(ch)
                assert status_of(lambda: stub.Stat(pb.StatRequest(), timeout=10, metadata=metadata)) \
                    == grpc.StatusCode.UNAUTHENTICATED
        assert verify(srv.address, request, (("authorization", f"Bearer {TOKEN}"),)).good
        assert TOKEN not in srv.stderr_text()
