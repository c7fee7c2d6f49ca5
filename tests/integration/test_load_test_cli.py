"""`benchmarks/load_test.py store` against a real `expert-store serve` on loopback: the CLI
runs its bounded load (two worker processes), prints the table and writes the JSON result."""

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
