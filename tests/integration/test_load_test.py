"""benchmarks/load_test.py: the pure parts (percentiles, summary, bounds, loopback-only guard)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lt():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_nearest_rank_percentiles(lt):
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert lt.percentile(values, 50) == 50.0
    assert lt.percentile(values, 95) == 95.0
    assert lt.percentile(values, 99) == 99.0
    assert lt.percentile(values, 100) == 100.0
    assert lt.percentile([7.0], 99) == 7.0
    assert lt.percentile([], 50) == 0.0
    assert lt.percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input


def test_summary_counts_statuses_and_throughput(lt):
    spec = lt.LoadSpec(kind="decoder", target="127.0.0.1:1", clients=2, seconds=1.0)
    records = [("OK", 0.2, 0.05, 10, 0.0), ("OK", 0.4, 0.1, 10, 0.2), ("RESOURCE_EXHAUSTED", 0.001, None, 0, 0.3),
               ("DEADLINE_EXCEEDED", 1.0, None, 0, 0.5)]
    s = lt.summarize(spec, records, wall_s=2.0)
    assert s["requests"] == 4 and s["ok"] == 2
    assert s["errors"] == {"RESOURCE_EXHAUSTED": 1, "DEADLINE_EXCEEDED": 1}
    assert s["throughput"]["requests_per_s"] == 1.0 and s["throughput"]["tokens_per_s"] == 10.0
    assert s["latency_s"]["p50"] == 0.2 and s["latency_s"]["p99"] == 0.4 and s["latency_all_s"]["max"] == 1.0
    assert s["latency_by_status_s"]["RESOURCE_EXHAUSTED"]["p95"] == 0.001
    assert s["first_s"]["count"] == 2
    assert "token" not in s["params"]  # a bearer token never lands in results
    text = lt.format_summary(s)
    assert "p50/p95/p99" in text and "RESOURCE_EXHAUSTED: 1" in text


@pytest.mark.parametrize("target", ["8.8.8.8:50051", "10.1.2.3:50051", "[2001:db8::1]:50051", "192.168.0.1:1"])
def test_only_loopback_targets(lt, target):
    with pytest.raises(ValueError, match="loopback"):
        lt.LoadSpec(kind="store", target=target, model="m").validate()


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "[::1]:50051", "localhost:50051", "127.3.2.1:9"])
def test_loopback_targets_pass(lt, target):
    try:
        lt.check_loopback(target)
    except ValueError as e:  # a host without IPv6 loopback resolves [::1] all the same; only refuse non-loopback
        assert "loopback" not in str(e), e


@pytest.mark.parametrize("kw", [dict(clients=0), dict(clients=10_000), dict(seconds=0), dict(seconds=1e6),
                                dict(processes=5, clients=4), dict(deadline_s=0), dict(kind="other"),
                                dict(kind="store", model=""), dict(refs=0), dict(target="nohostport")])
def test_bounds(lt, kw):
    args = dict(kind="decoder", target="127.0.0.1:1")
    args.update(kw)
    with pytest.raises(ValueError):
        lt.LoadSpec(**args).validate()


def test_http_level_summary_in_the_serving_benchmark_shape(lt):
    from benchmarks.http_load import HttpLoadSpec, RequestRecord, parse_levels, summarize_level

    records = [RequestRecord("OK", 1.0, 0.1, [0.2, 0.3], prompt_tokens=5, output_tokens=4),
               RequestRecord("OK", 0.5, 0.2, [], prompt_tokens=5, output_tokens=1),
               RequestRecord("429", 0.01), RequestRecord("429", 0.01), RequestRecord("stream_error", 0.3)]
    s = summarize_level(4, records, wall_s=2.0)
    assert s["requests"] == 5 and s["completed"] == 2
    assert s["errors"] == {"429": 2, "stream_error": 1}
    assert s["total_output_tokens"] == 5 and s["output_throughput"] == 2.5
    assert s["total_token_throughput"] == 7.5 and s["request_throughput"] == 1.0
    assert s["ttft_s"] == {"count": 2, "p50": 0.1, "p99": 0.2, "mean": pytest.approx(0.15)}
    assert s["itl_s"]["count"] == 2 and s["itl_s"]["p99"] == 0.3
    # TPOT only where there is a token after the first: (1.0 - 0.1) / 3
    assert s["tpot_s"]["count"] == 1 and s["tpot_s"]["p50"] == pytest.approx(0.3)
    assert parse_levels("1, 2,64") == (1, 2, 64)
    with pytest.raises(ValueError, match="not a positive integer"):
        parse_levels("1,-2")
    with pytest.raises(ValueError, match="concurrency"):
        HttpLoadSpec(target="127.0.0.1:1", concurrency=(0,), prompt="x").validate()
    assert HttpLoadSpec(target="127.0.0.1:1", prompt="x").prompts_for(1) == 8
    assert HttpLoadSpec(target="127.0.0.1:1", prompt="x").prompts_for(64) == 256
