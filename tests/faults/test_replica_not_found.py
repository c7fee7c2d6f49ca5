"""A replica that lacks a blob the manifest lists: the client fails over, it does not fail.

Every replica should hold the whole model, but one can lack a blob (still being packed, a
replaced disk, a pack that placed the blob elsewhere). Two real `expert-store serve`
replicas over two store directories packed from the same checkpoint; a blob file is
deleted from the replica that owns it (rendezvous order): fetch_expert / fetch_experts
still return the right bytes from the other replica, and one WARNING per replica and
model names the inconsistent replica. Deleted from both: NOT_FOUND naming the blob and
both replicas. An unknown model, a precision that was not packed (a blob the manifest does
not list) and a bad ref stay an immediate NOT_FOUND / INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import shutil

import pytest

from checkpoints import make_mixtral_checkpoint
from fault_procs import failover_warnings, store_proc

from expert_store import format as blob_format
from expert_store.client import StoreClient, rendezvous_order
from expert_store.errors import InvalidArgument, NotFound
from expert_store.pack import pack_checkpoint
from expert_store.tiers import NvmeTier

pytestmark = pytest.mark.timeout(120)
MODEL = "tiny"
LAYERS, EXPERTS = 2, 4
ALL_REFS = [(l, e, "bf16") for l in range(LAYERS) for e in range(EXPERTS)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Two stores packed separately from the same checkpoint."""
    root = tmp_path_factory.mktemp("notfound")
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", hidden=64, ffn=96, layers=LAYERS, experts=EXPERTS, seed=5)
    stores = []
    for name in ("a", "b"):
        pack_checkpoint(ckpt, NvmeTier(root / name), model=MODEL, precisions=("bf16",), progress=False)
        stores.append(root / name)
    return stores


@pytest.fixture
def replicas(packed, tmp_path):
    """Two running replicas over private copies of the packed stores: [(address, dir)] x 2."""
    dirs = [shutil.copytree(src, tmp_path / src.name) for src in packed]
    procs = [store_proc(d).start() for d in dirs]
    try:
        yield [(p.address, d) for p, d in zip(procs, dirs)]
    finally:
        for p in procs:
            p.stop()


def blob_path(store, ref):
    return store / "models" / blob_format.expert_key(MODEL, *ref)


def owner_of(ref, addresses) -> str:
    return rendezvous_order(blob_format.expert_key(MODEL, *ref), addresses)[0]


def not_found_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "NOT_FOUND" in r.getMessage()]


def test_blob_missing_on_its_owner_is_fetched_from_the_other_replica(replicas, caplog):
    addresses = [a for a, _ in replicas]
    dirs = dict(replicas)
    # two blobs one replica owns (rendezvous order over the random ports; with 8 blobs and 2
    # replicas one of them owns at least 4), both deleted from it: one warning, not two
    by_owner: dict[str, list] = {}
    for r in ALL_REFS:
        by_owner.setdefault(owner_of(r, addresses), []).append(r)
    owner = max(by_owner, key=lambda a: len(by_owner[a]))
    other = next(a for a in addresses if a != owner)
    gone = by_owner[owner][:2]
    assert len(gone) == 2
    for ref in gone:
        blob_path(dirs[owner], ref).unlink()
    want = {ref: blob_path(dirs[other], ref).read_bytes() for ref in ALL_REFS}
    caplog.set_level(logging.WARNING, logger="expert_store.client")
    with StoreClient.open(",".join(addresses), deadline_s=10) as c:
        # no manifest fetched yet: the client fetches it on the NOT_FOUND to see the blob is listed
        assert bytes(c.fetch_expert(MODEL, *gone[0])) == want[gone[0]]
        assert not failover_warnings(caplog.records)  # the next replica at once: no outage, no backoff
        buf = bytearray(len(want[gone[1]]) + 7)
        assert bytes(c.fetch_expert(MODEL, *gone[1], out=buf)) == want[gone[1]]
        got = dict(c.fetch_experts(MODEL, ALL_REFS))
        assert set(got) == set(ALL_REFS)
        assert all(bytes(got[r]) == want[r] for r in ALL_REFS)
        got = dict(c.fetch_experts(MODEL, gone))  # a batch of only missing blobs
        assert all(bytes(got[r]) == want[r] for r in gone)
    warned = not_found_warnings(caplog)
    assert len(warned) == 1, warned  # once per replica and model, not per blob
    assert owner in warned[0] and other not in warned[0] and MODEL in warned[0], warned


def test_blob_missing_on_every_replica_is_not_found_naming_both(replicas, caplog):
    addresses = [a for a, _ in replicas]
    ref = (0, 3, "bf16")
    key = blob_format.expert_key(MODEL, *ref)
    for _, d in replicas:
        blob_path(d, ref).unlink()
    caplog.set_level(logging.WARNING, logger="expert_store.client")
    with StoreClient.open(",".join(addresses), deadline_s=10) as c:
        c.manifest(MODEL)
        with pytest.raises(NotFound) as e:
            c.fetch_expert(MODEL, *ref)
        assert not failover_warnings(caplog.records)  # both answered: no retry window waited out
        msg = str(e.value)
        assert e.value.code == "NOT_FOUND"
        assert key in msg and all(a in msg for a in addresses), msg
        with pytest.raises(NotFound) as e:  # the batch call too
            dict(c.fetch_experts(MODEL, [(0, 1, "bf16"), ref, (1, 0, "bf16")]))
        assert all(a in str(e.value) for a in addresses), str(e.value)
        # the other blobs are fine
        assert bytes(c.fetch_expert(MODEL, 0, 1, "bf16")) == blob_path(replicas[0][1], (0, 1, "bf16")).read_bytes()
    warned = not_found_warnings(caplog)
    assert all(any(a in m for m in warned) for a in addresses), warned


def test_unknown_model_unlisted_blob_and_bad_ref_fail_at_once(replicas, caplog):
    addresses = [a for a, _ in replicas]
    caplog.set_level(logging.WARNING, logger="expert_store.client")
    with StoreClient.open(",".join(addresses), deadline_s=10) as c:
        with pytest.raises(NotFound):
            c.fetch_expert("no-such-model", 0, 0, "bf16")
        with pytest.raises(NotFound):
            dict(c.fetch_experts("no-such-model", [(0, 0, "bf16"), (0, 1, "bf16")]))
        with pytest.raises(NotFound):
            c.manifest("no-such-model")
        assert not failover_warnings(caplog.records)  # answered at once, not retried as outages
        m = c.manifest(MODEL)
        assert (0, 0, "int8") not in m.blobs
        with pytest.raises(NotFound) as e:  # a precision that was not packed: the manifest does not list it
            c.fetch_expert(MODEL, 0, 0, "int8")
        assert "int8" in str(e.value)
        with pytest.raises(InvalidArgument):
            c.fetch_expert(MODEL, -1, 0, "bf16")
        with pytest.raises(InvalidArgument):
            c.fetch_expert(MODEL, 0, 0, "fp8")
        assert not failover_warnings(caplog.records)
    assert not not_found_warnings(caplog)  # nothing here is a replica inconsistency
