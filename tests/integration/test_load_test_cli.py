"""`benchmarks/load_test.py store` against a real `expert-store serve` on loopback: the CLI
runs its bounded load (two worker processes), prints the table and writes the JSON result.
`load_test.py --http` against a real `moe-decoder serve --http-listen`: the serving benchmark's
levels, percentiles and errors by HTTP status; bad targets are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service_procs import ROOT, ServiceProcess, child_env, pack_tiny_model

pytestmark = pytest.mark.timeout(180)


def test_store_load_cli_writes_results(tmp_path):
    store_dir = pack_tiny_model(tmp_path / "m", "tiny")
    out = tmp_path / "results"
    with ServiceProcess.expert_store(store_dir) as store:
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "store", "--target",
                            store.address, "--model", "tiny", "--clients", "2", "--processes", "2",
                            "--seconds", "1.5", "--refs", "3", "--out", str(out)],
                           capture_output=True, text=True, timeout=120, env=child_env())
    assert r.returncode == 0, r.stderr
    assert "p50/p95/p99" in r.stdout and "errors     none" in r.stdout
    (path,) = out.glob("load_store_*.json")
    result = json.loads(path.read_text())
    assert result["ok"] > 0 and result["errors"] == {}
    assert result["throughput"]["bytes_per_s"] > 0
    assert 0 < result["latency_s"]["p50"] <= result["latency_s"]["p95"] <= result["latency_s"]["p99"]


def test_refuses_a_non_loopback_target(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "decoder", "--target",
                        "192.0.2.1:50052", "--seconds", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == 2 and "loopback" in r.stderr
    assert not list(tmp_path.glob("*.json"))


def run_http_load(target: str, out, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--http", "--target", target,
                           "--max-tokens", "4", "--deadline", "60", "--seed", "7", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=240, env=child_env())


def test_http_serving_benchmark_against_a_real_decoder(tmp_path):
    """load_test.py --http against `moe-decoder serve --http-listen` over a real store: one row per
    concurrency level with TTFT / ITL / TPOT / E2E percentiles and tokens/s; a scheduler with 2
    rows and 1 queue place may answer 429 at concurrency 4 (counted by status, never a crash);
    chat requests to a model without a chat template are all counted as 400."""
    store_dir = pack_tiny_model(tmp_path / "m", "tiny")
    out = tmp_path / "results"
    with ServiceProcess.expert_store(store_dir) as store, \
            ServiceProcess.decoder(store.address, "tiny", "--http-listen", "127.0.0.1:0", "--max-active", "2",
                                   "--max-queue", "1") as dec:
        r = run_http_load(dec.http, out, "--concurrency", "1,4", "--num-prompts", "6")
        assert r.returncode == 0, r.stderr
        assert "TTFT p50/p99 ms" in r.stdout and "ITL p50/p99 ms" in r.stdout
        (path,) = out.glob("load_http_*.json")
        result = json.loads(path.read_text())
        assert result["model"] == "tiny" and [lv["concurrency"] for lv in result["levels"]] == [1, 4]
        one, four = result["levels"]
        assert one["requests"] == one["completed"] == 6 and one["errors"] == {}
        assert one["total_output_tokens"] > 0 and one["output_throughput"] > 0 and one["request_throughput"] > 0
        for key in ("ttft_s", "e2e_latency_s"):
            assert one[key]["count"] == 6 and 0 < one[key]["p50"] <= one[key]["p99"]
        assert one["itl_s"]["p50"] <= one["itl_s"]["p99"] and one["tpot_s"]["p50"] <= one["tpot_s"]["p99"]
        assert four["requests"] == 6 and set(four["errors"]) <= {"429"}
        assert four["completed"] + sum(four["errors"].values()) == 6

        chat_out = tmp_path / "chat"
        r = run_http_load(dec.http, chat_out, "--concurrency", "2", "--num-prompts", "3", "--endpoint", "chat")
        assert r.returncode == 0, r.stderr
        (level,) = json.loads(next(chat_out.glob("load_http_*.json")).read_text())["levels"]
        assert level["completed"] == 0 and level["errors"] == {"400": 3}
        assert "400: 3" in r.stdout


def test_http_benchmark_with_nothing_listening_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_http_load(f"127.0.0.1:{port}", tmp_path, "--concurrency", "1", "--num-prompts", "1")
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.json"))
    r = run_http_load("192.0.2.1:8000", tmp_path, "--concurrency", "1")
    assert r.returncode == 2 and "loopback" in r.stderr
    r = run_http_load("127.0.0.1:8000", tmp_path, "--concurrency", "1,x")
    assert r.returncode == 2 and "'x' is not a positive integer" in r.stderr
