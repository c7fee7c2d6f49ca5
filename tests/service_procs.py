"""Real `expert-store serve` and `moe-decoder serve` child processes on loopback for the
integration, fault and security tests (port 0 or a fixed port; addresses read from their
"listening on" / "metrics on" lines by expert_store.launch), and the real `expert-store` / `moe-decoder` CLIs run to
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
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from expert_store.launch import ServerProcess, console_command, store_command

ROOT = Path(__file__).resolve().parents[1]


def cli(name: str) -> list[str]:
    return console_command(name, {"expert-store": "expert_store.cli", "moe-decoder": "decoder.cli"}[name])


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


class ServiceProcess(ServerProcess):
    """A server child process (expert_store.launch.ServerProcess): `.address` ("host:port" it
    serves on), `.metrics` / `.http` (announced "host:port" or ""), `.stderr_text()`, `.rss()`
    (bytes), `.stop()` (SIGTERM, wait). Runs with `env` (default: `child_env()`) in the repo
    root; stderr is kept in memory, or appended to `stderr_path` when that is set."""

    def __init__(self, argv: list[str], ready_timeout: float = 120.0, env: dict[str, str] | None = None,
                 stderr_path: Path | None = None) -> None:
        super().__init__(argv, env=child_env() if env is None else env, cwd=ROOT,
                         stderr="pipe" if stderr_path is None else stderr_path, ready_timeout=ready_timeout)
        self.stderr_path = stderr_path
        self._metrics = self._http = ""

    @classmethod
    def expert_store(cls, store_dir: Path, *extra: str) -> "ServiceProcess":
        return cls(store_command(store_dir, "--ram-bytes", "0", *extra))

    @classmethod
    def decoder(cls, store_address: str, model: str, *extra: str) -> "ServiceProcess":
        return cls(cli("moe-decoder") + ["serve", "--store", store_address, "--model", model,
                                         "--listen", "127.0.0.1:0", "--metrics-port", "0", *extra])

    # announced on stdout, or set by a test that gave the server a fixed port
    @property
    def metrics(self) -> str:
        return self.endpoints.get("metrics", self._metrics)

    @metrics.setter
    def metrics(self, address: str) -> None:
        self._metrics = address

    @property
    def http(self) -> str:  # the OpenAI HTTP API (moe-decoder serve --http-listen)
        return self.endpoints.get("http", self._http)

    @http.setter
    def http(self, address: str) -> None:
        self._http = address

    def stderr_text(self) -> str:
        return self.output()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait (SIGKILL past `timeout`); `.proc` is None afterwards. Its exit status."""
        rc = super().stop(timeout)
        self.proc = None
        return rc

    def rss(self) -> int:
        import psutil

        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss


class StoreServerProcess(ServiceProcess):
    """`expert-store serve --store DIR --listen LISTEN ARGS...` with its stderr in a log file
    under `log_dir` (`.log()`); `.port`, `.pid`; `.stop()` keeps `.proc` (its exit status)."""

    def __init__(self, store_dir: str | os.PathLike, *args: str, log_dir: str | os.PathLike,
                 listen: str = "127.0.0.1:0", env: dict | None = None, start_timeout_s: float = 60.0):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(store_command(store_dir, *args, listen=listen), ready_timeout=start_timeout_s, env=env,
                         stderr_path=log_dir / f"expert-store-{id(self):x}.log")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.stderr_text()

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful) and wait; SIGKILL if it does not exit in time. Keeps `.proc`."""
        return ServerProcess.stop(self, timeout_s)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
