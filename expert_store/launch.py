"""Start a server as a child process and wait until it serves: the one way the demo, the
benchmarks and the tests start `expert-store serve` (and `moe-decoder serve`, which announces
itself the same way).

    with start_store(store_dir, "--ram-bytes", "0") as store:
        client = StoreClient.open(store.address)        # "127.0.0.1:PORT"

A server prints one line per endpoint once it listens: "listening on HOST:PORT" (gRPC), and
optionally "metrics on HOST:PORT", "http on HOST:PORT". The child's stdout is read by a thread
to its end (so the child never blocks on a full pipe); `.address` is the gRPC endpoint,
`.endpoints` every announced one by name. stderr goes to a file, to memory, or into stdout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any, Sequence

READY = "listening"  # the endpoint whose announcement means "serving" (gRPC)
_ANNOUNCEMENT = re.compile(r"^(\w+) on (\S+)$")


def console_command(script: str, module: str) -> list[str]:
    """The console script next to this interpreter, else on PATH, else `python -c` the
    module's main (a source checkout without an install)."""
    exe = Path(sys.executable).parent / script
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    found = shutil.which(script)
    if found:
        return [found]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


_LIBC = _load_libc()  # loaded in the parent: the child only calls into it (no dlopen after fork)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the process that started it dies without stopping it."""
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """One server child process. `start()` returns once it announced the endpoint `ready`
    (RuntimeError with the end of its output if it exits or stays silent past `ready_timeout`;
    ready=None: at once); `stop()` sends SIGTERM (a graceful drain), then SIGKILL if it does
    not exit in time. `start()` again after `stop()`/`kill()` starts it again.

    stderr: a path (appended to), "pipe" (kept in memory) or "stdout" (merged into stdout).
    die_with_parent: on Linux the child is sent SIGTERM when this process dies."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 stderr: str | os.PathLike = "pipe", ready: str | None = READY, ready_timeout: float = 120.0,
                 die_with_parent: bool = False) -> None:
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.stderr = stderr
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.die_with_parent = die_with_parent and _LIBC is not None
        self.proc: subprocess.Popen | None = None
        self.endpoints: dict[str, str] = {}  # "listening" / "metrics" / "http" -> "host:port"
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []

    @property
    def address(self) -> str:
        return self.endpoints.get(READY, "")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "ServerProcess":
        self.endpoints = {}
        self.stdout_lines, self.stderr_lines = [], []
        log: IO | None = None
        if self.stderr == "pipe":
            stderr: Any = subprocess.PIPE
        elif self.stderr == "stdout":
            stderr = subprocess.STDOUT
        else:
            stderr = log = open(self.stderr, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=self.env,
                                         cwd=self.cwd, preexec_fn=_die_with_parent if self.die_with_parent else None)
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor
        ready = threading.Event()
        proc = self.proc

        def read_stdout() -> None:
            for line in proc.stdout:
                self.stdout_lines.append(line)
                m = _ANNOUNCEMENT.match(line.strip())
                if m and m[1] not in self.endpoints:
                    self.endpoints[m[1]] = m[2]
                    if m[1] == self.ready:
                        ready.set()
            ready.set()  # it exited: start() stops waiting

        def read_stderr() -> None:
            for line in proc.stderr:
                self.stderr_lines.append(line)

        threading.Thread(target=read_stdout, name="server-stdout", daemon=True).start()
        if proc.stderr is not None:
            threading.Thread(target=read_stderr, name="server-stderr", daemon=True).start()
        if self.ready is None:
            return self
        ready.wait(self.ready_timeout)
        if self.ready not in self.endpoints:
            self.stop()
            tail = self.output()[-3000:].strip()
            raise RuntimeError(f"{Path(self.argv[0]).name} {' '.join(self.argv[1:2])} did not report its "
                               f"{self.ready} address"
                               + (f":\n{tail}" if tail else ""))
        return self

    def output(self) -> str:
        """What it wrote to stderr (the file when stderr is a path; with "stdout", all of it)."""
        if self.stderr == "stdout":
            return "".join(self.stdout_lines)
        if self.stderr == "pipe":
            return "".join(self.stderr_lines)
        return Path(self.stderr).read_text(errors="replace") if Path(self.stderr).exists() else ""

    def signal(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit within `timeout`. Its exit status."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def __enter__(self) -> "ServerProcess":
        # `with ServerProcess(...).start() as p:` must not start a second process
        return self if self.running() else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def store_command(store_dir: str | os.PathLike, *args: str, listen: str = "127.0.0.1:0") -> list[str]:
    """`expert-store serve --store DIR --listen LISTEN ARGS...`"""
    return console_command("expert-store", "expert_store.cli") + [
        "serve", "--store", str(store_dir), "--listen", listen, *args]


def start_store(store_dir: str | os.PathLike, *args: str, listen: str = "127.0.0.1:0", **options: Any) -> ServerProcess:
    """`expert-store serve --store DIR --listen LISTEN ARGS...` started and serving (port 0:
    a free one; `.address` says which). options go to ServerProcess."""
    return ServerProcess(store_command(store_dir, *args, listen=listen), **options).start()
