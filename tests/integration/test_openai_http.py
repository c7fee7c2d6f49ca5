"""The OpenAI HTTP API of `moe-decoder serve --http-listen`, with the official `openai` SDK (and
curl for the SSE framing) against real `expert-store serve` and `moe-decoder serve` processes
on loopback, over a tiny packed checkpoint with a chat template.

References are independent of the HTTP code: greedy and seeded results from an in-process
`Engine.generate` on the same store directory, and chat prompts tokenized by transformers'
own `apply_chat_template` from the checkpoint's tokenizer files.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
import torch

from checkpoints import make_mixtral_checkpoint
from decoder import Engine
from decoder._proto.adapmoe.v1 import decoder_pb2 as pb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as pb_grpc
from service_procs import ServiceProcess, pack, wait_until

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)

CTX = 512
TOKEN = "http-test-token-4f9a"
EXPERT_BYTES = 3 * 64 * 96 * 2        # one bf16 expert of the tiny model
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "Hello, world!", "Numbers: 0 1 2 3"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openai-http")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    ckpt, _ = make_mixtral_checkpoint(workdir / "ckpt", hidden=64, ffn=96, layers=2, experts=4, seed=3,
                                      max_position_embeddings=CTX, chat_template=CHAT_TEMPLATE)
    return ckpt


@pytest.fixture(scope="module")
def store_dir(workdir, checkpoint) -> Path:
    pack(checkpoint, workdir / "store", "tiny")
    return workdir / "store"


@pytest.fixture(scope="module")
def token_file(workdir) -> Path:
    path = workdir / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def store(store_dir):
    with ServiceProcess.expert_store(store_dir) as s:
        yield s


@pytest.fixture(scope="module")
def decoder(store, token_file):
    with ServiceProcess.decoder(store.address, "tiny", "--http-listen", "127.0.0.1:0", "--max-active", "4",
                                "--max-queue", "4", "--auth-token-file", str(token_file)) as d:
        assert d.http, d.stdout_lines
        yield d


@pytest.fixture(scope="module")
def client(decoder):
    with openai.OpenAI(base_url=f"http://{decoder.http}/v1", api_key=TOKEN, timeout=60, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def engine(store_dir):
    with Engine.from_store(str(store_dir), "tiny") as eng:
        yield eng


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((checkpoint / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"), bos_token="<s>",
                                   eos_token="</s>", chat_template=cfg["chat_template"])


def chat_prompt_ids(hf_tokenizer, messages) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --------------------------------------------------------------------------------------------
def test_models_and_completions_are_the_engine_greedy_results(client, engine):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    ref = engine.generate(PROMPTS[0], max_tokens=24)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, 24)
    assert r.usage.total_tokens == ref.prompt_tokens + 24
    # the prompt as token ids, and as a batch of one
    ids = engine.encode(PROMPTS[0])
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0).choices[0].text == ref.text
    assert client.completions.create(model="tiny", prompt=[PROMPTS[0]], max_tokens=24,
                                     temperature=0).choices[0].text == ref.text


def test_chat_completion_renders_the_stored_template_as_transformers_does(client, engine, hf_tokenizer):
    ids = chat_prompt_ids(hf_tokenizer, CHAT)
    ref = engine.generate(ids, max_tokens=20)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 20
    # text parts are joined; max_tokens is accepted for chat too
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "Name a fox."}]}]
    r2 = client.chat.completions.create(model="tiny", messages=parts, max_tokens=20, temperature=0)
    assert r2.choices[0].message.content == ref.text


def test_streams_match_whole_answers_and_end_with_usage(client, engine, hf_tokenizer):
    ref = engine.generate(PROMPTS[1], max_tokens=30)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3  # streamed, not one event at the end
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])

    cref = engine.generate(chat_prompt_ids(hf_tokenizer, CHAT), max_tokens=25)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=25, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cref.text
    assert chunks[-1].usage.completion_tokens == 25 and chunks[-2].choices[0].finish_reason == "length"
    # without include_usage: no usage chunk
    plain = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0, stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_stop_strings_and_seeded_sampling(client, engine):
    ref = engine.generate(PROMPTS[0], max_tokens=32)
    stop = ref.text[4:7]
    sref = engine.generate(PROMPTS[0], max_tokens=32, stop=[stop])
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=32, temperature=0, stop=stop)
    assert sref.finish_reason == "stop" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == sref.text and stop not in r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=32, temperature=0, stop=[stop, "zzz"], stream=True))
    assert streamed == sref.text
    # seeded sampling: the same seed gives the same tokens, equal to the engine's
    seeded = engine.generate(PROMPTS[2], max_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    a, b = (client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=0.9, top_p=0.95,
                                      seed=1234).choices[0].text for _ in range(2))
    assert a == b == seeded.text


def test_concurrent_streams_each_get_their_own_result(client, engine):
    refs = [engine.generate(p, max_tokens=40).text for p in PROMPTS]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS))

    def one(i: int) -> None:
        try:
            start.wait(30)
            stream = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=40, temperature=0,
                                               stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results[i] for i in range(len(PROMPTS))] == refs


def test_errors_have_openai_shape_and_status(decoder, client):
    base = f"http://{decoder.http}/v1"
    for key in ("wrong-token", TOKEN + "x"):
        with openai.OpenAI(base_url=base, api_key=key, timeout=30, max_retries=0) as bad_client:
            with pytest.raises(openai.AuthenticationError) as e:
                bad_client.completions.create(model="tiny", prompt="x", max_tokens=2)
            assert e.value.status_code == 401 and "bearer token" in e.value.message
    status, headers, _ = http("GET", base + "/models")  # no Authorization header at all
    assert status == 401 and headers.get("www-authenticate") == "Bearer"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "'other'" in e.value.message
    # unsupported fields are named, not ignored; neutral values of them are accepted
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, logprobs=True)
    assert "logprobs" in e.value.message and e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"guided_json": {}})
    assert "guided_json" in e.value.message
    ok = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, n=1, presence_penalty=0,
                                        frequency_penalty=0, logprobs=False, user="u1")
    assert ok.usage.completion_tokens == 2
    for kwargs, needle in (({"n": 2}, "n = 1"), ({"max_tokens": 0}, "max_tokens"),
                           ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
                           ({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "one prompt"),
                           ({"prompt": [1, 10 ** 6]}, "token ids"), ({"prompt": "x" * 200_000}, "cannot fit")):
        args = {"model": "tiny", "prompt": "x", "max_tokens": 2, **kwargs}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**args)
        assert needle in e.value.message, (kwargs, e.value.message)
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}], max_tokens=2)
    assert "role" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])
    assert "only text parts" in e.value.message
    # not JSON, unknown routes, wrong methods: the same error shape
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for method, path, body, code in (("POST", "/completions", b"{not json", 400),
                                     ("POST", "/completions", b"[1, 2]", 400),
                                     ("GET", "/nothing-here", None, 404), ("GET", "/completions", None, 405)):
        status, _, raw = http(method, base + path, body, auth)
        err = json.loads(raw)["error"]
        assert status == code and err["message"] and "type" in err, (path, raw)


def test_health_and_metrics_are_open_and_count_http_requests(decoder, client):
    status, _, body = http("GET", f"http://{decoder.http}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    client.completions.create(model="tiny", prompt="x", max_tokens=2)
    status, headers, body = http("GET", f"http://{decoder.http}/metrics")
    text = body.decode()
    assert status == 200 and "text/plain" in headers["content-type"]
    ok = [line for line in text.splitlines() if line.startswith('adapmoe_decoder_requests_total{status="OK"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert 'adapmoe_decoder_requests_total{status="INVALID_ARGUMENT"}' in text  # the 400s above


def test_sse_framing_with_curl(decoder):
    curl = shutil.which("curl")
    assert curl is not None, "the SSE framing test needs curl on PATH"
    body = json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    out = subprocess.run([curl, "-sS", "-N", "--max-time", "60", "-D", "-", f"http://{decoder.http}/v1/chat/completions",
                          "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, timeout=90)
    assert out.returncode == 0, out.stderr
    head, _, stream = out.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    assert stream.endswith("data: [DONE]\n\n")
    events = stream.split("\n\n")[:-1]
    assert len(events) >= 4 and all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 12


def test_decoder_client_streams_the_same_tokens_over_grpc(decoder, engine):
    from decoder.client import DecoderClient, DecoderError

    ref = engine.generate(PROMPTS[3], max_tokens=16)
    with DecoderClient(decoder.address, token=TOKEN, deadline_s=60) as c:
        assert c.ready()
        stream = c.stream(PROMPTS[3], max_tokens=16, request_id="client-test-1")
        deltas = list(stream)
        assert "".join(d.text for d in deltas) == ref.text
        assert [t for d in deltas for t in d.token_ids] == ref.token_ids
        assert stream.usage.request_id == "client-test-1" and stream.usage.finish_reason == "length"
        r = c.generate(engine.encode(PROMPTS[3]), max_tokens=16)
        assert list(r.token_ids) == ref.token_ids
        s = c.stats()
        assert s["max_active"] == 4 and s["scheduler"]["completed"] >= 2 and isinstance(s["engine"], dict)
        with pytest.raises(DecoderError) as e:
            c.generate(PROMPTS[0], max_tokens=2, temperature=-1)
        assert e.value.code == "INVALID_ARGUMENT" and "temperature" in e.value.details


# --------------------------------------------------------------------------------------------
# limits shared with gRPC, disconnects: a decoder whose every expert miss waits on a slow store
# (rows stay busy for as long as the test needs them)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_decoder(store_dir):
    with ServiceProcess.expert_store(store_dir, "--inject-latency-ms", "150") as slow_store, \
            ServiceProcess.decoder(slow_store.address, "tiny", "--http-listen", "127.0.0.1:0", "--max-active", "2",
                                   "--max-queue", "2", "--gpu-cache-bytes", str(4 * EXPERT_BYTES),
                                   "--host-cache-bytes", "0", "--no-prefetch") as d:
        yield d


def active_and_queued(stub) -> tuple[int, int]:
    s = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    return s.active, s.queued


def test_grpc_and_http_share_the_queue_and_disconnects_free_rows(slow_decoder):
    # greedy, like the gRPC calls: a sampled sequence of this random model can draw its EOS
    # token in its first steps and end before the test has seen it
    long = 400  # tokens: each with expert misses served 150 ms late, far longer than the test
    with grpc.insecure_channel(slow_decoder.address) as ch, \
            openai.OpenAI(base_url=f"http://{slow_decoder.http}/v1", api_key="none", timeout=60,
                          max_retries=0) as client:
        stub = pb_grpc.DecoderStub(ch)
        calls = [stub.Generate(pb.GenerateRequest(prompt=p, max_tokens=long), timeout=120) for p in PROMPTS[:2]]
        # a stream is submitted by the time its response headers arrive
        streams = [client.completions.create(model="tiny", prompt=p, max_tokens=long, temperature=0, stream=True)
                   for p in PROMPTS[2:4]]
        try:
            assert wait_until(lambda: sum(active_and_queued(stub)) == 4, timeout=60)
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model="tiny", prompt="x", max_tokens=2)
            assert e.value.status_code == 429 and e.value.response.headers.get("retry-after") == "1"
            assert "overloaded" in e.value.message
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, stream=True)
            with pytest.raises(grpc.RpcError) as g:
                list(stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=2), timeout=30))
            assert g.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # HTTP clients that go away: their sequences leave the scheduler
            for s in streams:
                s.close()
            assert wait_until(lambda: sum(active_and_queued(stub)) == 2, timeout=60), active_and_queued(stub)
        finally:
            for c in calls:
                c.cancel()
        assert wait_until(lambda: sum(active_and_queued(stub)) == 0, timeout=60)

        # a client waiting for a whole (non-streaming) answer that hangs up frees its row too
        body = json.dumps({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": long, "temperature": 0}).encode()
        host, port = slow_decoder.http.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert wait_until(lambda: sum(active_and_queued(stub)) == 1, timeout=60)
        assert wait_until(lambda: sum(active_and_queued(stub)) == 0, timeout=60)
        assert wait_until(lambda: '"http_status":499' in slow_decoder.stderr_text(), timeout=10)
        # and the service still answers
        r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3


# --------------------------------------------------------------------------------------------
# 503 while waiting for the model; a model without a chat template
# --------------------------------------------------------------------------------------------
def test_503_until_the_model_is_packed_then_chat_without_template_is_400(workdir, store, store_dir):
    with ServiceProcess.decoder(store.address, "plain", "--http-listen", "127.0.0.1:0", "--wait-for-model") as d, \
            openai.OpenAI(base_url=f"http://{d.http}/v1", api_key="none", timeout=30, max_retries=0) as client:
        status, _, body = http("GET", f"http://{d.http}/health")
        assert status == 503 and json.loads(body)["status"] == "loading"
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="plain", prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and "not in the store yet" in e.value.message
        ckpt, _ = make_mixtral_checkpoint(workdir / "plain-ckpt", hidden=64, ffn=96, layers=2, experts=4, seed=5,
                                          max_position_embeddings=CTX)
        pack(ckpt, store_dir, "plain")
        assert wait_until(lambda: http("GET", f"http://{d.http}/health")[0] == 200, timeout=120)
        assert client.completions.create(model="plain", prompt="x", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="plain", messages=CHAT, max_tokens=2)
        assert "no chat template" in e.value.message
