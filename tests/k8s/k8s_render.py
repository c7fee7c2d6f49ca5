"""Render the kustomize overlays and answer questions about the rendered objects.

Shared by tests/k8s/test_manifests.py and tests/k8s/test_manifest_local_run.py.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "gpu": K8S / "overlays" / "gpu"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.lru_cache(maxsize=None)
def render(overlay: str) -> tuple[dict, ...]:
    """`kubectl kustomize` the overlay (offline) and parse every object."""
    exe = kubectl()
    if exe is None:
        raise RuntimeError("kubectl is not on PATH")
    proc = subprocess.run([exe, "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay} failed:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def objects(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def get(docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def by_prefix(docs, kind: str, prefix: str) -> dict:
    """Generated objects (ConfigMap, Secret) carry a hash suffix: find by name prefix."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(re.escape(prefix) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} named {prefix}[-hash], found {len(found)}"
    return found[0]


def pod_template(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def workloads(docs) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def all_containers(pod_spec: dict) -> Iterator[dict]:
    yield from pod_spec.get("initContainers") or []
    yield from pod_spec.get("containers") or []


def container(docs, kind: str, name: str, container_name: str | None = None) -> dict:
    spec = pod_template(get(docs, kind, name))["spec"]
    container_name = container_name or name
    found = [c for c in spec["containers"] if c["name"] == container_name]
    assert len(found) == 1, f"{kind}/{name} has no container {container_name}"
    return found[0]


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels + matchExpressions); {} matches all."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def service_selects(service: dict, labels: dict) -> bool:
    sel = service["spec"].get("selector")
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


# ------------------------------------------------------------------ env as the kubelet builds it

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion for command/args/env: $$ -> $, undefined stays literal."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, text)


def var_refs(text: str) -> set[str]:
    return {m.group(1) for m in _VAR_REF.finditer(text) if m.group(1)}


def container_env(docs, pod_meta: dict, c: dict, namespace: str) -> dict[str, str]:
    """Resolve a container's env (value, configMapKeyRef, secretKeyRef, fieldRef) from the render.
    A Secret the render does not hold (the operator creates it) gives a stand-in value, or no
    variable when the reference is optional, as the kubelet leaves it out."""
    import base64

    env: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            env.update(by_exact(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for e in c.get("env") or []:
        name = e["name"]
        if "value" in e:
            env[name] = expand(e["value"], env)
            continue
        ref = e["valueFrom"]
        if "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            env[name] = by_exact(docs, "ConfigMap", r["name"])["data"][r["key"]]
        elif "secretKeyRef" in ref:
            r = ref["secretKeyRef"]
            secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == r["name"]]
            if secrets:
                env[name] = base64.b64decode(secrets[0]["data"][r["key"]]).decode()
            elif not r.get("optional"):  # the operator provides it (base, gpu): a visible stand-in
                env[name] = f"<Secret {r['name']} key {r['key']}>"
        elif "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            if path == "metadata.namespace":
                env[name] = namespace
            elif path == "metadata.name":
                env[name] = pod_meta.get("name", "pod-0")
            elif path.startswith("metadata.annotations["):
                key = path[len("metadata.annotations['") : -2]
                env[name] = (pod_meta.get("annotations") or {}).get(key, "")
            else:
                raise AssertionError(f"unsupported fieldRef {path}")
        else:
            raise AssertionError(f"unsupported env source {ref}")
    return env


def by_exact(docs, kind: str, name: str) -> dict:
    return get(docs, kind, name)


def command_line(docs, c: dict, env: dict[str, str]) -> list[str]:
    return [expand(x, env) for x in (c.get("command") or []) + (c.get("args") or [])]
