"""Manifest-driven local run of the dev overlay.

Reads the rendered redis, expert-store, pack-Job and decoder containers' command, args, env
(ConfigMap, Secret and downward-API references resolved, $(VAR) expanded as the kubelet
does) and ports, and starts them as local processes: Service names map to 127.0.0.1,
container ports to free loopback ports, volumes to temporary directories (Secret volumes get
the rendered Secret's files). Then it runs each container's probes the way the kubelet
would (native gRPC probes: grpc.health.v1.Health/Check without credentials; exec probes:
the command), and talks to the services through their Service ports: a manifest (and an
expert, through Redis) from the store, and a Generate from the decoder. The decoder starts
before the pack Job runs, as on a fresh `kubectl apply`: it must wait for the model (startup
and liveness probes passing, readiness failing, Generate UNAVAILABLE), then turn ready on its
own once the Job has packed it, without a restart.

The one pack Job uploads over gRPC into the running store replica (it mounts no store
volume): a first attempt before the store runs fails with one UNAVAILABLE line (the Job's
restartPolicy OnFailure retries it), the attempt after the store is up packs the model, and
the store itself writes it into its claim.

The calibrate Job starts with the others, before the model is there: it waits for the
model (stopped with SIGSTOP once it says so, standing for a Job pod scheduled late), while
the decoder, which runs adaptive gating, stays unready after the pack because the model has
no calibration profile yet; resumed, the Job calibrates the model on its ConfigMap's text
and uploads the profile into the store, and the decoder turns ready on its own.

Nothing is started that the manifests do not describe, except: the pack Job's demo
checkpoint comes from tests/checkpoints.py instead of its `train-demo` init container (too
slow for a test), and the decoder's and the pack Job's k8s:// store target becomes
dns:///127.0.0.1:PORT (no API server here; the EndpointSlice logic is tested in
tests/unit/test_discovery.py).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from k8s_render import by_prefix, get, kubectl, pod_template, render

pytestmark = [
    pytest.mark.skipif(kubectl() is None, reason="kubectl (for `kubectl kustomize`) is not on PATH"),
    pytest.mark.timeout(240),
]

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from local_cluster import (Cluster, Process, health_checks, run_pack_job, run_probe, start, start_job,  # noqa: E402
                           store_claims)


def readiness(cluster: Cluster, c: dict) -> int | None:
    """One readiness check as the kubelet's gRPC probe does it (status, or None: no answer)."""
    probe = c["readinessProbe"]["grpc"]
    with grpc.insecure_channel(f"127.0.0.1:{cluster.local_port('decoder', probe['port'])}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=probe.get("service", "")), timeout=2).status
        except grpc.RpcError:
            return None


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
        with pytest.raises(redis_py.AuthenticationError):  # the password from the Secret is required
            redis_py.Redis(port=cluster.service_port("redis", "redis")).ping()
        r = redis_py.Redis(port=cluster.service_port("redis", "redis"), password=renv["REDIS_PASSWORD"])
        assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert r.config_get("save") == {"save": ""} and r.config_get("appendonly") == {"appendonly": "no"}
        assert int(r.config_get("maxmemory")["maxmemory"]) > 0

        # -- the pack Job before the store runs (its pod may start first): one attempt fails
        # with a one-line UNAVAILABLE error, exit 1, nothing uploaded; OnFailure retries it
        ckpt_thread.join(120)
        assert not ckpt_thread.is_alive() and not ckpt_errors, ckpt_errors
        early, pack_argv = run_pack_job(cluster, ckpt_dir, timeout=120)
        assert any(a.startswith("dns:///127.0.0.1:") for a in pack_argv)  # the k8s:// target, locally
        assert early.returncode == 1, early.stdout + early.stderr
        error_lines = [line for line in early.stderr.splitlines() if line.startswith("expert-store pack: error:")]
        assert len(error_lines) == 1 and error_lines[0].endswith("(UNAVAILABLE)"), early.stderr
        assert "Traceback" not in early.stderr, early.stderr

        # -- the expert store (replica 0), its NVMe claim a local directory
        shared = store_claims(cluster, tmp_path / "pv")
        (claim,) = shared
        _, sc, senv, smounts, sproc = start(cluster, "StatefulSet", "expert-store", shared=shared,
                                            ready_line="listening on ")
        procs.append(sproc)
        health_checks(cluster, "expert-store", sc, senv, smounts, sproc)

        # -- the decoder starts before the pack Job has run (as a fresh `kubectl apply` does):
        # it waits for the model instead of crash-looping. The kubelet's startup and liveness
        # probes pass (it is not restarted), readiness fails (no traffic), Generate is
        # UNAVAILABLE; nobody touches it while the Job packs
        _, dc, denv, dmounts, dproc = start(cluster, "Deployment", "decoder")
        procs.append(dproc)
        assert any(a.startswith("dns:///127.0.0.1:") for a in dproc.argv)  # the k8s:// target, locally
        run_probe(cluster, "decoder", dc, "startupProbe", denv, dmounts, dproc)
        run_probe(cluster, "decoder", dc, "livenessProbe", denv, dmounts, dproc)
        decoder_addr = f"127.0.0.1:{cluster.service_port('decoder', 'grpc')}"
        assert readiness(cluster, dc) == health_pb2.HealthCheckResponse.NOT_SERVING
        from decoder._proto.adapmoe.v1 import decoder_pb2, decoder_pb2_grpc

        decoder_token = (dmounts["/etc/adapmoe/decoder-token"] / "token").read_text().strip()
        auth = (("authorization", f"Bearer {decoder_token}"),)
        request = decoder_pb2.GenerateRequest(prompt="The quick brown fox", max_tokens=6,
                                              sampling=decoder_pb2.SamplingParams(temperature=0.0))
        with grpc.insecure_channel(decoder_addr) as channel:
            with pytest.raises(grpc.RpcError) as waiting:
                list(decoder_pb2_grpc.DecoderStub(channel).Generate(request, timeout=30, metadata=auth))
            assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"model '{settings['MODEL_NAME']}' not in the store yet" in waiting.value.details()

        # -- the calibrate Job starts too, and waits for the model instead of failing; it is held
        # (SIGSTOP) once it says so, as a Job pod that runs late would be
        calibrate = start_job(cluster, "expert-store-calibrate")
        procs.append(calibrate)
        assert any(a.startswith("dns:///127.0.0.1:") for a in calibrate.argv)  # the k8s:// target, locally
        calibrate.wait_text(f"model {settings['MODEL_NAME']} is not in the store yet; waiting for it", 60)
        calibrate.proc.send_signal(signal.SIGSTOP)

        # -- the pack Job's next attempt uploads into the serving replica over gRPC; the store
        # writes what it receives into its own claim (the Job mounts no store volume)
        assert not any(shared[claim].rglob("manifest.json"))
        pack, _ = run_pack_job(cluster, ckpt_dir)
        assert pack.returncode == 0, pack.stdout + pack.stderr
        assert "into 1 replica(s)" in pack.stdout, pack.stdout
        assert any(shared[claim].rglob("manifest.json"))

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

        # -- the decoder (adaptive gating) sees the model but waits for its calibration profile:
        # still unready, Generate UNAVAILABLE saying why
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(decoder_addr) as channel:
            while True:
                with pytest.raises(grpc.RpcError) as waiting:
                    list(decoder_pb2_grpc.DecoderStub(channel).Generate(request, timeout=30, metadata=auth))
                assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE
                if "not calibrated yet" in waiting.value.details():
                    break
                assert time.monotonic() < deadline, waiting.value.details()
                time.sleep(0.5)
        assert readiness(cluster, dc) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert dproc.proc.poll() is None

        # -- the calibrate Job resumes: it finds the model, calibrates it on the ConfigMap's text
        # and stores the profile with it in every ready store replica, then completes
        calibrate.proc.send_signal(signal.SIGCONT)
        assert calibrate.proc.wait(120) == 0, calibrate.output()
        assert f"stored profile.json for {model} in 1 replica(s)" in calibrate.output(), calibrate.output()
        with StoreClient.open(store_addr, token=token, deadline_s=30) as client:
            profile = client.manifest(model).profile
        assert profile and profile["tokens"] >= 512 and set(profile["budget_for_single_ratio"]) >= {"0.25"}
        assert any(shared[claim].rglob("profile.json"))

        # -- the decoder, unrestarted, sees the profile (through the discovered store), loads the
        # model and turns ready: the kubelet keeps probing readiness (a failure never kills)
        deadline = time.monotonic() + 60
        while readiness(cluster, dc) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, f"decoder not ready 60s after the pack:\n{dproc.output()}"
            assert dproc.proc.poll() is None, f"decoder exited:\n{dproc.output()}"
            time.sleep(0.5)
        health_checks(cluster, "decoder", dc, denv, dmounts, dproc)
        with grpc.insecure_channel(decoder_addr) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            with pytest.raises(grpc.RpcError) as refused:  # the decoder's Secret is wired in
                list(stub.Generate(request, timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            deltas, usage = [], None
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
