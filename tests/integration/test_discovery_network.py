"""Discovery through the system's resolver and against a Kubernetes API server that does not
answer (a real kubernetes ApiClient on a closed loopback port): tests/unit opens no connection
and asks no resolver."""

from __future__ import annotations

import socket

import pytest


from expert_store.discovery import (DiscoveryError, DnsTarget, DnsWatcher, K8sEndpointWatcher, open_discovery,
                                    parse_target)


def test_k8s_watcher_reports_an_unreachable_api_server():
    """A real kubernetes ApiClient against a port nobody listens on: no addresses, a clear error."""
    from kubernetes import client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: connection refused
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    watcher = K8sEndpointWatcher(parse_target("k8s://adapmoe/expert-store:grpc"),
                                 api_client=client.ApiClient(cfg), request_timeout_s=1)
    try:
        with pytest.raises(DiscoveryError, match="no ready endpoint for k8s://adapmoe/expert-store:grpc"):
            watcher.wait_ready(timeout_s=1.0)
        assert watcher.last_error and ("Connection" in watcher.last_error or "refused" in watcher.last_error)
    finally:
        watcher.close()


def test_k8s_target_uses_the_kubeconfig_outside_a_cluster(tmp_path, monkeypatch):
    """No service account here, so open_discovery falls back to $KUBECONFIG; its server is
    a closed port, so the watcher reports that server in its error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: http://127.0.0.1:{port}
contexts:
- name: local
  context:
    cluster: local
    user: me
    namespace: adapmoe
current-context: local
users:
- name: me
  user:
    token: not-a-real-token
""")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    members = open_discovery("k8s://adapmoe/expert-store:grpc")
    try:
        assert isinstance(members, K8sEndpointWatcher)
        assert members._api.api_client.configuration.host == f"http://127.0.0.1:{port}"
        with pytest.raises(DiscoveryError):
            members.wait_ready(timeout_s=0.5)
    finally:
        members.close()


def test_dns_discovery_resolves_loopback():
    with open_discovery("dns:///localhost:50051", dns_refresh_s=60) as ms:
        got = ms.wait_ready(timeout_s=5)
    assert got and all(a.endswith(":50051") for a in got)
    assert got[0] in ("127.0.0.1:50051", "[::1]:50051")


def test_dns_failure_reports_and_keeps_last_good_set():
    ms = DnsWatcher(DnsTarget("no-such-host.invalid", 1), refresh_s=60)
    try:
        with pytest.raises(DiscoveryError, match="getaddrinfo"):
            ms.wait_ready(timeout_s=0.1)
        ms.spec = DnsTarget("127.0.0.1", 1)
        assert ms.refresh() == ["127.0.0.1:1"]
        ms.spec = DnsTarget("no-such-host.invalid", 1)
        assert ms.refresh() == ["127.0.0.1:1"]  # a failed re-resolve does not empty the ring
        assert "getaddrinfo" in ms.last_error
    finally:
        ms.close()
