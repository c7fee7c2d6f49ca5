"""`moe-decoder serve --wait-for-model` end to end: a real `expert-store serve` on an empty
store directory, a real decoder waiting for its model, a real `expert-store pack` into the
store's directory while both run (nothing restarted), real gRPC clients.

- waiting: the decoder serves at once; health "" and "adapmoe.v1.Decoder" NOT_SERVING,
  "liveness" SERVING; Generate and GetStats UNAVAILABLE "model X not in the store yet".
- the model appears: health SERVING within a bound, Generate streams tokens.
- the store unreachable at first is waited for the same way.
- --wait-timeout expiry: a one-line error, exit 1. SIGTERM while waiting: exit 0, quickly.
- without the flag: today's one-line NOT_FOUND error, exit 1.
"""

from __future__ import annotations

import signal
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from checkpoints import make_mixtral_checkpoint
from decoder._proto.adapmoe.v1 import decoder_pb2 as pb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as pb_grpc
from service_procs import ServiceProcess, StoreServerProcess, moe_decoder, pack, wait_until

pytestmark = pytest.mark.timeout(240)

MODEL = "tiny"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
# the decoder polls at most every 5 s (capped backoff); loading the tiny model takes ~1-3 s on
# 2 shared cores: SERVING must follow the pack within this
SERVING_BOUND_S = 30.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    ckpt, _ = make_mixtral_checkpoint(tmp_path_factory.mktemp("wait-ckpt") / "ckpt", hidden=64, ffn=96, layers=2,
                                      experts=4, seed=3, max_position_embeddings=512)
    return ckpt


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A running `expert-store serve` on an empty store directory (nothing is packed into it)."""
    store_dir = tmp_path_factory.mktemp("wait-empty") / "store"
    store_dir.mkdir()
    with ServiceProcess.expert_store(store_dir) as store:
        yield store


def health(address: str, service: str = "") -> int | str:
    with grpc.insecure_channel(address) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=5).status
        except grpc.RpcError as e:
            return e.code().name


def generate(address: str, max_tokens: int = 4, timeout: float = 60.0) -> tuple[list[int], pb.Usage | None]:
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.DecoderStub(ch)
        ids, usage = [], None
        for ev in stub.Generate(pb.GenerateRequest(prompt="Once upon a time", max_tokens=max_tokens,
                                                   sampling=pb.SamplingParams(temperature=0.0)), timeout=timeout):
            if ev.HasField("delta"):
                ids.extend(ev.delta.token_ids)
            else:
                usage = ev.usage
        return ids, usage


def assert_not_ready(address: str) -> None:
    assert health(address) == NOT_SERVING
    assert health(address, "adapmoe.v1.Decoder") == NOT_SERVING
    assert health(address, "liveness") == SERVING  # the kubelet must not restart a waiting decoder
    with pytest.raises(grpc.RpcError) as e:
        generate(address, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"model '{MODEL}' not in the store yet" in e.value.details()
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as e:
        pb_grpc.DecoderStub(ch).GetStats(pb.GetStatsRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def metric(metrics_address: str, name: str) -> float | None:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_decoder_waits_for_the_model_then_serves_it(tmp_path, checkpoint):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    with ServiceProcess.expert_store(store_dir) as store, \
            ServiceProcess.decoder(store.address, MODEL, "--wait-for-model", "--drain", "0.5") as dec:
        # serving at once, not ready: nothing is in the store
        assert_not_ready(dec.address)
        assert metric(dec.metrics, "adapmoe_decoder_model_loaded") == 0.0
        time.sleep(2)  # a few polls
        assert_not_ready(dec.address)
        assert dec.proc.poll() is None
        # pack into the directory the running store serves (no restart of either process)
        pack(checkpoint, store_dir, MODEL)
        t0 = time.monotonic()
        assert wait_until(lambda: health(dec.address) == SERVING, timeout=SERVING_BOUND_S, interval=0.2), \
            dec.stderr_text()[-3000:]
        took = time.monotonic() - t0
        assert health(dec.address, "adapmoe.v1.Decoder") == SERVING and health(dec.address, "liveness") == SERVING
        ids, usage = generate(dec.address)
        assert usage is not None and usage.completion_tokens == len(ids) > 0
        assert metric(dec.metrics, "adapmoe_decoder_model_loaded") == 1.0
        assert metric(dec.metrics, "adapmoe_decoder_generated_tokens_total") >= len(ids)
        # one log line per reason to wait, not one per attempt
        log = dec.stderr_text()
        assert log.count("not in the store yet; waiting") == 1, log
        assert "is in store" in log and "loading it" in log
        print(f"SERVING {took:.1f}s after the pack finished")
    assert dec.proc is None


def test_an_unreachable_store_is_waited_for(tmp_path, checkpoint):
    with socket.socket() as s:  # a port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    store_dir = tmp_path / "store"
    pack_checkpoint(checkpoint, NvmeTier(store_dir), model=MODEL, precisions=("bf16",), progress=False)
    with ServiceProcess.decoder(f"127.0.0.1:{port}", MODEL, "--wait-for-model") as dec:
        assert health(dec.address) == NOT_SERVING and health(dec.address, "liveness") == SERVING
        # the first attempt's verdict (the client retries a refused connection for a few seconds)
        assert wait_until(lambda: f"store 127.0.0.1:{port} is unreachable" in dec.stderr_text(), timeout=15)
        with pytest.raises(grpc.RpcError) as e:
            generate(dec.address, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not in the store yet" in e.value.details() and "unreachable" in e.value.details()
        time.sleep(1)
        with StoreServerProcess(store_dir, "--ram-bytes", "0", log_dir=tmp_path, listen=f"127.0.0.1:{port}"):
            assert wait_until(lambda: health(dec.address) == SERVING, timeout=SERVING_BOUND_S, interval=0.2), \
                dec.stderr_text()[-3000:]
            ids, usage = generate(dec.address)
            assert usage is not None and len(ids) > 0
        log = dec.stderr_text()
        assert log.count(" is unreachable (") == 1, log  # not one line per attempt
        assert "failing over" not in log  # the client's per-attempt warnings are muted while waiting


def test_wait_timeout_is_a_one_line_error(empty_store):
    store = empty_store
    t0 = time.monotonic()
    r = moe_decoder("serve", "--store", store.address, "--model", MODEL, "--listen", "127.0.0.1:0",
                    "--wait-for-model", "--wait-timeout", "2", timeout=90)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("moe-decoder: error: "), r.stderr
    assert f"model '{MODEL}' did not appear in store {store.address} within 2s" in errors[0]
    assert "Traceback" not in r.stderr
    assert took < 60


def test_sigterm_while_waiting_exits_0_quickly(empty_store):
    with ServiceProcess.decoder(empty_store.address, MODEL, "--wait-for-model") as dec:
        assert health(dec.address) == NOT_SERVING
        time.sleep(1.5)
        t0 = time.monotonic()
        dec.signal(signal.SIGTERM)
        rc = dec.wait(timeout=15)
        took = time.monotonic() - t0
        assert rc == 0, dec.stderr_text()[-3000:]
        assert took < 5, took
        assert "Traceback" not in dec.stderr_text()


def test_without_the_flag_a_missing_model_is_a_one_line_not_found(empty_store):
    r = moe_decoder("serve", "--store", empty_store.address, "--model", MODEL, "--listen", "127.0.0.1:0",
                    timeout=90)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("moe-decoder: error: ") and "not found" in lines[-1] and MODEL in lines[-1], r.stderr
    assert "Traceback" not in r.stderr and "listening on" not in r.stdout


def test_wait_flag_usage_errors(tmp_path, capsys):
    from decoder.cli import main as cli_main

    for extra, msg in ((["--wait-timeout", "5"], "--wait-timeout goes with --wait-for-model"),
                       (["--wait-for-model", "--wait-timeout", "0"], "--wait-timeout must be > 0")):
        capsys.readouterr()
        rc = cli_main(["serve", "--store", str(tmp_path), "--model", MODEL, *extra])
        assert rc == 1 and capsys.readouterr().err.strip() == f"moe-decoder: error: {msg}"
