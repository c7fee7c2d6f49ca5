"""Shared fixtures (fixtures only; helpers live in tests/*.py modules)."""

from __future__ import annotations

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
