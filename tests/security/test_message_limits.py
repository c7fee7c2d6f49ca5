"""Message size limits are explicit on both ends of both services: a message over the limit
is refused with RESOURCE_EXHAUSTED (by the receiver, or by the sender before it goes out),
never buffered without bound, and the server stays healthy.

    expert store: 16 MiB each way (server and StoreClient; a manifest carries tokenizer.json)
    decoder:      8 MiB each way (server); prompt text over 1 MiB is INVALID_ARGUMENT before that
"""

from __future__ import annotations

import json

import grpc
import pytest
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sec_procs import PROMPTS, decoder_proc, generate, pack_tiny_model, status_of, store_proc

from decoder import wire as decoder_wire
from expert_store import client as store_client
from expert_store import server as store_server
from decoder._proto.adapmoe.v1 import decoder_pb2 as dpb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as dpb_grpc
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as spb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as spb_grpc
from expert_store.client import StoreClient
from expert_store.errors import ResourceExhausted
from expert_store.store import ModelStore

pytestmark = pytest.mark.timeout(150)
MODEL = "tiny"
STORE_LIMIT = store_server.MAX_MESSAGE_BYTES
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    d = pack_tiny_model(tmp_path_factory.mktemp("limits"), MODEL)
    # a second model whose manifest cannot fit one message: tokenizer.json of 17 MiB
    with ModelStore.open(d, ram_bytes=0) as s:
        config = (d / "models" / MODEL / "config.json").read_bytes()
        tok = json.dumps({"pad": "x" * (STORE_LIMIT + (1 << 20))}).encode()
        for kind, data in (("config", config), ("tokenizer", tok),
                           ("manifest", json.dumps({"model": "huge", "num_layers": 2, "num_experts": 4,
                                                    "precisions": ["bf16"], "blobs": []}).encode())):
            s.put_file("huge", kind, data, xxhash.xxh3_128_hexdigest(data))
    return d


@pytest.fixture(scope="module")
def store(store_dir):
    with store_proc(store_dir) as s:
        yield s


def healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status \
            == health_pb2.HealthCheckResponse.SERVING


def test_limits_are_explicit_constants():
    assert store_server.MAX_MESSAGE_BYTES == store_client.MAX_MESSAGE_BYTES == 16 << 20
    assert decoder_wire.MAX_MESSAGE_BYTES == 8 << 20
    cfg = dict(store_server.server_options(store_server.ServerConfig()))
    assert cfg["grpc.max_receive_message_length"] == cfg["grpc.max_send_message_length"] == STORE_LIMIT


def test_store_server_refuses_oversized_requests(store):
    with grpc.insecure_channel(store.address, options=UNLIMITED) as ch:
        stub = spb_grpc.ExpertStoreStub(ch)
        # a FetchExperts request of 17 MiB (long "precision" strings)
        refs = [spb.ExpertRef(layer=0, expert=0, precision="p" * (1 << 20)) for _ in range(17)]
        e = status_of(lambda: stub.FetchExperts(spb.FetchExpertsRequest(model=MODEL, refs=refs), timeout=30))
        assert e == grpc.StatusCode.RESOURCE_EXHAUSTED
        # one PutBlob data message of 17 MiB
        header = spb.PutBlobHeader(model="up", kind="config", total_size=17 << 20, xxh3="0" * 32)
        msgs = iter([spb.PutBlobChunk(header=header), spb.PutBlobChunk(data=b"\0" * (17 << 20))])
        assert status_of(lambda: stub.PutBlob(msgs, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the server is fine and serves normal requests
        assert stub.GetManifest(spb.GetManifestRequest(model=MODEL), timeout=10).model == MODEL
    assert healthy(store.address)


def test_store_oversized_reply_is_refused_cleanly(store):
    # the server will not send a 17 MiB manifest; the client would not accept one either
    with StoreClient.open(store.address, deadline_s=20) as c:
        with pytest.raises(ResourceExhausted):
            c.manifest("huge")
        assert c.manifest(MODEL).model == MODEL
    with grpc.insecure_channel(store.address, options=UNLIMITED) as ch:
        assert status_of(lambda: spb_grpc.ExpertStoreStub(ch).GetManifest(spb.GetManifestRequest(model="huge"),
                                                                          timeout=20)) \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert healthy(store.address)


def test_store_client_refuses_to_send_oversized_messages(store):
    with StoreClient.open(store.address, deadline_s=20) as c:
        with pytest.raises(ResourceExhausted):
            c.put("up", "config", b"{}" * (9 << 20), chunk_bytes=18 << 20)  # one 18 MiB message
        assert c.put("up", "config", b"{}")[1] == 2                      # the same client goes on
    assert healthy(store.address)


def test_decoder_refuses_oversized_requests(store):
    with decoder_proc(store.address, MODEL, metrics=False) as dec:
        with grpc.insecure_channel(dec.address, options=UNLIMITED) as ch:
            stub = dpb_grpc.DecoderStub(ch)
            big = "a" * (9 << 20)  # over the 8 MiB message limit: refused by gRPC itself
            assert status_of(lambda: stub.Generate(dpb.GenerateRequest(prompt=big, max_tokens=1), timeout=30)) \
                == grpc.StatusCode.RESOURCE_EXHAUSTED
            ids = dpb.GenerateRequest(prompt_token_ids=[2 ** 31] * (2 << 20), max_tokens=1)  # ~10 MiB of varints
            assert ids.ByteSize() > decoder_wire.MAX_MESSAGE_BYTES
            assert status_of(lambda: stub.Generate(ids, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            mid = "a" * (2 << 20)  # fits a message, but no prompt is 2 MiB: refused before tokenizing
            assert status_of(lambda: stub.Generate(dpb.GenerateRequest(prompt=mid, max_tokens=1), timeout=30)) \
                == grpc.StatusCode.INVALID_ARGUMENT
            stop = dpb.GenerateRequest(prompt="hi", max_tokens=1, stop=["s" * (1 << 20)] * 9)
            assert status_of(lambda: stub.Generate(stop, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            ids, _, usage = generate(stub, prompt=PROMPTS[0], max_tokens=3)
            assert usage.completion_tokens == 3
        assert healthy(dec.address)
