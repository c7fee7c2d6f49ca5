"""Helpers for decoder integration tests: pack checkpoints with the real `expert-store pack`
CLI and run a real `expert-store serve` on loopback (port 0, address read from its stdout)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _cli(name: str) -> list[str]:
    exe = BIN / name
    if exe.exists():
        return [str(exe)]
    module = {"expert-store": "expert_store.cli", "moe-decoder": "decoder.cli"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("MKL_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def pack(checkpoint: Path, store: Path, model: str, precisions: str = "bf16", timeout: float = 120) -> None:
    r = subprocess.run(_cli("expert-store") + ["pack", str(checkpoint), "--store", str(store), "--model", model,
                                               "--precisions", precisions, "--no-progress"],
                       capture_output=True, text=True, timeout=timeout, env=env())
    if r.returncode != 0:
        raise RuntimeError(f"expert-store pack failed ({r.returncode}): {r.stderr.strip()}")


def moe_decoder(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(_cli("moe-decoder") + list(args), capture_output=True, text=True, timeout=timeout,
                          env=env())


class StoreServer:
    """`expert-store serve --store DIR --listen 127.0.0.1:0` as a child process."""

    def __init__(self, store: Path, ready_timeout: float = 60.0) -> None:
        self.store = store
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self._stderr: list[str] = []

    def start(self) -> "StoreServer":
        self.proc = subprocess.Popen(_cli("expert-store") + ["serve", "--store", str(self.store),
                                                             "--listen", "127.0.0.1:0", "--ram-bytes", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        found: list[str] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("listening on "):
                    found.append(line.split("listening on ", 1)[1].strip())
                    break
        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(self.ready_timeout)
        if not found:
            self.stop()
            raise RuntimeError(f"expert-store serve did not start: {''.join(self._stderr)[-2000:]}")
        self.address = found[0]
        return self

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> "StoreServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
