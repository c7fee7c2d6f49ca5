"""Real `expert-store serve` and `moe-decoder serve` child processes on loopback for the
integration, fault and security tests (port 0 or a fixed port; addresses read from their
"listening on" / "metrics on" lines), and the real `expert-store` / `moe-decoder` CLIs run to
completion (`run_cli`, `pack`, `moe_decoder`).

    store_dir = pack_tiny_model(tmp / "m", "tiny")
    with ServiceProcess.expert_store(store_dir) as store, \\
         ServiceProcess.decoder(store.address, "tiny", "--max-active", "4") as dec:
        ... grpc.insecure_channel(dec.address) ...

    with StoreServerProcess(store_dir, "--redis", url, log_dir=tmp_path) as server:
        server.address        # "127.0.0.1:PORT"
        server.stop()         # SIGTERM, wait; server.kill() sends SIGKILL
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
ROOT = Path(__file__).resolve().parents[1]


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


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `expert-store` CLI, run to completion (output captured as text)."""
    return subprocess.run([*cli("expert-store"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def pack(checkpoint: Path, store: Path, model: str, precisions: str = "bf16", timeout: float = 120) -> None:
    """The real `expert-store pack` CLI; RuntimeError (with its stderr) if it fails."""
    r = run_cli("pack", str(checkpoint), "--store", str(store), "--model", model, "--precisions", precisions,
                "--no-progress", timeout=timeout, env=child_env())
    if r.returncode != 0:
        raise RuntimeError(f"expert-store pack failed ({r.returncode}): {r.stderr.strip()}")


def moe_decoder(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `moe-decoder` CLI, run to completion (output captured as text)."""
    return subprocess.run(cli("moe-decoder") + list(args), capture_output=True, text=True, timeout=timeout,
                          env=child_env())


class ServiceProcess:
    """A server child process. `.address` ("host:port" it serves on), `.metrics` (metrics
    "host:port" or ""), `.stderr_text()`, `.rss()` (bytes), `.stop()` (SIGTERM, wait).
    Runs with `env` (default: `child_env()`); stderr is kept in memory, or appended to
    `stderr_path` when that is set."""

    def __init__(self, argv: list[str], ready_timeout: float = 120.0, env: dict[str, str] | None = None,
                 stderr_path: Path | None = None) -> None:
        self.argv = argv
        self.ready_timeout = ready_timeout
        self.env = env
        self.stderr_path = stderr_path
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.metrics = ""
        self.http = ""  # "host:port" of the OpenAI HTTP API (moe-decoder serve --http-listen)
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
        env = child_env() if self.env is None else self.env
        if self.stderr_path is None:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=env, cwd=str(ROOT))
        else:
            with open(self.stderr_path, "ab") as log:
                self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                             cwd=str(ROOT))
        ready = threading.Event()

        def read_stdout() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.stdout_lines.append(line)
                if line.startswith("metrics on "):
                    self.metrics = line.split("metrics on ", 1)[1].strip()
                if line.startswith("http on "):
                    self.http = line.split("http on ", 1)[1].strip()
                if line.startswith("listening on "):
                    self.address = line.split("listening on ", 1)[1].strip()
                    ready.set()
            ready.set()

        def read_stderr() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr_lines.append(line)

        threading.Thread(target=read_stdout, daemon=True).start()
        if self.proc.stderr is not None:
            threading.Thread(target=read_stderr, daemon=True).start()
        ready.wait(self.ready_timeout)
        if not self.address:
            self.stop()
            raise RuntimeError(f"{' '.join(self.argv[:3])} did not start: {self.stderr_text()[-3000:]}")
        return self

    def stderr_text(self) -> str:
        if self.stderr_path is not None:
            return self.stderr_path.read_text(errors="replace")
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
        # `with Proc(...).start() as p:` must not start a second process (the first would leak)
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class StoreServerProcess(ServiceProcess):
    """`expert-store serve --store DIR --listen LISTEN ARGS...` with its stderr in a log file
    under `log_dir` (`.log()`); `.port`, `.pid`; `.stop()` keeps `.proc` (its exit status)."""

    def __init__(self, store_dir: str | os.PathLike, *args: str, log_dir: str | os.PathLike,
                 listen: str = "127.0.0.1:0", env: dict | None = None, start_timeout_s: float = 60.0):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(cli("expert-store") + ["serve", "--store", str(store_dir), "--listen", listen, *args],
                         ready_timeout=start_timeout_s, env=env,
                         stderr_path=log_dir / f"expert-store-{id(self):x}.log")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.stderr_text()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful) and wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        self.proc.wait(10)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
