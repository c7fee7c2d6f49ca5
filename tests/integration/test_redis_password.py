"""The Redis tier behind a password: a real redis-server with --requirepass and a real
`expert-store serve --redis URL --redis-password-file F`. With the password the store fills
and reads Redis; without it Redis refuses every command, the store still serves from NVMe
(the tier degrades to a miss) and nothing reaches Redis."""

from __future__ import annotations

import random

import pytest
import redis as redis_py

from checkpoints import make_packed_store
from redis_server import RedisServer
from service_procs import StoreServerProcess, child_env

from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(180)
MODEL, LAYERS, EXPERTS = "tiny", 2, 4


@pytest.fixture(scope="module")
def password() -> str:
    return "redis-pw-%016x" % random.Random(23).getrandbits(64)


@pytest.fixture(scope="module")
def redis(tmp_path_factory, password):
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=password).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_packed_store(tmp_path_factory.mktemp("store"), model=MODEL, layers=LAYERS, experts=EXPERTS, seed=9)


def _fetch_all(address: str) -> dict[tuple[int, int], bytes]:
    with StoreClient.open(address, deadline_s=20.0) as c:
        return {(l, e): bytes(c.fetch_expert(MODEL, l, e, "bf16")) for l in range(LAYERS) for e in range(EXPERTS)}


def test_the_store_authenticates_to_redis_with_the_password_file(redis, store_dir, tmp_path, password):
    with pytest.raises(redis_py.AuthenticationError):
        redis.client(password=None).ping()  # the server really asks for it
    redis.client().flushall()
    pw_file = tmp_path / "redis-password"
    pw_file.write_text(password + "\n")
    env = child_env()
    env.pop("REDIS_PASSWORD", None)
    with StoreServerProcess(store_dir, "--redis", redis.url + "/0", "--redis-password-file", str(pw_file),
                            "--ram-bytes", "0", log_dir=tmp_path, env=env) as srv:
        first = _fetch_all(srv.address)
        assert redis.client().dbsize() > 0, "nothing was written to Redis"
        assert _fetch_all(srv.address) == first
    assert "NOAUTH" not in srv.log() and "Authentication" not in srv.log()


def test_without_the_password_redis_refuses_and_the_store_serves_from_nvme(redis, store_dir, tmp_path):
    redis.client().flushall()
    env = child_env()
    env.pop("REDIS_PASSWORD", None)
    with StoreServerProcess(store_dir, "--redis", redis.url + "/0", "--ram-bytes", "0", log_dir=tmp_path,
                            env=env) as srv:
        blobs = _fetch_all(srv.address)
    assert len(blobs) == LAYERS * EXPERTS and all(blobs.values())
    assert redis.client().dbsize() == 0


def test_password_file_needs_redis(store_dir, tmp_path):
    from service_procs import run_cli

    (tmp_path / "pw").write_text("x")
    r = run_cli("serve", "--store", str(store_dir), "--redis-password-file", str(tmp_path / "pw"), env=child_env())
    assert r.returncode == 1 and "--redis-password-file goes with --redis" in r.stderr
