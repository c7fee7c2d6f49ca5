"""benchmarks/store_throughput.py's demand-under-a-fill rows at toy sizes against a real
`expert-store serve`: the demand fetches come back whole (checked against their files) in the
parts asked for while the rest of the store fills the pool. Timings are meaningless here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import store_throughput as st  # noqa: E402
from expert_store.fetch_pool import split_ranges  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("codec,raw", [("none", True), ("auto", True), ("auto", False)])
def test_demand_fetches_under_a_fill_in_parts(tmp_path, codec, raw):
    blobs = st.build_store(tmp_path / "store", total_mb=8, blob_mb=1.0, codec=codec)
    server = st.start_server(tmp_path / "store", 1, tmp_path / "server.log")
    try:
        for parts, fill_parts in ((1, 1), (3, 1), (1, 2)):
            d = st.bench_demand(server.address, blobs, receivers=2, parts=parts, demand_count=3, raw=raw,
                                min_part_bytes=256 << 10, fill_parts=fill_parts)
            assert len(d["demand_s"]) == 3 and all(s > 0 for s in d["demand_s"]) and d["fill_mb_s"] > 0
            ranges = [split_ranges(size, parts, 256 << 10) for _, _, size in blobs[:3]]
            fill_ranges = [split_ranges(size, fill_parts, 256 << 10) for _, _, size in blobs[3:]]
            assert all(len(r) >= 2 for r in (ranges if parts > 1 else fill_ranges if fill_parts > 1 else [[0, 0]]))
            assert d["parts_received"] == sum(len(r) for r in ranges + fill_ranges if len(r) > 1)
        with pytest.raises(ValueError, match="--demand-count"):
            st.bench_demand(server.address, blobs, receivers=1, parts=1, demand_count=len(blobs))
    finally:
        server.stop()


def test_demand_parts_need_pool_rows():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "store_throughput.py"), "--demand-parts", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--demand-parts needs --pool" in r.stderr


def test_cli_writes_the_demand_rows_and_their_plot(tmp_path):
    out = tmp_path / "st.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "store_throughput.py"), "--total-mb", "6",
                        "--blob-mb", "1", "--codec", "none", "--raw", "--streams", "1", "--workers", "",
                        "--pool", "1:2", "--demand-parts", "1,2", "--fill-parts", "1,3", "--demand-count", "2",
                        "--repeats", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    result = json.loads(out.read_text())
    assert [(d["fill_parts"], d["parts"]) for d in result["demand_rows"]] == [(1, 1), (1, 2), (3, 1), (3, 2)]
    assert all(len(d["demand_s"]) == 2 for d in result["demand_rows"]) and result["demand_count"] == 2
    assert (tmp_path / "st_demand.png").stat().st_size > 0 and "demand under a fill" in r.stdout
