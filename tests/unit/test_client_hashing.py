"""Rendezvous hashing of blob keys to store replicas, target parsing, and how a fetch is
split into streams (no server needed: channels connect lazily)."""

from __future__ import annotations

import collections

import pytest

from expert_store import format as blob_format
from expert_store.client import (
    GrpcStoreClient,
    StoreClient,
    _Blob,
    is_remote_target,
    parse_replicas,
    rendezvous_order,
)
from expert_store.errors import InvalidArgument, NotFound

REPLICAS = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051", "10.0.0.4:50051"]
KEYS = [blob_format.expert_key("mixtral", l, e, p) for l in range(32) for e in range(8) for p in ("bf16", "int4")]


def owners(replicas):
    return {k: rendezvous_order(k, replicas)[0] for k in KEYS}


def test_order_is_a_deterministic_permutation_independent_of_input_order():
    for key in KEYS[:50]:
        order = rendezvous_order(key, REPLICAS)
        assert sorted(order) == sorted(REPLICAS)
        assert rendezvous_order(key, list(reversed(REPLICAS))) == order
        assert rendezvous_order(key, REPLICAS) == order


def test_keys_spread_evenly():
    counts = collections.Counter(owners(REPLICAS).values())
    assert set(counts) == set(REPLICAS)
    expected = len(KEYS) / len(REPLICAS)
    assert all(abs(c - expected) < 0.2 * expected for c in counts.values()), counts


def test_removing_a_replica_moves_only_its_keys_to_their_next_choice():
    before = owners(REPLICAS)
    gone = REPLICAS[1]
    after = owners([r for r in REPLICAS if r != gone])
    for key in KEYS:
        if before[key] != gone:
            assert after[key] == before[key]  # cache affinity kept
        else:
            assert after[key] == rendezvous_order(key, REPLICAS)[1]  # the failover target


def test_adding_a_replica_moves_keys_only_onto_it():
    before = owners(REPLICAS)
    new = "10.0.0.5:50051"
    after = owners(REPLICAS + [new])
    moved = [k for k in KEYS if after[k] != before[k]]
    assert moved and all(after[k] == new for k in moved)
    assert abs(len(moved) - len(KEYS) / 5) < 0.3 * len(KEYS) / 5


def test_parse_replicas_and_targets(tmp_path):
    assert parse_replicas("grpc://h1:1,h2:2") == ["h1:1", "h2:2"]
    assert parse_replicas("h1:1, h1:1 ,[::1]:50051") == ["h1:1", "[::1]:50051"]
    for bad in ("grpc://", "h1", "h1:99999", "h 1:5", "grpc://h1:1,/x"):
        with pytest.raises(ValueError):
            parse_replicas(bad)
    assert is_remote_target("grpc://h:1") and is_remote_target("h:1,h:2")
    assert is_remote_target("dns:///store:50051") and is_remote_target("k8s://ns/svc:grpc")
    assert not is_remote_target(str(tmp_path)) and not is_remote_target("./store")
    with pytest.raises(NotFound):
        StoreClient.open(str(tmp_path / "missing"))
    with pytest.raises(InvalidArgument):
        StoreClient.open("grpc://h1:1,h2")


def test_fetch_plan_keeps_each_stream_on_its_owner_and_bounded():
    client = GrpcStoreClient(REPLICAS, max_streams=4, max_refs_per_call=5)
    try:
        items = [_Blob((l, e, "int4"), blob_format.expert_key("m", l, e, "int4")) for l in range(8) for e in range(8)]
        batches = client._plan(items)
        assert sorted(id(it) for b in batches for it in b) == sorted(id(it) for it in items)  # each once
        for batch in batches:
            assert 1 <= len(batch) <= 5
            assert len({rendezvous_order(it.key, REPLICAS)[0] for it in batch}) == 1
        # one owner, few refs: spread over up to max_streams parallel streams
        one = [_Blob((0, e, "bf16"), k) for e, k in enumerate(KEYS[:200]) if rendezvous_order(k, REPLICAS)[0]
               == REPLICAS[0]][:3]
        assert sorted(len(b) for b in client._plan(one)) == [1, 1, 1]
    finally:
        client.close()


def test_replica_set_follows_updates():
    client = GrpcStoreClient(REPLICAS[:2])
    try:
        assert client.replicas() == sorted(REPLICAS[:2])
        client.set_replicas(REPLICAS[1:])
        assert client.replicas() == sorted(REPLICAS[1:])
        order = [r.address for r in client._order(KEYS[0])]
        assert order == rendezvous_order(KEYS[0], REPLICAS[1:])
    finally:
        client.close()
