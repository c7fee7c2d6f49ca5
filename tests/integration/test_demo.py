"""`moe-decoder demo` end to end with the tiny training setup: trains, packs, serves on
loopback, generates; the output has the text and the statistics table, the store process is
gone afterwards, and a second run reuses the cached model and store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

PROMPT = "def main():\n"


def _moe_decoder() -> list[str]:
    exe = Path(sys.executable).parent / "moe-decoder"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from decoder.cli import main; sys.exit(main())"]


def _demo(cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ADAPMOE_DEMO_DIR=str(cache), ADAPMOE_DEMO_TINY="1", ADAPMOE_DEMO_STEPS="6",
               PYTHONUNBUFFERED="1")
    r = subprocess.run(_moe_decoder() + ["demo", "--prompt", PROMPT, "--max-tokens", "12", "--device", "cpu"],
                       capture_output=True, text=True, timeout=280, env=env)
    assert r.returncode == 0, f"demo failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _store_pid(stderr: str) -> int:
    m = re.search(r"store pid (\d+) listening on 127\.0\.0\.1:(\d+)", stderr)
    assert m, f"no store address line in:\n{stderr[-2000:]}"
    assert int(m.group(2)) > 0
    return int(m.group(1))


def _gone(pid: int, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _store_processes(cache: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "serve" in cmd and str(cache / "store") in cmd:
            found.append(p)
    return found


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def first_run(cache):
    return _demo(cache)


def test_demo_prints_text_and_stats_table(first_run):
    out = first_run.stdout
    assert "=== moe-decoder generate --store 127.0.0.1:" in out
    assert PROMPT in out
    # the generated continuation follows the prompt
    after = out.split(PROMPT, 1)[1]
    assert after.strip(), "no generated text"
    for row in ("decode tokens/s", "experts per token", "hit rate", "bytes fetched from store",
                "store prefetches into host tier"):
        assert row in out, f"stats table lacks {row!r}:\n{out}"
    assert re.search(r"gpu hit rate\s+\d", out) and re.search(r"host hit rate\s+\d", out)
    assert "held-out perplexity" in out


def test_demo_trains_packs_and_budgets_below_the_model(first_run, cache):
    err = first_run.stderr
    assert "training the demo model" in err
    assert (cache / "checkpoint" / "model.safetensors").is_file()
    assert (cache / "checkpoint" / "train_report.json").is_file()
    m = re.search(r"= ([\d.]+) MiB; cache budgets: GPU ([\d.]+) MiB .* host ([\d.]+) MiB", err)
    assert m, err[-2000:]
    total, gpu, host = map(float, m.groups())
    assert gpu < total and host < total
    # the gating budget is calibrated for a quality target (calibrate --max-ppl-rise 1%)
    q = re.search(r"perplexity rise <= 1\.00%: T=\S+, dropping (\d+)% .*perplexity ([\d.]+) vs top-k ([\d.]+)", err)
    assert q, err[-3000:]
    assert float(q.group(2)) <= 1.01 * float(q.group(3))
    assert "budget calibrate chose for at most a 1% perplexity rise" in err


def test_store_is_stopped_cleanly(first_run, cache):
    pid = _store_pid(first_run.stderr)
    assert _gone(pid), f"store process {pid} still running after the demo"
    assert not _store_processes(cache)
    assert "store stopped cleanly" in first_run.stderr


def test_second_run_reuses_model_and_store(first_run, cache):
    before = (cache / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    r = _demo(cache)
    assert "reusing the trained model" in r.stderr
    assert "training the demo model" not in r.stderr
    assert (cache / "checkpoint" / "model.safetensors").stat().st_mtime_ns == before
    assert re.search(r"0 blobs written", r.stdout + r.stderr)  # pack resumed: nothing to redo
    assert "decode tokens/s" in r.stdout
    assert _gone(_store_pid(r.stderr))
    assert not _store_processes(cache)


def test_sigterm_to_the_demo_stops_the_store(first_run, cache):
    """A demo killed with SIGTERM mid-generation still stops its store (no orphan)."""
    import signal

    env = dict(os.environ, ADAPMOE_DEMO_DIR=str(cache), ADAPMOE_DEMO_TINY="1", ADAPMOE_DEMO_STEPS="6",
               PYTHONUNBUFFERED="1")
    p = subprocess.Popen(_moe_decoder() + ["demo", "--prompt", PROMPT, "--max-tokens", "100000", "--device", "cpu"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    pid = None
    try:
        assert p.stderr is not None
        for line in p.stderr:
            m = re.search(r"store pid (\d+) listening", line)
            if m:
                pid = int(m.group(1))
                break
        assert pid is not None, "the demo never started its store"
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    assert _gone(pid, timeout=10), f"store process {pid} survived the demo's SIGTERM"
    assert not _store_processes(cache)
