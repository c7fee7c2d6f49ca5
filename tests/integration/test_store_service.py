"""The expert store over real gRPC: a real redis-server, a real `expert-store serve`
subprocess on loopback, a checkpoint written by tests/checkpoints.py and packed with
`expert-store pack`.

Every blob fetched through gRPC must equal the source tensors bit for bit (bf16) or within
the quantizer's bound (int8/int4); bad requests get the right status codes; auth, TLS,
resume from an offset, PutBlob atomicity, health, reflection, metrics and `--workers 2`.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
import torch
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from checkpoints import load_reference_model, make_mixtral_checkpoint, reference_expert
from redis_server import RedisServer, free_port
from service_procs import StoreServerProcess, run_cli

from expert_store import format as blob_format
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as pb_grpc
from expert_store.client import StoreClient
from expert_store.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted, StoreError, Unavailable
from expert_store.quant import blob_to_tensors, error_bound, expert_to_blob

MODEL = "tiny"
LAYERS, EXPERTS, HIDDEN, FFN = 2, 4, 512, 512  # a bf16 expert is 1.5 MB: several chunks
PRECISIONS = ("bf16", "int8", "int4")
TOKEN = "s3cret-token-for-tests"
MAX_REFS = 8
DEADLINE = 20.0
pytestmark = pytest.mark.timeout(240)


# --------------------------------------------------------------------------------------------
# fixtures: one checkpoint, one Redis, one packed store, one server for the module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store-service")


@pytest.fixture(scope="module")
def checkpoint(workdir):
    ckpt, _ = make_mixtral_checkpoint(workdir / "ckpt", hidden=HIDDEN, ffn=FFN, layers=LAYERS, experts=EXPERTS,
                                      heads=4, kv_heads=2, dtype=torch.bfloat16, seed=7)
    return ckpt


@pytest.fixture(scope="module")
def redis(workdir):
    server = RedisServer(workdir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def store_dir(workdir, checkpoint, redis) -> Path:
    store = workdir / "store"
    r = run_cli("pack", str(checkpoint), "--store", str(store), "--model", MODEL,
                "--precisions", ",".join(PRECISIONS), "--redis", redis.url, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"packed {MODEL}" in r.stdout
    return store


@pytest.fixture(scope="module")
def server(workdir, store_dir, redis):
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    with StoreServerProcess(store_dir, "--redis", redis.url, "--max-refs", str(MAX_REFS), "--max-streams", "2",
                            "--token-file", str(token_file), log_dir=workdir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with StoreClient.open(f"grpc://{server.address}", token=TOKEN, max_refs_per_call=MAX_REFS, max_streams=2,
                          deadline_s=DEADLINE) as c:
        yield c


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.ExpertStoreStub(channel)


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def blob_path(store: Path, model: str, layer: int, expert: int, precision: str) -> Path:
    return store / "models" / blob_format.expert_key(model, layer, expert, precision)


def all_refs():
    return [(l, e, p) for l in range(LAYERS) for e in range(EXPERTS) for p in PRECISIONS]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb.Manifest | pb.PutBlobResponse | pb.StatResponse):
            list(result)
    return info.value.code()


# --------------------------------------------------------------------------------------------
# data: every blob, bit for bit / within the bound


def test_cli_inspect_and_verify_the_packed_store(store_dir):
    r = run_cli("inspect", "--store", str(store_dir))
    assert r.returncode == 0, r.stderr
    for p in PRECISIONS:
        assert f"{MODEL}" in r.stdout and p in r.stdout
    r = run_cli("verify", "--store", str(store_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checksums ok" in r.stdout


def test_every_blob_through_grpc_matches_the_source_tensors(client, store_dir, checkpoint):
    manifest = client.manifest(MODEL)
    assert (manifest.model, manifest.num_layers, manifest.num_experts) == (MODEL, LAYERS, EXPERTS)
    assert manifest.precisions == PRECISIONS
    assert set(manifest.blobs) == set(all_refs())
    assert manifest.config["hidden_size"] == HIDDEN
    assert json.loads(manifest.tokenizer_json)["model"]["type"] == "BPE"

    refs = all_refs()
    got = dict(client.fetch_experts(MODEL, refs))  # 24 refs, split into calls of <= 8
    assert set(got) == set(refs)
    reference = load_reference_model(checkpoint, dtype=torch.bfloat16)
    checked = {"bf16": 0, "int8": 0, "int4": 0}
    for (layer, expert, precision), blob in got.items():
        blob = bytes(blob)
        # the very bytes on NVMe, and the manifest's size/xxh3
        assert blob == blob_path(store_dir, MODEL, layer, expert, precision).read_bytes()
        assert (len(blob), blob_format.blob_checksum(blob)) == manifest.blobs[(layer, expert, precision)]
        source = reference_expert(reference, layer, expert)
        tensors = blob_to_tensors(blob, dequant=False)
        for name in ("w1", "w3", "w2"):
            want = source[name]
            if precision == "bf16":
                assert tensors[name].dtype == torch.bfloat16
                assert torch.equal(tensors[name].view(torch.int16), want.view(torch.int16)), (layer, expert, name)
            else:
                qw = tensors[name]
                deq = qw.dequantize(torch.float32)
                bound = error_bound(qw.scales, qw.group_size, want.shape[1])
                err = (deq - want.float()).abs()
                assert bool((err <= bound).all()), f"{precision} L{layer} E{expert} {name}: max excess " \
                    f"{float((err - bound).max())}"
        checked[precision] += 1
    assert checked == {p: LAYERS * EXPERTS for p in PRECISIONS}


def test_fetch_expert_lands_in_a_caller_buffer(client, store_dir):
    want = blob_path(store_dir, MODEL, 1, 3, "bf16").read_bytes()
    assert len(want) > 1 << 20  # several chunks
    buf = bytearray(len(want) + 4096)
    view = client.fetch_expert(MODEL, 1, 3, "bf16", out=memoryview(buf), priority="prefetch")
    assert isinstance(view, memoryview) and len(view) == len(want)
    assert bytes(buf[: len(want)]) == want and buf[len(want):] == bytes(4096)
    with pytest.raises(InvalidArgument):
        client.fetch_expert(MODEL, 1, 3, "bf16", out=bytearray(100))


def test_dense_through_grpc_equals_the_checkpoint(client, checkpoint):
    client.manifest(MODEL)  # lets fetch_dense check size and xxh3
    dense = load_safetensors(bytes(client.fetch_dense(MODEL)))
    names = set()
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if ".experts." in name:
                    assert name not in dense
                    continue
                key = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
                assert torch.equal(dense[key], f.get_tensor(name)), name
                names.add(key)
    assert "model.embed_tokens.weight" in names and set(dense) == names


# --------------------------------------------------------------------------------------------
# validation and status codes


@pytest.mark.parametrize("model,refs,code", [
    ("../etc", [(0, 0, "bf16")], grpc.StatusCode.INVALID_ARGUMENT),
    ("a/b", [(0, 0, "bf16")], grpc.StatusCode.INVALID_ARGUMENT),
    ("nope", [(0, 0, "bf16")], grpc.StatusCode.NOT_FOUND),
    (MODEL, [(LAYERS, 0, "bf16")], grpc.StatusCode.INVALID_ARGUMENT),
    (MODEL, [(0, EXPERTS, "bf16")], grpc.StatusCode.INVALID_ARGUMENT),
    (MODEL, [(0, 0, "fp8")], grpc.StatusCode.INVALID_ARGUMENT),
    (MODEL, [], grpc.StatusCode.INVALID_ARGUMENT),
    (MODEL, [(0, 0, "bf16")] * (MAX_REFS + 1), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_fetch_validation_status_codes(stub, model, refs, code):
    request = pb.FetchExpertsRequest(model=model, refs=[pb.ExpertRef(layer=l, expert=e, precision=p)
                                                        for l, e, p in refs])
    assert code_of(lambda: stub.FetchExperts(request, timeout=DEADLINE, metadata=AUTH)) == code


def test_other_rpcs_validate_too(stub, store_dir):
    size = blob_path(store_dir, MODEL, 0, 0, "int4").stat().st_size
    past_end = pb.FetchExpertsRequest(model=MODEL, refs=[pb.ExpertRef(layer=0, expert=0, precision="int4",
                                                                      offset=size + 1)])
    assert code_of(lambda: stub.FetchExperts(past_end, timeout=DEADLINE, metadata=AUTH)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.GetManifest(pb.GetManifestRequest(model="x/../y"), timeout=DEADLINE,
                                            metadata=AUTH)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.GetManifest(pb.GetManifestRequest(model="missing"), timeout=DEADLINE,
                                            metadata=AUTH)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.FetchDense(pb.FetchDenseRequest(model="missing"), timeout=DEADLINE,
                                           metadata=AUTH)) == grpc.StatusCode.NOT_FOUND


def test_client_maps_status_codes_to_store_errors(client):
    with pytest.raises(NotFound):
        client.manifest("missing")
    with pytest.raises(InvalidArgument):
        client.fetch_expert(MODEL, LAYERS + 5, 0, "bf16")
    with pytest.raises(InvalidArgument):  # caught before the wire
        client.fetch_expert("../x", 0, 0, "bf16")
    with pytest.raises(NotFound):
        list(client.fetch_experts("missing", [(0, 0, "bf16")]))


def test_concurrent_stream_limit_answers_resource_exhausted_at_once(server, client):
    # server: --max-streams 2 (prefetch may hold 1). Open streams and read only their first chunk,
    # so they stay open: with BDP probing off the HTTP/2 window stays at 64 KiB and flow
    # control holds back the rest of the 12 MB each one asked for.
    many = [pb.ExpertRef(layer=l, expert=e, precision="bf16") for l in range(LAYERS) for e in range(EXPERTS)]
    channel = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
    stub = pb_grpc.ExpertStoreStub(channel)

    def open_stream(priority):
        call = stub.FetchExperts(pb.FetchExpertsRequest(model=MODEL, refs=many, priority=priority),
                                 timeout=DEADLINE, metadata=AUTH)
        next(call)
        return call

    first = open_stream(pb.DEMAND)
    try:
        assert code_of(lambda: open_stream(pb.PREFETCH)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        second = open_stream(pb.DEMAND)  # demand may use the slot prefetch may not
        try:
            # refused at once, not queued (a queued call would wait for the slot and end in
            # DEADLINE_EXCEEDED) and not retried: the server said no
            with pytest.raises(ResourceExhausted):
                client.fetch_expert(MODEL, 0, 0, "int4")
        finally:
            second.cancel()
    finally:
        first.cancel()
    deadline = time.monotonic() + 10
    while stub.Stat(pb.StatRequest(), timeout=DEADLINE, metadata=AUTH).active_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub.Stat(pb.StatRequest(), timeout=DEADLINE, metadata=AUTH).active_streams == 0
    assert len(client.fetch_expert(MODEL, 0, 0, "int4")) > 0
    channel.close()


# --------------------------------------------------------------------------------------------
# resume, auth, PutBlob


def test_resume_from_offset_in_chunks_of_256k_to_1m(stub, store_dir):
    blob_a = blob_path(store_dir, MODEL, 0, 1, "bf16").read_bytes()
    blob_b = blob_path(store_dir, MODEL, 1, 2, "int8").read_bytes()
    off_a = len(blob_a) - (1 << 20) - 12345
    request = pb.FetchExpertsRequest(model=MODEL, refs=[
        pb.ExpertRef(layer=0, expert=1, precision="bf16", offset=off_a),
        pb.ExpertRef(layer=1, expert=2, precision="int8", offset=0),
        pb.ExpertRef(layer=0, expert=1, precision="bf16", offset=len(blob_a)),  # nothing left
    ])
    received: dict[int, bytearray] = {0: bytearray(), 1: bytearray(), 2: bytearray()}
    lasts = []
    for chunk in stub.FetchExperts(request, timeout=DEADLINE, metadata=AUTH):
        assert chunk.total_size == (len(blob_b) if chunk.index == 1 else len(blob_a))
        start = {0: off_a, 1: 0, 2: len(blob_a)}[chunk.index]
        assert chunk.offset == start + len(received[chunk.index])
        assert len(chunk.data) <= 1 << 20
        if not chunk.last:
            assert len(chunk.data) >= 256 << 10
        else:
            lasts.append(chunk.index)
        received[chunk.index] += chunk.data
    assert lasts == [0, 1, 2]  # in request order, each ended
    assert bytes(received[0]) == blob_a[off_a:]
    assert bytes(received[1]) == blob_b
    assert received[2] == b""
    dense = b"".join(c.data for c in stub.FetchDense(pb.FetchDenseRequest(model=MODEL, offset=1000),
                                                     timeout=DEADLINE, metadata=AUTH))
    assert dense == (store_dir / "models" / MODEL / "dense.safetensors").read_bytes()[1000:]


def test_bearer_token_required_and_never_logged(server, channel, stub):
    request = pb.GetManifestRequest(model=MODEL)
    assert code_of(lambda: stub.GetManifest(request, timeout=DEADLINE)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: stub.GetManifest(request, timeout=DEADLINE, metadata=(("authorization", "Bearer nope"),))) \
        == grpc.StatusCode.UNAUTHENTICATED
    fetch = pb.FetchExpertsRequest(model=MODEL, refs=[pb.ExpertRef(layer=0, expert=0, precision="bf16")])
    assert code_of(lambda: stub.FetchExperts(fetch, timeout=DEADLINE, metadata=(("authorization", TOKEN),))) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert stub.GetManifest(request, timeout=DEADLINE, metadata=AUTH).model == MODEL
    # health checks need no token (kubelet probes send none)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE).status \
        == health_pb2.HealthCheckResponse.SERVING
    with StoreClient.open(f"grpc://{server.address}", token="wrong", deadline_s=DEADLINE) as bad:
        with pytest.raises(StoreError) as info:
            bad.manifest(MODEL)
        assert info.value.code == "UNAUTHENTICATED"
    assert TOKEN not in server.log()


def test_dns_target_resolves_to_the_replicas(server, store_dir):
    with StoreClient.open(f"dns:///localhost:{server.port}", token=TOKEN, deadline_s=DEADLINE) as c:
        assert c.replicas() in (["127.0.0.1:%d" % server.port], ["[::1]:%d" % server.port])
        if c.replicas()[0].startswith("["):
            pytest.skip("localhost resolves to ::1 only; the server listens on 127.0.0.1")
        assert bytes(c.fetch_expert(MODEL, 1, 0, "int4")) == blob_path(store_dir, MODEL, 1, 0, "int4").read_bytes()


def test_put_blob_is_all_or_nothing(client, stub, store_dir):
    model = "uploaded"
    config = json.dumps({"num_hidden_layers": 1, "num_local_experts": 2, "hidden_size": 64}).encode()
    assert client.put(model, "config", config)[1] == len(config)
    g = torch.Generator().manual_seed(3)
    weights = {"w1": torch.randn(96, 64, generator=g), "w3": torch.randn(96, 64, generator=g),
               "w2": torch.randn(64, 96, generator=g)}
    blob = expert_to_blob(model, 0, 1, "bf16", weights)
    path = blob_path(store_dir, model, 0, 1, "bf16")
    digest = xxhash.xxh3_128_hexdigest(blob)

    def upload(header, parts, fail_after=None):
        def messages():
            yield pb.PutBlobChunk(header=header)
            for i, p in enumerate(parts):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("client breaks off mid-upload")
                yield pb.PutBlobChunk(data=p)
        return stub.PutBlob(messages(), timeout=DEADLINE, metadata=AUTH)

    header = pb.PutBlobHeader(model=model, kind="expert", layer=0, expert=1, precision="bf16",
                              total_size=len(blob), xxh3=digest)
    half = len(blob) // 2
    # broken off mid-way: nothing visible
    with pytest.raises(grpc.RpcError):
        upload(header, [blob[:half], blob[half:]], fail_after=1)
    assert not path.exists()
    # short: INVALID_ARGUMENT, nothing visible
    assert code_of(lambda: upload(header, [blob[:half]])) == grpc.StatusCode.INVALID_ARGUMENT
    assert not path.exists()
    # a flipped byte: DATA_LOSS, nothing visible
    bad = bytearray(blob)
    bad[half] ^= 0x40
    assert code_of(lambda: upload(header, [bytes(bad)])) == grpc.StatusCode.DATA_LOSS
    assert not path.exists()
    # header names another expert than the blob holds: INVALID_ARGUMENT
    other = pb.PutBlobHeader(model=model, kind="expert", layer=0, expert=0, precision="bf16",
                             total_size=len(blob), xxh3=digest)
    assert code_of(lambda: upload(other, [blob])) == grpc.StatusCode.INVALID_ARGUMENT
    assert not blob_path(store_dir, model, 0, 0, "bf16").exists()
    # data first, no header: INVALID_ARGUMENT
    assert code_of(lambda: stub.PutBlob(iter([pb.PutBlobChunk(data=b"x")]), timeout=DEADLINE, metadata=AUTH)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    # complete and correct: visible, identical, servable once a manifest lists it
    key, size = client.put(model, "expert", blob, layer=0, expert=1, precision="bf16", chunk_bytes=4096)
    assert (key, size) == (blob_format.expert_key(model, 0, 1, "bf16"), len(blob))
    assert path.read_bytes() == blob
    manifest = {"model": model, "num_layers": 1, "num_experts": 2, "precisions": ["bf16"],
                "blobs": [{"layer": 0, "expert": 1, "precision": "bf16", "size": len(blob),
                           "xxh3": blob_format.blob_checksum(blob)}]}
    client.put(model, "manifest", json.dumps(manifest).encode())
    assert bytes(client.fetch_expert(model, 0, 1, "bf16")) == blob


# --------------------------------------------------------------------------------------------
# health, reflection


def test_health_and_reflection_answer(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "adapmoe.v1.ExpertStore"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE).status \
            == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="adapmoe.v1.ExpertStore"),
    ]), timeout=DEADLINE, metadata=AUTH))
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"adapmoe.v1.ExpertStore", "grpc.health.v1.Health"} <= services
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the .proto, served


# --------------------------------------------------------------------------------------------
# workers, graceful shutdown, metrics


def live_workers_of(procs) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:  # gone
            pass
    return out


def live_workers(pid: int) -> list[psutil.Process]:
    """The server's worker processes (not multiprocessing's resource tracker), alive."""
    return live_workers_of(psutil.Process(pid).children())


def test_two_workers_serve_one_port_and_shut_down_gracefully(workdir, store_dir):
    metrics_port = free_port()
    srv = StoreServerProcess(store_dir, "--workers", "2", "--grace", "1", "--ram-bytes", "0",
                             "--metrics-port", str(metrics_port), log_dir=workdir).start()
    try:
        workers = live_workers(srv.pid)
        assert len(workers) == 2 and all(w.is_running() for w in workers)
        want = blob_path(store_dir, MODEL, 1, 1, "int8").read_bytes()
        for _ in range(4):  # separate clients: separate connections, spread by the kernel
            with StoreClient.open(srv.address, deadline_s=DEADLINE) as c:
                assert bytes(c.fetch_expert(MODEL, 1, 1, "int8")) == want
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'adapmoe_store_requests_total{method="FetchExperts",status="OK"} 4.0' in text
        assert "adapmoe_store_bytes_served_total" in text
        # the parent supervises: a worker that dies is replaced, the port keeps serving
        workers[0].kill()
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end:
            alive = live_workers(srv.pid)
            if len(alive) == 2 and workers[0].pid not in {p.pid for p in alive}:
                break
            time.sleep(0.1)
        assert len(alive) == 2 and workers[0].pid not in {p.pid for p in alive}
        workers = alive
        for _ in range(4):
            with StoreClient.open(srv.address, deadline_s=DEADLINE) as c:
                assert bytes(c.fetch_expert(MODEL, 1, 1, "int8")) == want
        # SIGTERM: health flips to NOT_SERVING first, then the workers drain and exit
        with grpc.insecure_channel(srv.address) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            srv.signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        assert srv.proc.wait(20) == 0
        assert not live_workers_of(workers)
    finally:
        srv.kill()


# --------------------------------------------------------------------------------------------
# integrity, TLS, CLI errors


def test_corrupt_blob_is_data_loss_never_served(workdir, store_dir):
    copy = workdir / "corrupt-store"
    shutil.copytree(store_dir, copy)
    victim = blob_path(copy, MODEL, 0, 2, "int8")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with StoreServerProcess(copy, "--ram-bytes", "0", log_dir=workdir) as srv:
        with StoreClient.open(srv.address, deadline_s=DEADLINE) as c:
            with pytest.raises(DataLoss):
                c.fetch_expert(MODEL, 0, 2, "int8")
            assert bytes(c.fetch_expert(MODEL, 0, 3, "int8")) == blob_path(store_dir, MODEL, 0, 3, "int8").read_bytes()
    r = run_cli("verify", "--store", str(copy))
    assert r.returncode != 0
    assert blob_format.expert_key(MODEL, 0, 2, "int8") in r.stdout


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary to make test certificates")
def test_tls_with_client_certificates(workdir, store_dir):
    pki = workdir / "pki"
    pki.mkdir(exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=pki)
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=pki)
        (pki / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=pki)
    with StoreServerProcess(store_dir, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                            "--tls-client-ca", str(pki / "ca.pem"), log_dir=workdir) as srv:
        with StoreClient.open(srv.address, tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "client.pem"),
                              tls_key=str(pki / "client.key"), deadline_s=DEADLINE) as c:
            assert c.manifest(MODEL).num_layers == LAYERS
            assert bytes(c.fetch_expert(MODEL, 0, 0, "int4")) == blob_path(store_dir, MODEL, 0, 0, "int4").read_bytes()
        # no client certificate, or no TLS at all: the handshake fails
        with StoreClient.open(srv.address, tls_ca=str(pki / "ca.pem"), deadline_s=5, max_attempts=1) as c:
            with pytest.raises(Unavailable):
                c.manifest(MODEL)
        with StoreClient.open(srv.address, deadline_s=5, max_attempts=1) as c:
            with pytest.raises(Unavailable):
                c.manifest(MODEL)


def test_cli_errors_are_one_line_without_traceback(workdir, checkpoint):
    cases = [
        ("serve", "--store", str(workdir / "no-such-store"), "--listen", "127.0.0.1:0"),
        ("pack", str(workdir / "no-such-ckpt"), "--store", str(workdir / "s2")),
        ("verify", "--store", str(workdir / "no-such-store")),
        ("serve", "--store", str(workdir), "--tls-cert", str(workdir / "x.pem")),
        ("serve", "--store", str(workdir), "--listen", "nonsense"),
        ("pack", str(checkpoint), "--store", str(workdir / "s3"), "--model", "../evil"),
    ]
    for args in cases:
        r = run_cli(*args, timeout=60)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr, (args, r.stderr)
        errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1, (args, r.stderr)
