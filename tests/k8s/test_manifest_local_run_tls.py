"""The TLS component, run locally: the dev overlay plus deploy/k8s/components/tls, with the
two kubernetes.io/tls Secrets an operator (or cert-manager) would create. The store and the
decoder start from their rendered command lines, pass their TLS gRPC probes, the decoder
reaches the store by IP while verifying the store's certificate for the Service name (as do
the pack and calibrate Jobs), and a Generate over TLS (and the decoder's bearer token) completes through the decoder's Service
port. See test_manifest_local_run.py for the plaintext run and what is substituted."""

from __future__ import annotations

import base64
import datetime
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from k8s_render import OVERLAYS, kubectl

pytestmark = [
    pytest.mark.skipif(kubectl() is None, reason="kubectl (for `kubectl kustomize`) is not on PATH"),
    pytest.mark.timeout(240),
]

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from local_cluster import (NAMESPACE, Cluster, health_checks, run_pack_job, start, start_job,  # noqa: E402
                           store_claims, wait_ready)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(names: dict[str, list[str]]) -> tuple[bytes, dict[str, tuple[bytes, bytes]]]:
    """A CA and one server certificate per entry (DNS names as SANs): (ca_pem, {n: (crt, key)})."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("adapmoe test CA")).issuer_name(_name("adapmoe test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {}
    for name, dns in names.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(dns[0])).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[name] = (cert.public_bytes(serialization.Encoding.PEM),
                     key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return ca.public_bytes(serialization.Encoding.PEM), out


def tls_secret(name: str, crt: bytes, key: bytes, ca: bytes) -> dict:
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "data": {"tls.crt": b64(crt), "tls.key": b64(key), "ca.crt": b64(ca)}}


def render_dev_with_tls(tmp_path: Path) -> list[dict]:
    tree = tmp_path / "k8s"
    shutil.copytree(OVERLAYS["base"].parent, tree)
    overlay = tree / "overlays" / "dev-tls"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources:\n  - ../dev\ncomponents:\n  - ../../components/tls\n")
    proc = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_tls_component_runs_locally(tmp_path):
    from checkpoints import make_mixtral_checkpoint

    from decoder._proto.adapmoe.v1 import decoder_pb2, decoder_pb2_grpc

    docs = render_dev_with_tls(tmp_path / "render")
    store_name = f"expert-store.{NAMESPACE}.svc"
    decoder_name = f"decoder.{NAMESPACE}.svc"
    ca, certs = make_pki({"store": [store_name], "decoder": [decoder_name]})
    docs += [tls_secret("adapmoe-store-tls", *certs["store"], ca), tls_secret("adapmoe-decoder-tls", *certs["decoder"], ca)]
    cluster = Cluster(tuple(docs), tmp_path / "run", probe_tls_ca=ca,
                      probe_tls_names={"expert-store": store_name, "decoder": decoder_name})
    # the demo checkpoint (in place of the train-demo init container), built meanwhile
    built = tmp_path / "demo-checkpoint"
    maker = threading.Thread(target=make_mixtral_checkpoint, args=(built,),
                             kwargs=dict(hidden=64, ffn=96, layers=2, experts=4), daemon=True)
    maker.start()
    procs = []
    try:
        _, _, _, _, rproc = start(cluster, "Deployment", "redis")
        procs.append(rproc)
        shared = store_claims(cluster, tmp_path / "pv")
        _, sc, senv, smounts, sproc = start(cluster, "StatefulSet", "expert-store", shared=shared,
                                            ready_line="listening on ")
        procs.append(sproc)
        health_checks(cluster, "expert-store", sc, senv, smounts, sproc)  # TLS probes
        # the store's port refuses plaintext now
        with grpc.insecure_channel(f"127.0.0.1:{cluster.service_port('expert-store', 'grpc')}") as ch:
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)

        maker.join(120)
        assert (built / "config.json").exists(), "building the demo checkpoint failed"
        # the pack Job uploads over TLS, verifying the store's certificate for the Service
        # name while it dials 127.0.0.1 (pod IPs in a cluster)
        pack, pack_argv = run_pack_job(cluster, built)
        assert pack.returncode == 0, pack.stdout + pack.stderr
        assert pack_argv[pack_argv.index("--tls-server-name") + 1] == store_name
        # the calibrate Job reads the model and uploads its profile over TLS the same way
        calibrate = start_job(cluster, "expert-store-calibrate")
        procs.append(calibrate)
        assert calibrate.argv[calibrate.argv.index("--store-tls-server-name") + 1] == store_name
        assert calibrate.proc.wait(120) == 0, calibrate.output()
        assert "stored profile.json for demo in 1 replica(s)" in calibrate.output(), calibrate.output()

        # the decoder dials the store at 127.0.0.1 and verifies its certificate for the
        # Service name (--store-tls-server-name), as it dials pod IPs in a cluster
        _, dc, denv, dmounts, dproc = start(cluster, "Deployment", "decoder")
        procs.append(dproc)
        # it serves at once (--wait-for-model) and turns ready once the model is loaded
        wait_ready(cluster, "decoder", dc, denv, dmounts, dproc)
        health_checks(cluster, "decoder", dc, denv, dmounts, dproc)
        token = (dmounts["/etc/adapmoe/decoder-token"] / "token").read_text().strip()
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(f"127.0.0.1:{cluster.service_port('decoder', 'grpc')}", creds,
                                 options=[("grpc.ssl_target_name_override", decoder_name)]) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            request = decoder_pb2.GenerateRequest(prompt="Hello", max_tokens=4,
                                                  sampling=decoder_pb2.SamplingParams(temperature=0.0))
            events = list(stub.Generate(request, timeout=120, metadata=(("authorization", f"Bearer {token}"),)))
        usage = events[-1].usage
        assert usage.completion_tokens == sum(len(e.delta.token_ids) for e in events[:-1]) > 0
    finally:
        for p in reversed(procs):
            p.stop()
