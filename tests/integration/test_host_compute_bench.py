"""benchmarks/decode.py's rows with misses computed on the host (lru-cpu, adapmoe-cpu) on the
CPU at toy sizes: each row runs through the real packer, calibration and cache and reports
what the GPU run reports; timings mean nothing here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import decode  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def test_cpu_miss_rows_on_a_random_mixtral(tmp_path):
    torch.set_num_threads(1)
    args = decode.parse_args(["--tiny", "--device", "cpu", "--models", "B", "--budgets", "0.5",
                              "--modes", "lru,lru-cpu,adapmoe-cpu", "--profile-rows", "", "--calib-tokens", "64",
                              "--prompts", "1", "--miss-compute", "cpu"])
    args.new_tokens = 3
    device = torch.device("cpu")
    prep = decode.prepare_model_b(tmp_path, device, args)
    rows: list[dict] = []
    decode.run_model(prep, device, args, tmp_path, pinned_gbps=5.0, rows=rows)
    decode.add_ratios(rows)
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"lru", "lru-cpu", "adapmoe-cpu"}
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["generated_tokens"] == 3
    lru, cpu = by_mode["lru"], by_mode["lru-cpu"]
    # top-k both: computing misses on the host decodes the same tokens, and moves fewer bytes
    assert cpu["outputs_head"] == lru["outputs_head"]
    assert lru["cpu_misses_per_token"] == 0 and cpu["cpu_misses_per_token"] > 0
    assert cpu["miss_compute"] == "cpu" and cpu["host_compute"]["calls"] > 0
    assert cpu["gb_per_token"]["gpu"] < lru["gb_per_token"]["gpu"]
    assert by_mode["adapmoe-cpu"]["miss_compute"] == "cpu"
    table = decode.markdown(rows, decode.check_targets(rows))
    assert "| B | 50% | lru-cpu |" in table and "CPU misses/tok" in table


def test_host_compute_benchmark_runs_at_toy_shapes(tmp_path):
    from benchmarks import host_compute

    torch.set_num_threads(1)
    out = tmp_path / "hc.json"
    host_compute.main(["--hidden", "64", "--ffn", "128", "--device", "cpu", "--iters", "1", "--tokens", "1,2",
                       "--out", str(out)])
    import json
    rows = json.loads(out.read_text())
    calls = [r for r in rows if r["what"] == "host expert"]
    assert {(r["precision"], r["tokens"]) for r in calls} == {(p, t) for p in ("int4", "int8", "bf16") for t in (1, 2)}
    assert all(r["ms"] > 0 for r in calls)
