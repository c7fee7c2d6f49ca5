"""Real `expert-store serve` and `moe-decoder serve` child processes on loopback for the
decoder service tests (port 0; addresses read from their "listening on" / "metrics on" lines),
and the real `expert-store pack` / `moe-decoder` CLIs run to completion (`pack`, `moe_decoder`).

    store_dir = pack_tiny_model(tmp / "m", "tiny")
    with ServiceProcess.expert_store(store_dir) as store, \\
         ServiceProcess.decoder(store.address, "tiny", "--max-active", "4") as dec:
        ... grpc.insecure_channel(dec.address) ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def cli(name: str) -> list[str]:
    exe = BIN / name
    if exe.exists():
        return [str(exe)]
    module = {"expert-store": "expert_store.cli", "moe-decoder": "decoder.cli"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def child_env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("MKL_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    return e


def pack_tiny_model(root: Path, model: str = "tiny", max_position_embeddings: int = 512, seed: int = 3,
                    **kw: Any) -> Path:
    """A tiny random Mixtral checkpoint packed (bf16) into root/store; returns the store dir."""
    from checkpoints import make_mixtral_checkpoint
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    args = dict(hidden=64, ffn=96, layers=2, experts=4, seed=seed, max_position_embeddings=max_position_embeddings)
    args.update(kw)
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", **args)
    pack_checkpoint(ckpt, NvmeTier(root / "store"), model=model, precisions=("bf16",), progress=False)
    return root / "store"


def pack(checkpoint: Path, store: Path, model: str, precisions: str = "bf16", timeout: float = 120) -> None:
    """The real `expert-store pack` CLI; RuntimeError (with its stderr) if it fails."""
    r = subprocess.run(cli("expert-store") + ["pack", str(checkpoint), "--store", str(store), "--model", model,
                                              "--precisions", precisions, "--no-progress"],
                       capture_output=True, text=True, timeout=timeout, env=child_env())
    if r.returncode != 0:
        raise RuntimeError(f"expert-store pack failed ({r.returncode}): {r.stderr.strip()}")


def moe_decoder(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `moe-decoder` CLI, run to completion (output captured as text)."""
    return subprocess.run(cli("moe-decoder") + list(args), capture_output=True, text=True, timeout=timeout,
                          env=child_env())


class ServiceProcess:
    """A server child process. `.address` ("host:port" it serves on), `.metrics` (metrics
    "host:port" or ""), `.stderr_text()`, `.rss()` (bytes), `.stop()` (SIGTERM, wait)."""

    def __init__(self, argv: list[str], ready_timeout: float = 120.0) -> None:
        self.argv = argv
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.metrics = ""
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []

    @classmethod
    def expert_store(cls, store_dir: Path, *extra: str) -> "ServiceProcess":
        return cls(cli("expert-store") + ["serve", "--store", str(store_dir), "--listen", "127.0.0.1:0",
                                          "--ram-bytes", "0", *extra])

    @classmethod
    def decoder(cls, store_address: str, model: str, *extra: str) -> "ServiceProcess":
        return cls(cli("moe-decoder") + ["serve", "--store", store_address, "--model", model,
                                         "--listen", "127.0.0.1:0", "--metrics-port", "0", *extra])

    def start(self) -> "ServiceProcess":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=child_env(), cwd=str(ROOT))
        ready = threading.Event()

        def read_stdout() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.stdout_lines.append(line)
                if line.startswith("metrics on "):
                    self.metrics = line.split("metrics on ", 1)[1].strip()
                if line.startswith("listening on "):
                    self.address = line.split("listening on ", 1)[1].strip()
                    ready.set()
            ready.set()

        def read_stderr() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr_lines.append(line)

        threading.Thread(target=read_stdout, daemon=True).start()
        threading.Thread(target=read_stderr, daemon=True).start()
        ready.wait(self.ready_timeout)
        if not self.address:
            self.stop()
            raise RuntimeError(f"{' '.join(self.argv[:3])} did not start: {self.stderr_text()[-3000:]}")
        return self

    def stderr_text(self) -> str:
        return "".join(self.stderr_lines)

    def rss(self) -> int:
        import psutil

        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(timeout=10)
        self.proc = None
        return rc

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
