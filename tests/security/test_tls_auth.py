"""TLS, mTLS and bearer tokens end to end: `expert-store serve` with TLS, client
certificates required (mTLS) and a bearer token; `moe-decoder serve` reaching it with its
client certificate and the store token, and itself serving mTLS with its own bearer token.

Proves: the right credentials work (tokens identical to an in-process run); a client without
the token gets UNAUTHENTICATED, one without TLS or with the wrong CA / certificate fails the
handshake (UNAVAILABLE); a decoder without its client certificate cannot reach the store;
health checks need no token; neither token appears in any log line, metric or stats reply.
Certificates are made at test time (tests/security/sec_pki.py).
"""

from __future__ import annotations

import ssl
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sec_pki import make_pki
from sec_procs import PROMPTS, ServiceProcess, cli, decoder_proc, free_port, generate, pack_tiny_model, status_of

from decoder.client import DecoderClient, DecoderError
from decoder.cli import TOKEN_ENV as DECODER_TOKEN_ENV
from decoder.cli import read_auth_token
from decoder._proto.adapmoe.v1 import decoder_pb2 as dpb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as dpb_grpc
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as spb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as spb_grpc
from expert_store.client import StoreClient
from expert_store.errors import StoreError, Unavailable

pytestmark = pytest.mark.timeout(170)
MODEL, MAX_TOKENS = "tiny", 12
STORE_TOKEN = "store-tok-7f3a9c1e5b2d4086"
DECODER_TOKEN = "decoder-tok-0b8e6d2f4a1c3957"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tls-auth")


@pytest.fixture(scope="module")
def pki(workdir):
    return make_pki(workdir / "pki")


@pytest.fixture(scope="module")
def store_dir(workdir):
    return pack_tiny_model(workdir, MODEL)


@pytest.fixture(scope="module")
def reference(store_dir):
    from decoder import Engine

    with Engine.from_store(str(store_dir), MODEL) as eng:
        return eng.generate(PROMPTS[0], max_tokens=MAX_TOKENS).token_ids


@pytest.fixture(scope="module")
def store(workdir, pki, store_dir):
    """TLS + client certificates required + a bearer token (from a file) + metrics."""
    (workdir / "store.token").write_text(STORE_TOKEN + "\n")
    metrics = free_port()
    proc = ServiceProcess(cli("expert-store") + [
        "serve", "--store", str(store_dir), "--listen", f"127.0.0.1:{free_port()}", "--ram-bytes", "0",
        "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"),
        "--tls-client-ca", pki.path("ca.pem"), "--token-file", str(workdir / "store.token"),
        "--metrics-port", str(metrics)])
    proc.metrics = f"127.0.0.1:{metrics}"
    with proc:
        yield proc


@pytest.fixture(scope="module")
def decoder(workdir, pki, store):
    """mTLS for its clients (certificates from the test CA required), its own token (from
    $MOE_DECODER_TOKEN), mTLS + the store token (from a file) towards the store."""
    (workdir / "store-client.token").write_text(STORE_TOKEN)
    mp = pytest.MonkeyPatch()
    mp.setenv(DECODER_TOKEN_ENV, DECODER_TOKEN)  # children inherit it (service_procs.child_env)
    mp.delenv("EXPERT_STORE_TOKEN", raising=False)
    try:
        proc = decoder_proc(store.address, MODEL, "--store-token-file", str(workdir / "store-client.token"),
                            "--store-tls-ca", pki.path("ca.pem"), "--store-tls-cert", pki.path("client.pem"),
                            "--store-tls-key", pki.path("client.key"),
                            "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"),
                            "--tls-client-ca", pki.path("ca.pem"), "--http-listen", "127.0.0.1:0")
        proc.start()
    finally:
        mp.undo()
    try:
        yield proc
    finally:
        proc.stop()


def tls_channel(address: str, pki, cert: bytes | None = b"client", key: bytes | None = None, ca: bytes | None = None):
    """A TLS channel trusting the test CA, presenting the test client certificate (cert=None: none)."""
    if cert == b"client":
        cert, key = pki.client_cert_pem, pki.client_key_pem
    creds = grpc.ssl_channel_credentials(root_certificates=ca or pki.ca_pem, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds)


AUTH = (("authorization", f"Bearer {DECODER_TOKEN}"),)


def test_decoder_with_tls_and_token_generates_the_reference_tokens(decoder, pki, reference):
    with tls_channel(decoder.address, pki) as ch:
        ids, _, usage = generate(dpb_grpc.DecoderStub(ch), metadata=AUTH, prompt=PROMPTS[0], max_tokens=MAX_TOKENS)
    assert ids == reference and usage.completion_tokens == MAX_TOKENS


def test_decoder_client_and_the_http_api_over_mtls_with_the_token(decoder, pki, reference):
    """DecoderClient (PEM paths and bytes) and the openai SDK over HTTPS: the same certificates
    and token as gRPC; a wrong token or no client certificate is refused."""
    import openai

    tls = dict(tls_ca=pki.ca_pem, tls_cert=pki.path("client.pem"), tls_key=pki.path("client.key"), deadline_s=60)
    with DecoderClient(decoder.address, token=DECODER_TOKEN, **tls) as c:
        r = c.generate(PROMPTS[0], max_tokens=MAX_TOKENS)
        assert list(r.token_ids) == reference and r.usage.completion_tokens == MAX_TOKENS and c.ready()
    with DecoderClient(decoder.address, token="wrong", **tls) as c:
        with pytest.raises(DecoderError) as e:
            c.generate(PROMPTS[0], max_tokens=2)
        assert e.value.code == "UNAUTHENTICATED"

    def https(cert: bool, token: str):
        ctx = ssl.create_default_context(cafile=pki.path("ca.pem"))
        if cert:
            ctx.load_cert_chain(pki.path("client.pem"), pki.path("client.key"))
        return openai.OpenAI(base_url=f"https://{decoder.http}/v1", api_key=token, max_retries=0, timeout=60,
                             http_client=openai.DefaultHttpxClient(verify=ctx, timeout=60))

    with https(True, DECODER_TOKEN) as oc:
        out = oc.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        assert out.usage.completion_tokens == MAX_TOKENS
    with https(True, "wrong") as oc:
        with pytest.raises(openai.AuthenticationError):
            oc.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2)
    with https(False, DECODER_TOKEN) as oc:
        with pytest.raises(openai.APIConnectionError):
            oc.models.list()


def test_decoder_refuses_clients_without_the_token_or_tls(decoder, pki):
    with tls_channel(decoder.address, pki) as ch:
        stub = dpb_grpc.DecoderStub(ch)
        req = dpb.GenerateRequest(prompt=PROMPTS[1], max_tokens=2)
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", DECODER_TOKEN),),
                         (("authorization", f"Bearer {DECODER_TOKEN}x"),), (("authorization", "Bearer "),),
                         (("authorization", f"bearer {DECODER_TOKEN}"),)):
            assert status_of(lambda: stub.Generate(req, timeout=10, metadata=metadata)) \
                == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert status_of(lambda: stub.GetStats(dpb.GetStatsRequest(), timeout=10, metadata=metadata)) \
                == grpc.StatusCode.UNAUTHENTICATED
        # probes need no token
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status \
            == health_pb2.HealthCheckResponse.SERVING
    # plaintext against TLS, or a server certificate from a CA the client does not trust:
    # the handshake fails, the RPC never reaches the servicer
    with grpc.insecure_channel(decoder.address) as ch:
        assert status_of(lambda: dpb_grpc.DecoderStub(ch).GetStats(dpb.GetStatsRequest(), timeout=5, metadata=AUTH)) \
            == grpc.StatusCode.UNAVAILABLE
    with tls_channel(decoder.address, pki, ca=pki.stranger_cert_pem) as ch:
        assert status_of(lambda: dpb_grpc.DecoderStub(ch).GetStats(dpb.GetStatsRequest(), timeout=5, metadata=AUTH)) \
            == grpc.StatusCode.UNAVAILABLE
    # mTLS: no client certificate, or one from a CA the decoder does not trust: no handshake,
    # even with the right token
    for cert, key in ((None, None), (pki.stranger_cert_pem, pki.stranger_key_pem)):
        with tls_channel(decoder.address, pki, cert=cert, key=key) as ch:
            assert status_of(lambda: dpb_grpc.DecoderStub(ch).GetStats(dpb.GetStatsRequest(), timeout=5,
                                                                       metadata=AUTH)) == grpc.StatusCode.UNAVAILABLE


def test_store_needs_client_certificate_and_token(store, pki, store_dir):
    want = (store_dir / "models" / MODEL / "experts" / "L000" / "E000.bf16.blob").read_bytes()
    full = dict(tls_ca=pki.ca_pem, tls_cert=pki.client_cert_pem, tls_key=pki.client_key_pem, deadline_s=5)
    with StoreClient.open(store.address, token=STORE_TOKEN, **full) as c:
        assert bytes(c.fetch_expert(MODEL, 0, 0, "bf16")) == want
    with StoreClient.open(store.address, token="", max_attempts=1, **full) as c:   # "" = no token
        with pytest.raises(StoreError) as e:
            c.manifest(MODEL)
        assert e.value.code == "UNAUTHENTICATED"
    with StoreClient.open(store.address, token=STORE_TOKEN[:-1], max_attempts=1, **full) as c:
        with pytest.raises(StoreError) as e:
            c.fetch_expert(MODEL, 0, 0, "bf16")
        assert e.value.code == "UNAUTHENTICATED"
    # no client certificate, one from a stranger CA, or no TLS at all: no connection
    for kw in (dict(tls_ca=pki.ca_pem), dict(tls_ca=pki.ca_pem, tls_cert=pki.stranger_cert_pem,
                                              tls_key=pki.stranger_key_pem), {}):
        with StoreClient.open(store.address, token=STORE_TOKEN, deadline_s=5, max_attempts=1, **kw) as c:
            with pytest.raises(Unavailable):
                c.manifest(MODEL)


def test_decoder_without_its_client_certificate_cannot_reach_the_store(workdir, pki, store):
    (workdir / "store-client.token").write_text(STORE_TOKEN)
    proc = decoder_proc(store.address, MODEL, "--store-token-file", str(workdir / "store-client.token"),
                        "--store-tls-ca", pki.path("ca.pem"), "--store-deadline", "3", metrics=False)
    proc.ready_timeout = 60
    with pytest.raises(RuntimeError):
        proc.start()  # it exits (the store's manifest is unreachable) instead of serving
    text = proc.stderr_text()
    assert "UNAVAILABLE" in text or "Unavailable" in text or "unavailable" in text
    assert "Traceback" not in text and STORE_TOKEN not in text


def test_tokens_never_appear_in_logs_metrics_or_stats(decoder, store, pki):
    # some refused and some accepted traffic first, so there is something to log
    with tls_channel(decoder.address, pki) as ch:
        stub = dpb_grpc.DecoderStub(ch)
        generate(stub, metadata=AUTH, prompt=PROMPTS[2], max_tokens=3)
        status_of(lambda: stub.Generate(dpb.GenerateRequest(prompt="x", max_tokens=1), timeout=5,
                                        metadata=(("authorization", f"Bearer {DECODER_TOKEN[:-2]}"),)))
        stats = stub.GetStats(dpb.GetStatsRequest(), timeout=10, metadata=AUTH)
    with tls_channel(store.address, pki, cert=pki.client_cert_pem, key=pki.client_key_pem) as ch:
        st = spb_grpc.ExpertStoreStub(ch)
        status_of(lambda: st.GetManifest(spb.GetManifestRequest(model=MODEL), timeout=5,
                                         metadata=(("authorization", f"Bearer {STORE_TOKEN[:-3]}"),)))
        stat = st.Stat(spb.StatRequest(), timeout=5, metadata=(("authorization", f"Bearer {STORE_TOKEN}"),))
    texts = {
        "decoder log": decoder.stderr_text() + "".join(decoder.stdout_lines),
        "store log": store.stderr_text() + "".join(store.stdout_lines),
        "decoder metrics": urllib.request.urlopen(f"http://{decoder.metrics}/metrics", timeout=10).read().decode(),
        "store metrics": urllib.request.urlopen(f"http://{store.metrics}/metrics", timeout=10).read().decode(),
        "decoder stats": str(stats),
        "store stat": str(stat),
    }
    assert texts["decoder log"] and "adapmoe_decoder_requests_total" in texts["decoder metrics"]
    for where, text in texts.items():
        for token in (STORE_TOKEN, DECODER_TOKEN):
            for piece in (token, token[:12], token[-12:]):  # nor a recognisable part of it
                assert piece not in text, f"{piece!r} leaked into the {where}"


def test_token_sources(tmp_path, monkeypatch):
    monkeypatch.setenv(DECODER_TOKEN_ENV, "from-env")
    f = tmp_path / "token"
    f.write_text("  from-file \n")
    assert read_auth_token(str(f)) == "from-file"     # the file wins, stripped
    assert read_auth_token(None) == "from-env"
    monkeypatch.delenv(DECODER_TOKEN_ENV)
    assert read_auth_token(None) is None
    f.write_text("\n")
    with pytest.raises(ValueError):
        read_auth_token(str(f))                         # an empty token file is an error, not "no auth"
