"""The `colocated` overlay (overlays/colocated = dev + components/colocated): a store sidecar in
the decoder pod publishing into a shared-memory emptyDir the decoder maps.

It renders with `kubectl kustomize` and every object validates strictly on every supported
Kubernetes version; its shape holds together (a native sidecar running `expert-store
colocate`, one Memory emptyDir both containers mount at one path, the decoder's
`local-shm://` target naming that file and the sidecar's port, budgets that nest: arena <
sizeLimit <= the sidecar's memory limit); its command lines parse with the real CLIs. Then the
pod's two containers run locally as the manifest says (command, args, env from the rendered
ConfigMaps and Secrets, $(VAR) expanded as the kubelet does): the mounts become directories
(the arena's under /dev/shm), 127.0.0.1 ports replace container ports, and the k8s:// store
target becomes a real `expert-store serve` (standing for the StatefulSet, whose own local run
is tests/k8s/test_manifest_local_run.py). The sidecar's probes answer as the manifest expects,
the decoder turns ready and serves a Generate whose experts came through the arena.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml

from k8s_render import K8S, command_line, container_env, get, kubectl, pod_template

pytestmark = [
    pytest.mark.skipif(kubectl() is None, reason="kubectl (for `kubectl kustomize`) is not on PATH"),
    pytest.mark.timeout(300),
]

import kubernetes_validate.utils as kv_utils  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from packaging.version import Version  # noqa: E402

NAMESPACE = "adapmoe"
SIDECAR = "expert-store-colocated"
ARENA_MOUNT = "/var/run/adapmoe/arena"


@functools.lru_cache(maxsize=None)
def rendered() -> tuple[dict, ...]:
    proc = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / "colocated")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize overlays/colocated failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def quantity(text: str) -> int:
    """A Kubernetes memory quantity (Ki, Mi, Gi, or plain bytes) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(float(text[:-2]) * mult)
    return int(text)


def pod():
    docs = rendered()
    deployment = get(docs, "Deployment", "decoder")
    spec = pod_template(deployment)["spec"]
    sidecar = next(c for c in spec.get("initContainers") or [] if c["name"] == SIDECAR)
    decoder = next(c for c in spec["containers"] if c["name"] == "decoder")
    return docs, deployment, spec, sidecar, decoder


def argv_of(c: dict) -> list[str]:
    docs = rendered()
    return command_line(docs, c, container_env(docs, {"name": "decoder-0"}, c, NAMESPACE))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ---- render + schema ----------------------------------------------------------------------------


def test_every_object_validates_strictly_on_every_supported_version():
    versions = sorted({v for v in kv_utils.all_versions() if Version(v) >= Version("1.29")}, key=Version)
    assert versions and versions[0].startswith("1.29")
    contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kv_utils, "schema_contents", contents)
        for version in versions:
            for d in rendered():
                kv_utils.validate(d, version, strict=True)
    kinds = {d["kind"] for d in rendered()}
    assert {"StatefulSet", "Deployment", "Service", "NetworkPolicy"} <= kinds   # the store fleet stays


def test_sidecar_and_decoder_share_one_memory_arena():
    from expert_store.arena_client import parse_target
    from expert_store.cli import _size

    docs, _, spec, sidecar, decoder = pod()
    assert sidecar.get("restartPolicy") == "Always"        # a native sidecar: up before the decoder
    assert sidecar["command"] == ["expert-store"] and sidecar["args"][0] == "colocate"
    volume = next(v for v in spec["volumes"] if v["name"] == "arena")
    assert volume["emptyDir"]["medium"] == "Memory"
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (sidecar, decoder)}
    assert mounts[SIDECAR]["arena"] == mounts["decoder"]["arena"] == ARENA_MOUNT

    side, dec = argv_of(sidecar), argv_of(decoder)
    path, control, verify = parse_target(flag(dec, "--store"))
    assert path == flag(side, "--arena") and Path(path).parent == Path(ARENA_MOUNT)
    host, port = control.rsplit(":", 1)
    assert host == "127.0.0.1" and flag(side, "--listen").endswith(f":{port}")
    assert int(port) in {p["containerPort"] for p in sidecar["ports"]}
    # the budgets nest: arena < the volume's sizeLimit <= the sidecar's memory limit (the
    # arena's pages are charged to the container that writes them)
    arena = _size(flag(side, "--arena-bytes"))
    limit = quantity(volume["emptyDir"]["sizeLimit"])
    assert 0 < arena < limit <= quantity(sidecar["resources"]["limits"]["memory"])
    # the sidecar reads through to the store Service with the decoder's store token
    assert flag(side, "--upstream") == f"k8s://{NAMESPACE}/expert-store:grpc"
    assert flag(side, "--upstream-token-file") == flag(side, "--token-file") == flag(dec, "--store-token-file")
    assert flag(side, "--model") == flag(dec, "--model")
    # probes: liveness while it waits for the model, readiness once the arena is up
    assert sidecar["livenessProbe"]["grpc"] == {"port": int(port), "service": "liveness"}
    assert sidecar["startupProbe"]["grpc"]["service"] == "liveness"
    assert sidecar["readinessProbe"]["grpc"] == {"port": int(port)}
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]


def test_command_lines_parse_with_the_real_clis(capsys):
    from decoder.cli import build_serve_parser
    from expert_store.cli import build_parser

    _, _, _, sidecar, decoder = pod()
    for parser, argv in ((build_parser(), argv_of(sidecar)[1:]), (build_serve_parser(), argv_of(decoder)[2:])):
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"{argv} rejected: {capsys.readouterr().err.strip()}") from None


# ---- the pod, run locally as the manifest says --------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, argv: list[str], log: Path) -> None:
        from service_procs import child_env

        self.log = log
        self._f = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT, env=child_env(),
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._f.close()


def health(port: int, service: str = "", metadata=()) -> int | None:
    """One gRPC health check as the kubelet's probe does it (no credentials)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=2).status
        except grpc.RpcError:
            return None


def wait_serving(port: int, proc: Proc, timeout: float, service: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if health(port, service) == health_pb2.HealthCheckResponse.SERVING:
            return
        assert proc.proc.poll() is None, f"exited {proc.proc.returncode}:\n{proc.log.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"not SERVING after {timeout}s:\n{proc.log.read_text()}")


def secret_files(docs, volume: dict, into: Path) -> None:
    name = volume["secret"]["secretName"]
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name)
    into.mkdir(parents=True, exist_ok=True)
    for key, value in secret["data"].items():
        (into / key).write_bytes(base64.b64decode(value))


def test_the_pod_runs_locally_as_the_manifest_says(tmp_path):
    from service_procs import child_env, cli, moe_decoder, pack_tiny_model

    from decoder.client import DecoderClient
    from expert_store.launch import start_store
    from expert_store._proto.adapmoe.v1 import expert_arena_pb2 as apb
    from expert_store._proto.adapmoe.v1 import expert_arena_pb2_grpc as apb_grpc

    docs, _, spec, sidecar, decoder = pod()
    side, dec = argv_of(sidecar), argv_of(decoder)
    model = flag(dec, "--model")
    store_dir = pack_tiny_model(tmp_path / "m", model, layers=2, experts=4)
    if flag(dec, "--gating") in ("adaptive", "cost-aware"):   # the calibrate Job's work
        text = tmp_path / "calibration.txt"
        text.write_text("def main(argv):\n    return sorted(set(argv))\n" * 40)
        r = moe_decoder("calibrate", "--store", str(store_dir), "--model", model, "--text", str(text),
                        "--upload", "--tokens", "256", "--seq-len", "64", "--no-progress", "--out",
                        str(tmp_path / "profile.json"), timeout=300)
        assert r.returncode == 0, r.stderr

    # volumes: Secrets as files, emptyDirs as directories (the Memory one under /dev/shm)
    from expert_store.cli import _size

    # the Memory emptyDir: /dev/shm when it has room for the arena (a container's default
    # /dev/shm is 64 MiB), else a plain directory (the arena works on any filesystem)
    need = 2 * _size(flag(side, "--arena-bytes"))
    shm = Path("/dev/shm")
    if not shm.is_dir() or shutil.disk_usage(shm).free < need:
        shm = tmp_path
    arena_dir = Path(tempfile.mkdtemp(prefix=f"adapmoe-arena-{uuid.uuid4().hex[:8]}-", dir=shm))
    mounts: dict[str, Path] = {}
    for v in spec["volumes"]:
        if "secret" in v:
            mounts[v["name"]] = tmp_path / "secrets" / v["name"]
            secret_files(docs, v, mounts[v["name"]])
        elif v["name"] == "arena":
            mounts[v["name"]] = arena_dir
        else:
            mounts[v["name"]] = tmp_path / "volumes" / v["name"]
            mounts[v["name"]].mkdir(parents=True)

    def rewrite(argv: list[str], c: dict, ports: dict[str, str]) -> list[str]:
        """Mount paths -> local directories and container ports -> local ones, in one pass (a
        replaced path is not matched again)."""
        table = {m["mountPath"]: str(mounts[m["name"]]) for m in c["volumeMounts"]}
        table.update(ports)
        pattern = re.compile("|".join(re.escape(k) for k in sorted(table, key=len, reverse=True)))
        return [pattern.sub(lambda m: table[m.group(0)], a) for a in argv]

    token = (mounts["store-token"] / "token").read_text().strip()
    store = start_store(store_dir, "--token-file", str(mounts["store-token"] / "token"), env=child_env(),
                        stderr=tmp_path / "store.log", ready_timeout=60)
    procs = [store]
    try:
        store_address = store.address
        arena_port, grpc_port, http_port, metrics_port = (free_port() for _ in range(4))
        listen = flag(side, "--listen")
        ports = {f"k8s://{NAMESPACE}/expert-store:grpc": f"grpc://{store_address}",
                 listen: f"127.0.0.1:{arena_port}", f"127.0.0.1:{listen.rsplit(':', 1)[1]}": f"127.0.0.1:{arena_port}",
                 "0.0.0.0:50052": f"127.0.0.1:{grpc_port}", "0.0.0.0:8000": f"127.0.0.1:{http_port}"}
        sidecar_argv = rewrite(side, sidecar, ports)
        sidecar_proc = Proc(cli(sidecar_argv[0]) + sidecar_argv[1:], tmp_path / "sidecar.log")
        procs.append(sidecar_proc)
        wait_serving(arena_port, sidecar_proc, 60, "liveness")      # startup + liveness probes
        decoder_argv = rewrite(dec, decoder, ports)
        decoder_argv[decoder_argv.index("--metrics-port") + 1] = str(metrics_port)
        decoder_proc = Proc(cli(decoder_argv[0]) + decoder_argv[1:], tmp_path / "decoder.log")
        procs.append(decoder_proc)
        wait_serving(arena_port, sidecar_proc, 60)                  # sidecar readiness: the arena is up
        wait_serving(grpc_port, decoder_proc, 240)                  # decoder readiness: model loaded
        assert any(arena_dir.iterdir()), "no arena file in the memory volume"
        arena_file = next(arena_dir.iterdir())
        decoder_token = (mounts["decoder-token"] / "token").read_text().strip()
        with DecoderClient(f"127.0.0.1:{grpc_port}", token=decoder_token, deadline_s=120) as client:
            r = client.generate("def main(", max_tokens=4)
        assert len(r.token_ids) == 4
        with grpc.insecure_channel(f"127.0.0.1:{arena_port}") as ch:
            stub = apb_grpc.ExpertArenaStub(ch)
            with pytest.raises(grpc.RpcError) as e:   # the control plane wants the token
                stub.DescribeArena(apb.DescribeArenaRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = stub.DescribeArena(apb.DescribeArenaRequest(), timeout=10,
                                      metadata=(("authorization", f"Bearer {token}"),))
        assert info.publishes > 0 and info.used > 0   # the decoder's experts came through the arena
        assert arena_file.stat().st_size <= quantity(next(
            v for v in spec["volumes"] if v["name"] == "arena")["emptyDir"]["sizeLimit"])
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(arena_dir, ignore_errors=True)
