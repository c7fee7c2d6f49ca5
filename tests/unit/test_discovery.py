"""Store discovery on the kubernetes client library's own model objects (no fake API server)."""

from __future__ import annotations

import threading

import pytest

import kubernetes.client as k8s  # the 'k8s' extra; installed by `make test`

from expert_store.discovery import (  # noqa: E402
    DiscoveryError,
    DnsTarget,
    EndpointSliceState,
    K8sTarget,
    Member,
    MemberSet,
    endpoint_is_ready,
    format_address,
    open_discovery,
    parse_target,
    ready_members,
    slice_port,
)


def endpoint(ip, pod, ready=True, serving=None, terminating=None, zone=None, conditions=True):
    return k8s.V1Endpoint(
        addresses=[ip] if isinstance(ip, str) else ip,
        conditions=k8s.V1EndpointConditions(ready=ready, serving=serving, terminating=terminating)
        if conditions
        else None,
        target_ref=k8s.V1ObjectReference(kind="Pod", name=pod, namespace="adapmoe") if pod else None,
        zone=zone,
    )


def eslice(name, endpoints, ports=(("grpc", 50051),), address_type="IPv4", rv="1"):
    return k8s.V1EndpointSlice(
        address_type=address_type,
        metadata=k8s.V1ObjectMeta(
            name=name, namespace="adapmoe", resource_version=rv,
            labels={"kubernetes.io/service-name": "expert-store"},
        ),
        endpoints=list(endpoints),
        ports=[k8s.DiscoveryV1EndpointPort(name=n, port=p, protocol="TCP") for n, p in ports],
    )


def addrs(members):
    return sorted(m.address for m in members)


# ------------------------------------------------------------------ targets


@pytest.mark.parametrize(
    "text, expected",
    [
        ("k8s://adapmoe/expert-store:grpc", K8sTarget("adapmoe", "expert-store", "grpc")),
        ("k8s://default/store:50051", K8sTarget("default", "store", 50051)),
        ("dns:///expert-store-headless.adapmoe.svc.cluster.local:50051",
         DnsTarget("expert-store-headless.adapmoe.svc.cluster.local", 50051)),
        ("dns:///127.0.0.1:7", DnsTarget("127.0.0.1", 7)),
        ("dns:///[::1]:50051", DnsTarget("::1", 50051)),
    ],
)
def test_parse_target(text, expected):
    assert parse_target(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("k8s://adapmoe/expert-store", "port"),
        ("k8s://adapmoe/expert-store:", "port"),
        ("k8s://expert-store:grpc", "NAMESPACE/SERVICE"),
        ("k8s://Adapmoe/expert-store:grpc", "namespace"),
        ("k8s://adapmoe/Expert_Store:grpc", "Service name"),
        ("k8s://adapmoe/1store:grpc", "Service name"),
        ("k8s://adapmoe/store:70000", "out of range"),
        ("k8s://adapmoe/store:0", "out of range"),
        ("k8s://adapmoe/store:GRPC", "neither"),
        ("k8s://adapmoe/store:a-very-long-port-name", "neither"),
        ("dns:///store", "port is required"),
        ("dns:///store:http", "bad port"),
        ("dns:///::1:50051", "IPv6"),
        ("dns://8.8.8.8/store:50051", "authority"),
        ("dns:store:50051", "dns:///"),
        ("grpc://store:50051", "not a discovery target"),
    ],
)
def test_parse_target_rejects(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_target(text)


def test_format_address():
    assert format_address("10.0.0.1", 1) == "10.0.0.1:1"
    assert format_address("fd00::1", 2) == "[fd00::1]:2"
    assert format_address("store-0.store.adapmoe.svc", 3) == "store-0.store.adapmoe.svc:3"


# ------------------------------------------------------------------ readiness


def test_endpoint_conditions():
    assert endpoint_is_ready(endpoint("10.0.0.1", "a", ready=True))
    assert not endpoint_is_ready(endpoint("10.0.0.1", "a", ready=False))
    # nil ready means "unknown": the API says consumers should treat it as ready
    assert endpoint_is_ready(endpoint("10.0.0.1", "a", ready=None))
    assert endpoint_is_ready(endpoint("10.0.0.1", "a", conditions=False))
    # terminating pods still serving in-flight requests do not take new keys
    assert not endpoint_is_ready(endpoint("10.0.0.1", "a", ready=None, serving=True, terminating=True))
    assert not endpoint_is_ready(endpoint("10.0.0.1", "a", ready=True, terminating=True))


def test_ready_members_filters_unready_and_terminating():
    s = eslice("expert-store-abc", [
        endpoint("10.0.0.1", "expert-store-0", zone="z1"),
        endpoint("10.0.0.2", "expert-store-1", ready=False),
        endpoint("10.0.0.3", "expert-store-2", ready=False, serving=True, terminating=True),
        endpoint("10.0.0.4", None),
    ])
    members = ready_members([s], "grpc")
    assert members == {
        Member("10.0.0.1:50051", "expert-store-0", "z1"),
        Member("10.0.0.4:50051", "10.0.0.4:50051", None),
    }


def test_first_address_of_an_endpoint_is_used():
    s = eslice("a", [endpoint(["10.0.0.7", "10.0.0.8"], "p")])
    assert addrs(ready_members([s], "grpc")) == ["10.0.0.7:50051"]


def test_port_selection_by_name_and_number():
    ports = (("grpc", 50051), ("metrics", 9090))
    s = eslice("a", [endpoint("10.0.0.1", "p")], ports=ports)
    assert addrs(ready_members([s], "grpc")) == ["10.0.0.1:50051"]
    assert addrs(ready_members([s], "metrics")) == ["10.0.0.1:9090"]
    assert addrs(ready_members([s], 9090)) == ["10.0.0.1:9090"]
    assert ready_members([s], "http") == frozenset()
    assert ready_members([s], 8080) == frozenset()
    assert slice_port(s, "grpc") == 50051 and slice_port(s, 50051) == 50051 and slice_port(s, 1) is None


def test_port_protocol_must_be_tcp_and_nil_port_means_all_ports():
    s = eslice("a", [endpoint("10.0.0.1", "p")], ports=())
    s.ports = [k8s.DiscoveryV1EndpointPort(name="grpc", port=50051, protocol="UDP")]
    assert ready_members([s], "grpc") == frozenset()
    s.ports = [k8s.DiscoveryV1EndpointPort(name="", port=None, protocol="TCP")]
    assert addrs(ready_members([s], 7000)) == ["10.0.0.1:7000"]
    assert ready_members([s], "grpc") == frozenset()  # a name needs a named port
    s.ports = None  # no ports at all: nothing can be addressed
    assert ready_members([s], 7000) == frozenset()


def test_multiple_slices_union_and_duplicates():
    a = eslice("es-a", [endpoint("10.0.0.1", "s-0"), endpoint("10.0.0.2", "s-1")])
    b = eslice("es-b", [endpoint("10.0.0.3", "s-2"), endpoint("10.0.0.2", "s-1", ready=False)])
    # 10.0.0.2 moved between slices: ready in one, stale-unready in the other -> counted once, ready
    assert addrs(ready_members([a, b], "grpc")) == ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
    assert addrs(ready_members([b, a], "grpc")) == ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]


def test_dual_stack_prefers_ipv4_and_formats_ipv6():
    v4 = eslice("v4", [endpoint("10.0.0.1", "s-0")])
    v6 = eslice("v6", [endpoint("fd00::1", "s-0")], address_type="IPv6")
    assert addrs(ready_members([v4, v6], "grpc")) == ["10.0.0.1:50051"]
    assert addrs(ready_members([v6], "grpc")) == ["[fd00::1]:50051"]
    # an IPv4 slice without the port does not hide the IPv6 one
    v4_other = eslice("v4", [endpoint("10.0.0.1", "s-0")], ports=(("http", 80),))
    assert addrs(ready_members([v4_other, v6], "grpc")) == ["[fd00::1]:50051"]


# ------------------------------------------------------------------ watch events


def test_watch_events_added_modified_deleted():
    state = EndpointSliceState("grpc")
    assert state.replace([], "10") == frozenset()
    assert state.resource_version == "10"

    s1 = eslice("es-a", [endpoint("10.0.0.1", "s-0"), endpoint("10.0.0.2", "s-1")], rv="11")
    assert addrs(state.apply("ADDED", s1)) == ["10.0.0.1:50051", "10.0.0.2:50051"]
    assert state.resource_version == "11"

    # s-1's readiness probe fails: it leaves the set on this MODIFIED event
    s1b = eslice("es-a", [endpoint("10.0.0.1", "s-0"), endpoint("10.0.0.2", "s-1", ready=False)], rv="12")
    assert addrs(state.apply("MODIFIED", s1b)) == ["10.0.0.1:50051"]

    s2 = eslice("es-b", [endpoint("10.0.0.3", "s-2")], rv="13")
    assert addrs(state.apply("ADDED", s2)) == ["10.0.0.1:50051", "10.0.0.3:50051"]

    # s-0 is being deleted (terminating): out at once, although it still serves
    s1c = eslice("es-a", [endpoint("10.0.0.1", "s-0", ready=False, serving=True, terminating=True),
                          endpoint("10.0.0.2", "s-1", ready=True)], rv="14")
    assert addrs(state.apply("MODIFIED", s1c)) == ["10.0.0.2:50051", "10.0.0.3:50051"]

    assert addrs(state.apply("DELETED", s1c)) == ["10.0.0.3:50051"]
    # a DELETED for a slice we never saw (watch started after a relist) is harmless
    assert addrs(state.apply("DELETED", eslice("es-zzz", [], rv="16"))) == ["10.0.0.3:50051"]
    assert state.resource_version == "16"


def test_bookmark_only_moves_resource_version():
    state = EndpointSliceState(50051)
    state.replace([eslice("es-a", [endpoint("10.0.0.1", "s-0")])], "5")
    # the client library passes BOOKMARK objects through as raw dicts
    members = state.apply("BOOKMARK", {"kind": "EndpointSlice", "metadata": {"resourceVersion": "99"}})
    assert addrs(members) == ["10.0.0.1:50051"] and state.resource_version == "99"
    with pytest.raises(ValueError, match="ERROR"):
        state.apply("ERROR", {"code": 410})


def test_relist_replaces_everything():
    state = EndpointSliceState("grpc")
    state.apply("ADDED", eslice("old", [endpoint("10.0.0.1", "s-0")]))
    members = state.replace([eslice("new", [endpoint("10.0.0.9", "s-0")])], "50")
    assert addrs(members) == ["10.0.0.9:50051"] and list(state.slices) == ["new"]


def test_watch_events_decoded_by_the_client_library():
    """The same path a real watch takes: JSON event -> kubernetes ApiClient -> state."""
    from kubernetes import client, watch

    w = watch.Watch()
    w._api_client = client.ApiClient()
    raw = {
        "type": "MODIFIED",
        "object": {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "expert-store-x1", "namespace": "adapmoe", "resourceVersion": "77",
                         "labels": {"kubernetes.io/service-name": "expert-store"}},
            "endpoints": [
                {"addresses": ["10.1.0.5"], "conditions": {"ready": True, "serving": True, "terminating": False},
                 "targetRef": {"kind": "Pod", "name": "expert-store-0"}},
                {"addresses": ["10.1.0.6"], "conditions": {"ready": False, "serving": False, "terminating": False},
                 "targetRef": {"kind": "Pod", "name": "expert-store-1"}},
            ],
            "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
        },
    }
    import json

    event = w.unmarshal_event(json.dumps(raw), "V1EndpointSlice")
    assert isinstance(event["object"], client.V1EndpointSlice)
    state = EndpointSliceState("grpc")
    assert state.apply(event["type"], event["object"]) == {Member("10.1.0.5:50051", "expert-store-0")}
    assert state.resource_version == "77"


# ------------------------------------------------------------------ observable set


def test_member_set_notifies_and_waits():
    ms = MemberSet("k8s://adapmoe/expert-store:grpc")
    seen = []
    unsubscribe = ms.subscribe(seen.append)
    with pytest.raises(DiscoveryError, match="no ready endpoint"):
        ms.wait_ready(timeout_s=0.05)

    m0 = frozenset({Member("10.0.0.1:50051", "s-0")})
    t = threading.Timer(0.05, ms.update, args=(m0,))
    t.start()
    assert ms.wait_ready(timeout_s=5) == ["10.0.0.1:50051"]
    t.join()
    ms.update(m0)  # no change -> no callback
    ms.subscribe(lambda a: 1 / 0)  # a failing subscriber does not stop the others
    ms.update(m0 | {Member("10.0.0.2:50051", "s-1")})
    unsubscribe()
    ms.update(frozenset())
    assert seen == [["10.0.0.1:50051"], ["10.0.0.1:50051", "10.0.0.2:50051"]]
    assert ms.addresses() == [] and ms.version == 3


def test_k8s_target_without_any_cluster_config_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DiscoveryError, match="no in-cluster service account and no usable kubeconfig"):
        open_discovery("k8s://adapmoe/expert-store:grpc")
