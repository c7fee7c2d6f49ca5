"""Discovery drives the client's hash ring: two real store replicas on loopback addresses
(127.0.0.1 and 127.0.0.2, one port, like two pods behind one Service), EndpointSlice watch
events (kubernetes model objects) applied through EndpointSliceState -> MemberSet ->
GrpcStoreClient.set_replicas. A replica whose endpoint turns unready or terminating leaves
the ring with that event: afterwards no request goes to it, even when it is dead."""

from __future__ import annotations

import logging
import socket
import time

import pytest

import kubernetes.client as k8s

from checkpoints import make_mixtral_checkpoint  # noqa: E402
from service_procs import StoreServerProcess, run_cli  # noqa: E402

from expert_store.client import GrpcStoreClient, rendezvous_order  # noqa: E402
from expert_store.discovery import EndpointSliceState, MemberSet  # noqa: E402
from expert_store.format import expert_key  # noqa: E402

pytestmark = pytest.mark.timeout(180)
MODEL = "tiny"


def _port_free_on_both() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.2", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


def _slice(port: int, ready: dict[str, bool | None], terminating: dict[str, bool] | None = None, rv: str = "1"):
    terminating = terminating or {}
    return k8s.V1EndpointSlice(
        address_type="IPv4",
        metadata=k8s.V1ObjectMeta(name="expert-store-x7k2p", namespace="adapmoe", resource_version=rv,
                                  labels={"kubernetes.io/service-name": "expert-store"}),
        ports=[k8s.DiscoveryV1EndpointPort(name="grpc", port=port, protocol="TCP")],
        endpoints=[
            k8s.V1Endpoint(addresses=[ip], target_ref=k8s.V1ObjectReference(kind="Pod", name=f"expert-store-{i}"),
                           conditions=k8s.V1EndpointConditions(ready=ready[ip], serving=ready[ip],
                                                               terminating=terminating.get(ip, False)))
            for i, ip in enumerate(sorted(ready))
        ],
    )


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ring")
    ckpt = make_mixtral_checkpoint(root / "ckpt", hidden=64, ffn=96, layers=2, experts=4)[0]
    r = run_cli("pack", str(ckpt), "--store", str(root / "store"), "--model", MODEL, "--no-progress")
    assert r.returncode == 0, r.stderr
    return root / "store"


def test_unready_replica_leaves_the_ring_at_once(store_dir, tmp_path, caplog):
    port = _port_free_on_both()
    a, b = "127.0.0.1", "127.0.0.2"
    addr = {ip: f"{ip}:{port}" for ip in (a, b)}
    servers = {ip: StoreServerProcess(store_dir, "--ram-bytes", "0", listen=addr[ip], log_dir=tmp_path / ip)
               for ip in (a, b)}
    for s in servers.values():
        s.start()
    client = GrpcStoreClient([], deadline_s=10, max_attempts=4)
    members = MemberSet("k8s://adapmoe/expert-store:grpc")
    state = EndpointSliceState("grpc")
    try:
        members.subscribe(client.set_replicas)
        members.update(state.replace([], "1"))
        assert client.replicas() == []

        members.update(state.apply("ADDED", _slice(port, {a: True, b: True}, rv="2")))
        assert client.replicas() == sorted(addr.values())
        manifest = client.manifest(MODEL)
        refs = sorted(manifest.blobs)
        keys_of_b = [r for r in refs if rendezvous_order(expert_key(MODEL, *r), addr.values())[0] == addr[b]]
        assert keys_of_b  # with 16+ blobs both replicas own some
        blobs = {ref: bytes(client.fetch_expert(MODEL, *ref)) for ref in refs}
        assert all(len(blobs[ref]) == manifest.blobs[ref][0] for ref in refs)

        # b's readiness probe fails: the MODIFIED event removes it from the ring right away...
        members.update(state.apply("MODIFIED", _slice(port, {a: True, b: False}, rv="3")))
        assert client.replicas() == [addr[a]]
        # ...so when it then dies, nothing is ever sent to it: no failover, same bytes
        servers[b].kill()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="expert_store.client"):
            t0 = time.monotonic()
            again = {ref: bytes(client.fetch_expert(MODEL, *ref)) for ref in refs}
            elapsed = time.monotonic() - t0
        assert again == blobs
        assert not [r for r in caplog.records if addr[b] in r.getMessage()], caplog.text
        assert elapsed < 10

        # control: had the ring kept the dead replica, its keys would have needed a failover
        client.set_replicas(sorted(addr.values()))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="expert_store.client"):
            for ref in refs:
                client.fetch_expert(MODEL, *ref)
        assert any(addr[b] in r.getMessage() for r in caplog.records), "the control saw no failover"
        members.update(state.apply("MODIFIED", _slice(port, {a: True, b: False}, rv="4")))
        client.set_replicas(members.addresses())

        # b comes back ready, then a starts terminating (rolling update): a leaves at once
        servers[b] = StoreServerProcess(store_dir, "--ram-bytes", "0", listen=addr[b], log_dir=tmp_path / "b2")
        servers[b].start()
        members.update(state.apply("MODIFIED", _slice(port, {a: True, b: True}, rv="5")))
        assert client.replicas() == sorted(addr.values())
        members.update(state.apply("MODIFIED", _slice(port, {a: False, b: True}, {a: True}, rv="6")))
        assert client.replicas() == [addr[b]]
        servers[a].kill()
        assert {ref: bytes(client.fetch_expert(MODEL, *ref)) for ref in refs} == blobs

        # the slice is deleted (Service gone): the ring empties
        members.update(state.apply("DELETED", _slice(port, {a: False, b: True}, rv="7")))
        assert client.replicas() == []
    finally:
        client.close()
        for s in servers.values():
            s.stop()
