"""A byte flipped in one expert blob on disk: that tier answers DATA_LOSS; a good copy in
another tier (Redis) or on another replica is served instead; `expert-store verify` reports
the file; the decoder never computes with the bad bytes (identical tokens when a good copy
exists, a DATA_LOSS status when none does).
"""

from __future__ import annotations

import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fault_procs import (PROMPTS, decoder_proc, free_port, generate, my_children, pack_tiny_model, store_proc,
                         wait_until)
from service_procs import run_cli

from expert_store import format as blob_format
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as dpb_grpc
from expert_store.client import StoreClient, rendezvous_order
from expert_store.errors import DataLoss

pytestmark = pytest.mark.timeout(150)
MODEL, MAX_TOKENS = "tiny", 24
PROMPT = PROMPTS[0]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return pack_tiny_model(tmp_path_factory.mktemp("corruption"), MODEL)


@pytest.fixture(scope="module")
def used(good_dir):
    """Reference greedy tokens for PROMPT and the (layer, expert) pairs that run uses."""
    from decoder import Engine

    with Engine.from_store(str(good_dir), MODEL) as eng:
        ids = eng.generate(PROMPT, max_tokens=MAX_TOKENS).token_ids
        loads = eng.routing.loads
        pairs = [(l, e) for l in range(loads.shape[0]) for e in range(loads.shape[1]) if loads[l, e] > 0]
    return ids, pairs


def corrupt_copy(good_dir, dest, layer: int, expert: int):
    shutil.copytree(good_dir, dest)
    path = dest / "models" / blob_format.expert_key(MODEL, layer, expert, "bf16")
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10  # one bit, deep in the payload
    path.write_bytes(bytes(data))
    return dest


def test_verify_reports_the_flipped_blob(good_dir, used, tmp_path):
    layer, expert = used[1][0]
    bad = corrupt_copy(good_dir, tmp_path / "bad", layer, expert)
    ok = run_cli("verify", "--store", str(good_dir))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    r = run_cli("verify", "--store", str(bad))
    assert r.returncode == 3
    assert [l for l in r.stdout.splitlines() if l.startswith("BAD ")] == \
        [f"BAD {blob_format.expert_key(MODEL, layer, expert, 'bf16')}: xxh3 mismatch"]


def test_good_copy_in_redis_is_served_then_data_loss_once_redis_loses_it(good_dir, used, tmp_path, redis_server):
    layer, expert = used[1][0]
    want = (good_dir / "models" / blob_format.expert_key(MODEL, layer, expert, "bf16")).read_bytes()
    work = tmp_path / "store"
    shutil.copytree(good_dir, work)
    with store_proc(work, "--redis", redis_server.url) as srv, \
            StoreClient.open(srv.address, deadline_s=10, max_attempts=1) as c:
        assert bytes(c.fetch_expert(MODEL, layer, expert, "bf16")) == want   # NVMe -> promoted to Redis
        path = work / "models" / blob_format.expert_key(MODEL, layer, expert, "bf16")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))                                        # the disk copy rots
        tiers = lambda: next(iter(c.stat().values()))["tiers"]  # noqa: E731
        hits = tiers()["redis"]["hits"]
        assert bytes(c.fetch_expert(MODEL, layer, expert, "bf16")) == want   # the Redis tier has it
        assert tiers()["redis"]["hits"] == hits + 1
        redis_server.client().flushall()                                     # only the bad copy left
        with pytest.raises(DataLoss):
            c.fetch_expert(MODEL, layer, expert, "bf16")
        with pytest.raises(DataLoss):                                        # never "repaired" into Redis
            c.fetch_expert(MODEL, layer, expert, "bf16")
        assert redis_server.client().dbsize() == 0
        assert "DATA_LOSS" in srv.stderr_text() or "bad copy" in srv.stderr_text()


def test_other_replica_serves_and_decoder_never_uses_the_bad_copy(good_dir, used, tmp_path):
    ref_ids, pairs = used
    children_before = my_children()
    good = store_proc(good_dir).start()
    bad_srv = None
    try:
        # corrupt an expert the prompt needs and whose rendezvous owner is the bad replica
        # (a port is drawn again while it owns none of them: with few used experts a random one
        # can own none, which says nothing about the code under test)
        for _ in range(100):
            bad_port = free_port()
            bad_address = f"127.0.0.1:{bad_port}"
            owned = [(l, e) for l, e in pairs
                     if rendezvous_order(blob_format.expert_key(MODEL, l, e, "bf16"),
                                         [good.address, bad_address])[0] == bad_address]
            if owned:
                break
        assert owned, "no free port owns any used expert"
        layer, expert = owned[0]
        bad_dir = corrupt_copy(good_dir, tmp_path / "bad", layer, expert)
        bad_srv = store_proc(bad_dir, port=bad_port).start()
        want = (good_dir / "models" / blob_format.expert_key(MODEL, layer, expert, "bf16")).read_bytes()
        both = f"{good.address},{bad_srv.address}"

        # the client: DATA_LOSS from the owner, the good bytes from the other replica
        with StoreClient.open(both, deadline_s=10) as c:
            assert bytes(c.fetch_expert(MODEL, layer, expert, "bf16")) == want
            got = dict(c.fetch_experts(MODEL, [(l, e, "bf16") for l, e in pairs]))
            assert bytes(got[(layer, expert, "bf16")]) == want
        with StoreClient.open(bad_srv.address, deadline_s=10) as c:
            with pytest.raises(DataLoss):
                c.fetch_expert(MODEL, layer, expert, "bf16")

        # the decoder engine over both replicas: identical tokens
        from decoder import Engine

        with StoreClient.open(both, deadline_s=10) as c, Engine.from_store(c, MODEL) as eng:
            assert eng.generate(PROMPT, max_tokens=MAX_TOKENS).token_ids == ref_ids
        # the decoder over the bad replica alone: the request fails with DATA_LOSS, no token
        # computed from the bad weights reaches the client; the service stays healthy
        with decoder_proc(bad_srv.address, MODEL) as dec, grpc.insecure_channel(dec.address) as ch:
            stub = dpb_grpc.DecoderStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                generate(stub, prompt=PROMPT, max_tokens=MAX_TOKENS)
            assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            # the same request keeps failing the same way (the bad copy is never accepted later)
            with pytest.raises(grpc.RpcError) as e:
                generate(stub, prompt=PROMPT, max_tokens=MAX_TOKENS)
            assert e.value.code() == grpc.StatusCode.DATA_LOSS
    finally:
        good.stop()
        if bad_srv is not None:
            bad_srv.stop()
    assert wait_until(lambda: my_children() <= children_before, 10)
