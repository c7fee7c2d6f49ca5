"""`moe-decoder serve` end to end: a real `expert-store serve` and a real decoder server as
child processes on loopback, a tiny packed checkpoint, real gRPC clients.

Reference results come from an in-process `Engine.from_store` on the same store directory
(every expert resident): the service, which runs the AdapMoE GPU/host cache with room for
fewer experts than the model has, must stream exactly its greedy tokens, alone or batched
with other requests.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from decoder import Engine
from decoder._proto.adapmoe.v1 import decoder_pb2 as pb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as pb_grpc
from service_procs import ServiceProcess, pack_tiny_model, wait_until

pytestmark = pytest.mark.timeout(240)
torch.set_num_threads(1)

CTX = 512
EXPERT_BYTES = 3 * 64 * 96 * 2        # one bf16 expert of the tiny model
GPU_CACHE, HOST_CACHE = 5 * EXPERT_BYTES, 6 * EXPERT_BYTES
PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "Hello, world!", "Numbers: 0 1 2 3",
           "def forward(x): return silu(x @ w1.T)"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return pack_tiny_model(tmp_path_factory.mktemp("decoder-service"), "tiny", max_position_embeddings=CTX)


@pytest.fixture(scope="module")
def store(store_dir):
    with ServiceProcess.expert_store(store_dir) as s:
        yield s


@pytest.fixture(scope="module")
def decoder(store):
    with ServiceProcess.decoder(store.address, "tiny", "--max-active", "4", "--max-queue", "4",
                                "--drain", "1.5", "--grace", "30",
                                # the AdapMoE cache, smaller than the model's 8 experts: evictions
                                "--gpu-cache-bytes", str(GPU_CACHE), "--host-cache-bytes", str(HOST_CACHE)) as d:
        yield d


@pytest.fixture(scope="module")
def stub(decoder):
    with grpc.insecure_channel(decoder.address) as ch:
        yield pb_grpc.DecoderStub(ch)


@pytest.fixture(scope="module")
def engine(store_dir):
    with Engine.from_store(str(store_dir), "tiny") as eng:
        yield eng


def run(stub, timeout: float = 60.0, **req):
    """Generate -> (token ids, text, usage, number of delta messages)."""
    ids, text, usage, n = [], "", None, 0
    for msg in stub.Generate(pb.GenerateRequest(**req), timeout=timeout):
        if msg.HasField("delta"):
            ids += list(msg.delta.token_ids)
            text += msg.delta.text
            n += 1
        else:
            assert usage is None
            usage = msg.usage
    assert usage is not None, "stream ended without a Usage message"
    return ids, text, usage, n


def stats(stub) -> tuple[pb.DecoderStats, dict]:
    s = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    return s, json.loads(s.scheduler_json)


def test_generate_streams_the_engine_greedy_tokens(stub, engine):
    ref = engine.generate(PROMPTS[0], max_tokens=32)
    ids, text, usage, n = run(stub, prompt=PROMPTS[0], max_tokens=32)
    assert ids == ref.token_ids and text == ref.text
    assert n >= 2  # streamed, not one message at the end
    assert usage.completion_tokens == 32 and usage.prompt_tokens == ref.prompt_tokens
    assert usage.finish_reason == "length" and usage.request_id
    assert usage.tokens_per_s > 0 and usage.experts_per_token == pytest.approx(2.0)
    # the same prompt as token ids
    ids2, _, _, _ = run(stub, prompt_token_ids=engine.encode(PROMPTS[0]), max_tokens=32)
    assert ids2 == ref.token_ids
    # seeded sampling and stop strings, as Engine.generate
    sref = engine.generate(PROMPTS[1], max_tokens=20, temperature=0.8, top_p=0.9, seed=7)
    sids, stext, _, _ = run(stub, prompt=PROMPTS[1], max_tokens=20,
                            sampling=pb.SamplingParams(temperature=0.8, top_p=0.9, seed=7))
    assert sids == sref.token_ids and stext == sref.text
    stop = ref.text[4:7]
    stop_ref = engine.generate(PROMPTS[0], max_tokens=32, stop=[stop])
    tids, ttext, tusage, _ = run(stub, prompt=PROMPTS[0], max_tokens=32, stop=[stop])
    assert tusage.finish_reason == "stop" == stop_ref.finish_reason
    assert tids == stop_ref.token_ids and ttext == stop_ref.text


def test_concurrent_requests_are_batched_and_each_matches_its_unbatched_result(stub, engine):
    refs = [engine.generate(p, max_tokens=40).token_ids for p in PROMPTS[:4]]
    before = stats(stub)[1]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def client(i: int) -> None:
        try:
            start.wait()
            results[i] = run(stub, prompt=PROMPTS[i], max_tokens=40)[0]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(4):
        assert results[i] == refs[i], f"request {i} differs from its unbatched result"
    after = stats(stub)[1]
    steps = after["steps"] - before["steps"]
    tokens = after["batched_tokens"] - before["batched_tokens"]
    assert after["max_batch"] >= 2 and tokens / steps > 1.5, "the requests were not decoded together"


def test_cancellation_frees_the_row_at_once(stub):
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPTS[2], max_tokens=CTX - 20), timeout=60)
    first = next(call)
    assert first.HasField("delta")
    assert stats(stub)[0].active == 1
    before = stats(stub)[1]["cancelled"]
    call.cancel()
    # the bound only keeps a hang from stalling the suite: a row held to the end of its
    # CTX - 20 tokens would count as completed, not cancelled
    assert wait_until(lambda: stats(stub)[0].active == 0, 60), "the cancelled sequence still holds its row"
    assert stats(stub)[1]["cancelled"] == before + 1
    # and the service goes on
    assert run(stub, prompt=PROMPTS[3], max_tokens=4)[2].completion_tokens == 4


def test_deadline_exceeded(stub):
    before = stats(stub)[1]
    with pytest.raises(grpc.RpcError) as e:
        run(stub, timeout=0.2, prompt=PROMPTS[1], max_tokens=CTX - 20)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the row is freed as an expired (or, when the cancelled RPC is seen first, cancelled)
    # sequence, not run to its CTX - 20 tokens; the bound only keeps a hang from stalling the suite
    assert wait_until(lambda: stats(stub)[0].active == 0, 60)
    after = stats(stub)[1]
    assert (after["expired"] + after["cancelled"], after["completed"]) == (
        before["expired"] + before["cancelled"] + 1, before["completed"])


def test_invalid_arguments(stub):
    cases = [
        dict(prompt="hello " * 5000, max_tokens=4),                            # over the context
        dict(prompt_token_ids=[5] * (CTX + 1), max_tokens=4),
        dict(prompt="x" * 200_000, max_tokens=4),                              # refused before tokenizing
        dict(prompt="", max_tokens=4),
        dict(prompt="hi", prompt_token_ids=[5], max_tokens=4),
        dict(prompt="hi", max_tokens=4, sampling=pb.SamplingParams(temperature=-1)),
        dict(prompt="hi", max_tokens=4, sampling=pb.SamplingParams(top_p=2)),
        dict(prompt="hi", max_tokens=4, sampling=pb.SamplingParams(temperature=float("nan"))),
        dict(prompt="hi", max_tokens=4_000_000),
        dict(prompt="hi", max_tokens=4, stop=["s"] * 100),
        dict(prompt_token_ids=[10 ** 6], max_tokens=4),                        # id outside the vocabulary
    ]
    for req in cases:
        with pytest.raises(grpc.RpcError) as e:
            run(stub, timeout=30, **req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (list(req), e.value.details())
        assert e.value.details()


def test_health_and_reflection(decoder):
    with grpc.insecure_channel(decoder.address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for service in ("", "adapmoe.v1.Decoder"):
            r = h.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=5))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"adapmoe.v1.Decoder", "grpc.health.v1.Health"} <= names
        files = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="adapmoe.v1.Decoder")]), timeout=5))
        assert files[0].file_descriptor_response.file_descriptor_proto


def test_metrics_endpoint_serves_the_counters(stub, decoder):
    run(stub, prompt=PROMPTS[4], max_tokens=5)
    with pytest.raises(grpc.RpcError):
        run(stub, prompt="", max_tokens=5)
    body = urllib.request.urlopen(f"http://{decoder.metrics}/metrics", timeout=10).read().decode()
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['adapmoe_decoder_requests_total{status="OK"}'] >= 1
    assert values['adapmoe_decoder_requests_total{status="INVALID_ARGUMENT"}'] >= 1
    assert values['adapmoe_decoder_request_seconds_count{status="OK"}'] >= 1
    assert values["adapmoe_decoder_generated_tokens_total"] >= 5
    assert values["adapmoe_decoder_queue_depth"] == 0
    assert "adapmoe_decoder_active_sequences" in values and "adapmoe_decoder_tokens_per_second" in values
    for tier in ("gpu", "host", "store"):
        assert 0 <= values[f'adapmoe_decoder_cache_hit_rate{{tier="{tier}"}}'] <= 1
        assert values[f'adapmoe_decoder_cache_tier_bytes{{tier="{tier}"}}'] > 0
    assert values['adapmoe_decoder_cache_tier_hits{tier="gpu"}'] > 0
    assert values["adapmoe_decoder_store_bytes_fetched"] > 0
    assert values["adapmoe_decoder_batch_size_count"] > 0
    # GetStats carries engine.stats()
    s, sched = stats(stub)
    eng = json.loads(s.stats_json)
    assert eng["generated_tokens"] >= 5 and eng["requests"] >= 1 and s.max_active == 4 and s.max_queue == 4
    # the host tier (6 experts) was filled from the store in the background at start
    fill = eng["provider"]["host_fill"]
    assert fill["experts"] == 6 and fill["state"] in ("running", "done") and fill["error"] is None
    assert wait_until(lambda: json.loads(stats(stub)[0].stats_json)["provider"]["host_fill"]["state"] == "done", 60)
    # one JSON log line per request, without any text
    lines = [json.loads(l) for l in decoder.stderr_text().splitlines() if l.startswith('{"ts"')]
    assert lines and all({"id", "status", "tokens", "latency_s"} <= set(l) for l in lines)
    assert any(l["status"] == "INVALID_ARGUMENT" for l in lines)
    assert "Numbers" not in decoder.stderr_text()  # prompts are never logged


def test_sigterm_flips_health_first_and_lets_in_flight_requests_finish(decoder, stub, engine):
    """Runs last: it stops the module's decoder (started with --drain 1.5 --grace 30)."""
    with grpc.insecure_channel(decoder.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        call = stub.Generate(pb.GenerateRequest(prompt=PROMPTS[0], max_tokens=120), timeout=60)
        got = list(next(call).delta.token_ids)
        decoder.signal(signal.SIGTERM)
        assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                          == health_pb2.HealthCheckResponse.NOT_SERVING, 1.0)
        usage = None
        for msg in call:
            if msg.HasField("delta"):
                got += msg.delta.token_ids
            else:
                usage = msg.usage
        assert usage is not None and usage.completion_tokens == 120
        assert got == engine.generate(PROMPTS[0], max_tokens=120).token_ids
        assert decoder.wait(30) == 0
