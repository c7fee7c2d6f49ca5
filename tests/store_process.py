"""A real `expert-store serve` subprocess on loopback, for integration tests.

    with StoreServerProcess(store_dir, "--redis", url, log_dir=tmp_path) as server:
        server.address        # "127.0.0.1:PORT" (from its "listening on ..." line)
        server.stop()         # SIGTERM, wait; server.kill() sends SIGKILL
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path


def expert_store_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m expert_store.cli`."""
    script = Path(sys.executable).with_name("expert-store")
    if script.exists():
        return [str(script)]
    found = shutil.which("expert-store")
    return [found] if found else [sys.executable, "-m", "expert_store.cli"]


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*expert_store_command(), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


class StoreServerProcess:
    def __init__(self, store_dir: str | os.PathLike, *args: str, log_dir: str | os.PathLike,
                 listen: str = "127.0.0.1:0", env: dict | None = None, start_timeout_s: float = 60.0):
        self.store_dir = str(store_dir)
        self.args = list(args)
        self.listen = listen
        self.env = env
        self.start_timeout_s = start_timeout_s
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"expert-store-{id(self):x}.log"
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "StoreServerProcess":
        cmd = [*expert_store_command(), "serve", "--store", self.store_dir, "--listen", self.listen, *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        if not line or not line[0].startswith("listening on "):
            self.kill()
            raise RuntimeError(f"expert-store serve did not start: {line[0] if line else 'timeout'!r}\n"
                               f"{self.log_path.read_text()[-3000:]}")
        self.address = line[0].split("listening on ", 1)[1].strip()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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
        finally:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def __enter__(self) -> "StoreServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
