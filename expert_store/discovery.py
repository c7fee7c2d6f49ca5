"""Store discovery: turn a "k8s://" or "dns:///" target into a live set of store addresses.

Targets
    k8s://NAMESPACE/SERVICE:PORT   PORT is the Service port's *name* ("grpc") or the
                                   endpoint (container) port number ("50051").
    dns:///HOST:PORT               HOST resolved with socket.getaddrinfo, re-resolved every
                                   `refresh_s` seconds (a headless Service's name gives the
                                   ready pods' addresses).

For k8s targets the Service's EndpointSlices (label kubernetes.io/service-name=SERVICE) are
listed and then watched with the `kubernetes` client (in-cluster config, else kubeconfig).
The address set holds only endpoints that are ready and not terminating, so a replica
whose readiness probe fails leaves the set -- and the client's rendezvous hash ring -- as
soon as the watch event arrives, not after a DNS TTL.

The pure logic (EndpointSlice objects -> ready addresses, applying ADDED/MODIFIED/DELETED
watch events) lives in `ready_members` and `EndpointSliceState`, which work on the client
library's own model objects (kubernetes.client.V1EndpointSlice, V1Endpoint,
V1EndpointConditions, DiscoveryV1EndpointPort). The `kubernetes` package is imported only
when a k8s target is opened, so a store-only install does not need it.

Typical use (what StoreClient.open does for these targets):

    with open_discovery("k8s://adapmoe/expert-store:grpc") as members:
        addrs = members.wait_ready(timeout_s=30)          # ["10.1.2.3:50051", ...]
        unsubscribe = members.subscribe(lambda addrs: ring.rebuild(addrs))
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from expert_store.errors import Unavailable

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# RFC 1123 label (namespace names) and RFC 1035 label (Service names), max 63 chars.
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# IANA_SVC_NAME: what a Service port name may be (lowercase, <= 15 chars, has a letter).
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")


class DiscoveryError(Unavailable):
    """Discovery could not produce any address (bad cluster config, nothing ready in time).
    An Unavailable (gRPC UNAVAILABLE), so callers of StoreClient see one error family."""


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class K8sTarget:
    namespace: str
    service: str
    port: int | str  # int: endpoint port number; str: Service port name

    def __str__(self) -> str:
        return f"k8s://{self.namespace}/{self.service}:{self.port}"


@dataclass(frozen=True)
class DnsTarget:
    host: str
    port: int

    def __str__(self) -> str:
        return f"dns:///{format_address(self.host, self.port)}"


def is_discovery_target(target: str) -> bool:
    return target.startswith("k8s://") or target.startswith("dns:")


def _parse_port_number(text: str, target: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad port {text!r} in {target!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535 in {target!r}")
    return port


def _split_host_port(hostport: str, target: str) -> tuple[str, str]:
    if hostport.startswith("["):  # [v6]:port
        end = hostport.find("]")
        if end < 0 or hostport[end + 1 : end + 2] != ":":
            raise ValueError(f"{target!r}: expected [IPV6]:PORT")
        return hostport[1:end], hostport[end + 2 :]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{target!r}: expected HOST:PORT (the port is required)")
    if ":" in host:
        raise ValueError(f"{target!r}: an IPv6 address must be written [ADDR]:PORT")
    return host, port


def parse_target(target: str) -> K8sTarget | DnsTarget:
    """Parse "k8s://ns/service:port" or "dns:///host:port"; ValueError says what is wrong."""
    if target.startswith("k8s://"):
        rest = target[len("k8s://") :]
        namespace, slash, svc_port = rest.partition("/")
        if not slash:
            raise ValueError(f"{target!r}: expected k8s://NAMESPACE/SERVICE:PORT")
        service, colon, port_text = svc_port.partition(":")
        if not colon or not port_text:
            raise ValueError(f"{target!r}: the port (name or number) is required")
        if not _DNS1123_LABEL.match(namespace):
            raise ValueError(f"{target!r}: {namespace!r} is not a valid namespace name")
        if not _DNS1035_LABEL.match(service):
            raise ValueError(f"{target!r}: {service!r} is not a valid Service name")
        if port_text.isdigit():
            port: int | str = _parse_port_number(port_text, target)
        elif _PORT_NAME.match(port_text) and re.search("[a-z]", port_text) and "--" not in port_text:
            port = port_text
        else:
            raise ValueError(f"{target!r}: {port_text!r} is neither a port number nor a port name")
        return K8sTarget(namespace, service, port)
    if target.startswith("dns:"):
        if not target.startswith("dns:///"):
            if target.startswith("dns://"):
                raise ValueError(
                    f"{target!r}: a DNS server authority is not supported; use dns:///HOST:PORT"
                )
            raise ValueError(f"{target!r}: expected dns:///HOST:PORT")
        host, port_text = _split_host_port(target[len("dns:///") :], target)
        return DnsTarget(host, _parse_port_number(port_text, target))
    raise ValueError(f"{target!r}: not a discovery target (k8s://NS/SVC:PORT or dns:///HOST:PORT)")


def format_address(host: str, port: int) -> str:
    """'10.0.0.1:50051', '[fd00::1]:50051' (what grpc channels take)."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


# --------------------------------------------------------------------------- EndpointSlice logic


@dataclass(frozen=True, order=True)
class Member:
    """One ready store replica: its address and a stable name (pod name when known)."""

    address: str  # "host:port"
    name: str  # targetRef name (pod), else hostname, else the address
    zone: str | None = None


def endpoint_is_ready(endpoint: Any) -> bool:
    """Ready and not terminating. Per the EndpointSlice API a nil `ready` means ready (unknown
    state, e.g. a selectorless Service) and a nil `terminating` means not terminating."""
    cond = endpoint.conditions
    if cond is None:
        return True
    if cond.terminating:
        return False
    return cond.ready is None or bool(cond.ready)


def slice_port(endpoint_slice: Any, port: int | str) -> int | None:
    """The endpoint port number this slice exposes for `port` (a name or a number), or None.

    A name matches the EndpointPort of that name (the Service port's name). A number matches
    an EndpointPort with that port number, or a port entry whose port is nil ("all ports").
    """
    ports = endpoint_slice.ports or []
    if isinstance(port, str):
        for p in ports:
            if p.name == port and p.port is not None and (p.protocol or "TCP") == "TCP":
                return int(p.port)
        return None
    for p in ports:
        if (p.protocol or "TCP") != "TCP":
            continue
        if p.port == port or p.port is None:
            return port
    return None


def _family(address_type: str | None) -> int:
    return {"IPv4": 0, "IPv6": 1}.get(address_type or "", 2)


def ready_members(slices: Iterable[Any], port: int | str) -> frozenset[Member]:
    """Ready, non-terminating endpoints of `slices` on `port`.

    Dual-stack Services have one slice per address family; taking both would put every pod
    on the ring twice, so only the preferred family present is used (IPv4, then IPv6, then
    FQDN). An address listed in two slices (during a slice rebalance) counts once, ready if
    any slice says so.
    """
    usable: list[tuple[Any, int]] = []
    for s in slices:
        number = slice_port(s, port)
        if number is not None:
            usable.append((s, number))
    if not usable:
        return frozenset()
    best = min(_family(s.address_type) for s, _ in usable)
    members: dict[str, Member] = {}
    for s, number in usable:
        if _family(s.address_type) != best:
            continue
        for ep in s.endpoints or []:
            if not ep.addresses or not endpoint_is_ready(ep):
                continue
            address = format_address(ep.addresses[0], number)  # addresses are fungible
            if ep.target_ref is not None and ep.target_ref.name:
                name = ep.target_ref.name
            else:
                name = ep.hostname or address
            members[address] = Member(address, name, ep.zone)
    return frozenset(members.values())


class EndpointSliceState:
    """The current EndpointSlices of one Service, fed by a list then by watch events."""

    def __init__(self, port: int | str):
        self.port = port
        self.slices: dict[str, Any] = {}  # slice name -> V1EndpointSlice
        self.resource_version: str | None = None

    def replace(self, slices: Iterable[Any], resource_version: str | None = None) -> frozenset[Member]:
        """Reset from a full list (initial list, or a relist after the watch expired)."""
        self.slices = {s.metadata.name: s for s in slices}
        self.resource_version = resource_version
        return self.members()

    def apply(self, event_type: str, obj: Any) -> frozenset[Member]:
        """Apply one watch event (ADDED / MODIFIED / DELETED / BOOKMARK); returns the members."""
        if event_type == "BOOKMARK":
            rv = _resource_version(obj)
            if rv:
                self.resource_version = rv
            return self.members()
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            raise ValueError(f"unexpected watch event type {event_type!r}")
        name = obj.metadata.name
        if event_type == "DELETED":
            self.slices.pop(name, None)
        else:
            self.slices[name] = obj
        if obj.metadata.resource_version:
            self.resource_version = obj.metadata.resource_version
        return self.members()

    def members(self) -> frozenset[Member]:
        return ready_members(self.slices.values(), self.port)


def _resource_version(obj: Any) -> str | None:
    if isinstance(obj, Mapping):  # BOOKMARK objects arrive as raw dicts
        return (obj.get("metadata") or {}).get("resourceVersion")
    meta = getattr(obj, "metadata", None)
    return getattr(meta, "resource_version", None)


# --------------------------------------------------------------------------- observable set


class MemberSet:
    """Thread-safe, observable set of ready store replicas.

    `addresses()` is a sorted list of "host:port"; `subscribe(cb)` calls cb(addresses) on
    every change (from the watcher thread; keep callbacks short) and returns an
    unsubscribe function.
    """

    def __init__(self, target: str):
        self.target = target
        self._lock = threading.Condition()
        self._members: frozenset[Member] = frozenset()
        self._known = False  # at least one successful list/resolve
        self._callbacks: list[Callable[[list[str]], None]] = []
        self._closed = False
        self.version = 0  # bumps on every change
        self.last_error: str | None = None

    def members(self) -> list[Member]:
        with self._lock:
            return sorted(self._members)

    def addresses(self) -> list[str]:
        with self._lock:
            return sorted(m.address for m in self._members)

    def subscribe(self, callback: Callable[[list[str]], None]) -> Callable[[], None]:
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def wait_ready(self, timeout_s: float = 30.0) -> list[str]:
        """Block until at least one address is known; DiscoveryError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not self._members:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    why = f" (last error: {self.last_error})" if self.last_error else ""
                    raise DiscoveryError(f"no ready endpoint for {self.target} within {timeout_s:.1f}s{why}")
                self._lock.wait(left)
            return sorted(m.address for m in self._members)

    def update(self, members: frozenset[Member]) -> None:
        """Replace the set (the watchers call this); subscribers hear of a change at once."""
        with self._lock:
            self._known = True
            self.last_error = None
            if members == self._members:
                return
            before = sorted(m.address for m in self._members)
            self._members = members
            self.version += 1
            after = sorted(m.address for m in members)
            callbacks = list(self._callbacks)
            self._lock.notify_all()
        if before != after:
            log.info("discovery %s: %d ready: %s", self.target, len(after), ", ".join(after) or "-")
        for cb in callbacks:
            try:
                cb(after)
            except Exception:  # a broken subscriber must not kill the watcher
                log.exception("discovery %s: subscriber failed", self.target)

    def _error(self, message: str) -> None:
        with self._lock:
            self.last_error = message
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def __enter__(self) -> "MemberSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Backoff:
    def __init__(self, first_s: float = 0.2, max_s: float = 10.0):
        self.first_s, self.max_s, self.current = first_s, max_s, first_s

    def next(self) -> float:
        delay = self.current * random.uniform(0.8, 1.2)
        self.current = min(self.current * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self.current = self.first_s


# --------------------------------------------------------------------------- kubernetes watcher


def load_kubernetes_api_client():
    """ApiClient from the in-cluster service account, else from the kubeconfig."""
    try:
        from kubernetes import client, config
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DiscoveryError("k8s:// targets need the 'kubernetes' package (pip install 'adapmoe[k8s]')") from e
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            # $KUBECONFIG as it is now (the library reads it once, at import)
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                    client_configuration=configuration)
        except (config.ConfigException, OSError) as e:
            raise DiscoveryError(f"no in-cluster service account and no usable kubeconfig: {e}") from e
    return client.ApiClient(configuration)


class K8sEndpointWatcher(MemberSet):
    """List + watch the Service's EndpointSlices in a daemon thread.

    A relist happens when the watch expires (410 Gone) or fails; while the API server is
    unreachable the last known set is kept (stale beats empty for a cache-backed store).
    """

    def __init__(self, target: K8sTarget, api_client=None, watch_timeout_s: int = 240,
                 request_timeout_s: float = 10.0):
        super().__init__(str(target))
        from kubernetes import client

        self.spec = target
        self._api = client.DiscoveryV1Api(api_client or load_kubernetes_api_client())
        self._watch_timeout_s = watch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._state = EndpointSliceState(target.port)
        self._stop = threading.Event()
        self._watch = None
        self._thread = threading.Thread(target=self._run, name=f"discovery-{target.service}", daemon=True)
        self._thread.start()

    @property
    def _selector(self) -> str:
        return f"{SERVICE_NAME_LABEL}={self.spec.service}"

    def _list(self) -> None:
        result = self._api.list_namespaced_endpoint_slice(
            self.spec.namespace, label_selector=self._selector, _request_timeout=self._request_timeout_s
        )
        self.update(self._state.replace(result.items, result.metadata.resource_version))

    def _watch_once(self) -> None:
        from kubernetes import watch

        self._watch = watch.Watch()
        stream = self._watch.stream(
            self._api.list_namespaced_endpoint_slice,
            self.spec.namespace,
            label_selector=self._selector,
            resource_version=self._state.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s,
            _request_timeout=(self._request_timeout_s, self._watch_timeout_s + self._request_timeout_s),
        )
        for event in stream:
            if self._stop.is_set():
                break
            obj = event["raw_object"] if event["type"] == "BOOKMARK" else event["object"]
            self.update(self._state.apply(event["type"], obj))

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        backoff = _Backoff()
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                self._watch_once()  # returns when the server ends the watch (timeout_seconds)
                backoff.reset()
            except ApiException as e:
                need_list = True
                if e.status == 410:  # resourceVersion too old: relist right away
                    continue
                msg = f"kubernetes API: {e.status} {e.reason}"
                if e.status in (401, 403):
                    msg += " (may the pod's ServiceAccount list and watch endpointslices.discovery.k8s.io?)"
                self._error(msg)
                log.warning("discovery %s: %s", self.target, msg)
                self._stop.wait(backoff.next())
            except Exception as e:  # network errors, timeouts
                need_list = True
                self._error(f"{type(e).__name__}: {e}")
                log.warning("discovery %s: %s: %s", self.target, type(e).__name__, e)
                self._stop.wait(backoff.next())

    def close(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()  # takes effect at the next event...
            resp = getattr(watch, "_resp", None)
            if resp is not None:  # ...so also close the open watch connection now
                try:
                    resp.close()
                except Exception:
                    pass
        super().close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)


# --------------------------------------------------------------------------- DNS


def resolve_dns(host: str, port: int) -> frozenset[Member]:
    """All addresses of host (A and AAAA), one Member per address; IPv4 preferred when both."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    v4 = {info[4][0] for info in infos if info[0] == socket.AF_INET}
    v6 = {info[4][0] for info in infos if info[0] == socket.AF_INET6}
    addrs = v4 or v6
    return frozenset(Member(format_address(a, port), format_address(a, port)) for a in addrs)


class DnsWatcher(MemberSet):
    """Resolve now, then re-resolve every refresh_s seconds. A failed re-resolve keeps the
    last good set (a transient resolver error must not empty the ring)."""

    def __init__(self, target: DnsTarget, refresh_s: float = 10.0):
        super().__init__(str(target))
        self.spec = target
        self._refresh_s = refresh_s
        self._stop = threading.Event()
        self._resolve()
        self._thread = threading.Thread(target=self._run, name=f"discovery-dns-{target.host}", daemon=True)
        self._thread.start()

    def _resolve(self) -> None:
        try:
            self.update(resolve_dns(self.spec.host, self.spec.port))
        except OSError as e:
            self._error(f"getaddrinfo({self.spec.host!r}): {e}")
            log.warning("discovery %s: %s", self.target, self.last_error)

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self._resolve()

    def refresh(self) -> list[str]:
        """Resolve now (e.g. after a connection failure) and return the addresses."""
        self._resolve()
        return self.addresses()

    def close(self) -> None:
        self._stop.set()
        super().close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)


def open_discovery(target: str | K8sTarget | DnsTarget, *, api_client=None, dns_refresh_s: float = 10.0,
                   on_change: Callable[[list[str]], None] | None = None) -> MemberSet:
    """Start discovery for a target; the returned MemberSet is live until close()."""
    spec = parse_target(target) if isinstance(target, str) else target
    members: MemberSet
    if isinstance(spec, K8sTarget):
        members = K8sEndpointWatcher(spec, api_client=api_client)
    else:
        members = DnsWatcher(spec, refresh_s=dns_refresh_s)
    if on_change is not None:
        members.subscribe(on_change)
        current = members.addresses()
        if current:
            on_change(current)
    return members
