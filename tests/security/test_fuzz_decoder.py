"""Hypothesis fuzzing of the Decoder service over real gRPC (`moe-decoder serve` over a real
`expert-store serve`): giant and empty prompts, token ids outside the vocabulary, prompts
longer than the context, absurd max_tokens, NaN/inf/negative/huge sampling parameters,
empty and oversized stop lists, garbage request ids. The service may only answer OK,
INVALID_ARGUMENT or RESOURCE_EXHAUSTED, an OK stream is well formed, and afterwards the
service is healthy and still produces the fault-free greedy tokens.
"""

from __future__ import annotations

import collections
import json
import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sec_procs import PROMPTS, decoder_proc, generate, pack_tiny_model, store_proc

from decoder._proto.adapmoe.v1 import decoder_pb2 as dpb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as dpb_grpc

pytestmark = pytest.mark.timeout(170)
MODEL, CTX, VOCAB, DEFAULT_MAX = "tiny", 256, 320, 3
PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SEEN: collections.Counter = collections.Counter()

F32 = st.one_of(st.floats(0, 2, width=32), st.floats(0, 2, width=32),
                st.floats(width=32, allow_nan=True, allow_infinity=True),
                st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-38, 3.4e38, float("inf"), float("-inf"), float("nan")]))
U64 = st.one_of(st.integers(0, 100), st.integers(0, 2 ** 64 - 1))
PROMPT_TEXT = st.one_of(st.sampled_from(PROMPTS), st.text(max_size=60), st.just(""),
                        st.sampled_from(["\x00", "\ufffd" * 10, "<s>" * 50, "</s>", "a" * (CTX * 70), "😀" * 300,
                                         "hello " * (CTX + 5)]))
TOKEN_IDS = st.one_of(st.just([]), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
                      st.lists(st.one_of(st.integers(0, VOCAB + 5), st.integers(0, 2 ** 32 - 1)), max_size=20),
                      st.just([5] * (CTX + 1)))
MAX_TOKENS = st.one_of(st.integers(0, 4), st.integers(0, 4), st.sampled_from([CTX, CTX + 1, 2 ** 31, 2 ** 32 - 1]),
                       st.integers(100_000, 2 ** 32 - 1))
STOPS = st.one_of(st.just([]), st.lists(st.text(max_size=12), max_size=4), st.lists(st.text(max_size=3), min_size=50,
                                                                                      max_size=120),
                  st.lists(st.just("x" * 5000), min_size=1, max_size=2))
REQUEST_IDS = st.one_of(st.none(), st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                                           max_size=100))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return pack_tiny_model(tmp_path_factory.mktemp("fuzz-decoder"), MODEL, max_position_embeddings=CTX)


@pytest.fixture(scope="module")
def decoder(store_dir):
    with store_proc(store_dir) as store, \
            decoder_proc(store.address, MODEL, "--default-max-tokens", str(DEFAULT_MAX), "--max-active", "2",
                         "--max-queue", "2") as dec:
        yield dec


@pytest.fixture(scope="module")
def stub(decoder):
    with grpc.insecure_channel(decoder.address, options=[("grpc.max_send_message_length", -1)]) as ch:
        yield dpb_grpc.DecoderStub(ch)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prompt=PROMPT_TEXT, ids=TOKEN_IDS, use_ids=st.booleans(), both=st.booleans(), max_tokens=MAX_TOKENS,
       temperature=F32, top_p=F32, seed=st.one_of(st.none(), U64), stop=STOPS, request_id=REQUEST_IDS)
def test_generate(stub, prompt, ids, use_ids, both, max_tokens, temperature, top_p, seed, stop, request_id):
    sampling = dpb.SamplingParams(temperature=temperature, top_p=top_p)
    if seed is not None:
        sampling.seed = seed
    req = dpb.GenerateRequest(max_tokens=max_tokens, sampling=sampling, stop=stop)
    if use_ids or both:
        req.prompt_token_ids.extend(ids)
    if not use_ids or both:
        req.prompt = prompt
    metadata = (("x-request-id", request_id),) if request_id is not None else None
    try:
        out, text, usage = _run(stub, req, metadata)
    except grpc.RpcError as e:
        assert e.code() in PROPER, (e.code(), e.details(), req)
        assert e.details()
        SEEN[e.code().name] += 1
        return
    SEEN["OK"] += 1
    limit = max_tokens or DEFAULT_MAX
    assert 1 <= usage.completion_tokens == len(out) <= limit
    assert usage.finish_reason in ("length", "stop", "eos")
    assert all(0 <= t < VOCAB for t in out)
    assert math.isfinite(usage.seconds) and usage.seconds >= 0


def _run(stub, req, metadata):
    out, text, usage = [], "", None
    for msg in stub.Generate(req, timeout=30, metadata=metadata):
        if msg.HasField("delta"):
            out += list(msg.delta.token_ids)
            text += msg.delta.text
        else:
            assert usage is None, "two Usage messages"
            usage = msg.usage
    assert usage is not None, "stream ended without Usage"
    return out, text, usage


def test_after_fuzzing_the_service_is_healthy_and_exact(decoder, stub, store_dir):
    print(sorted(SEEN.items()))
    if SEEN:  # the fuzzing reached success as well as refusals
        assert SEEN["OK"] > 5 and SEEN["INVALID_ARGUMENT"] > 5, SEEN
    with grpc.insecure_channel(decoder.address) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status \
            == health_pb2.HealthCheckResponse.SERVING
    stats = stub.GetStats(dpb.GetStatsRequest(), timeout=10)
    assert stats.active == 0 and stats.queued == 0
    json.loads(stats.stats_json)
    from decoder import Engine

    with Engine.from_store(str(store_dir), MODEL) as eng:
        want = eng.generate(PROMPTS[1], max_tokens=8).token_ids
    assert generate(stub, prompt=PROMPTS[1], max_tokens=8)[0] == want
