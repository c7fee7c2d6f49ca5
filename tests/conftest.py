"""Shared fixtures (fixtures only; helpers live in tests/*.py modules)."""

from __future__ import annotations

import time

import psutil
import pytest

from redis_server import RedisClusterProcess, RedisServer


@pytest.fixture
def redis_server(tmp_path_factory):
    """A fresh, empty redis-server on 127.0.0.1 (``.url``, ``.port``, ``.stop()``,
    ``.start()``, ``.kill()``, ``.restart()``, ``.client()``); stopped after the test."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A 3-master Redis Cluster on loopback (``.url`` is ``redis+cluster://...``), shared
    by the tests of one module."""
    cluster = RedisClusterProcess(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module", autouse=True)
def no_leaked_processes():
    """Every server a test module starts must be gone when the module ends: leftovers are
    killed and reported as an error of that module. (multiprocessing's resource tracker
    lives as long as pytest itself and is not a leak.)"""
    yield
    me = psutil.Process()

    def leftovers() -> list[psutil.Process]:
        out = []
        for p in me.children(recursive=True):
            try:
                if "resource_tracker" not in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    leaked = leftovers()
    names = []
    for p in leaked:
        try:
            names.append(" ".join(p.cmdline()[:4]))
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not names, f"processes left running by this module: {names}"
