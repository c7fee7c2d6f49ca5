"""StoreClient.fetch_expert_range: bytes [start, end) of an expert blob, the part one receiver
takes when several fetch a blob side by side. Against a real `expert-store serve` on loopback
(ranges that start and end inside the server's 1 MiB chunks, parts joined into one buffer from
threads, a replica that is down ahead of a live one) and the in-process store directory."""

from __future__ import annotations

import threading

import pytest

from checkpoints import make_packed_store
from expert_store import format as blob_format
from expert_store.client import StoreClient
from expert_store.errors import InvalidArgument, NotFound
from redis_server import free_port
from service_procs import StoreServerProcess

pytestmark = pytest.mark.timeout(120)
MODEL = "tiny"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    # bf16 experts of 3 x 256 x 1024 x 2 bytes: ~1.5 MB each, streamed in several chunks
    return make_packed_store(tmp_path_factory.mktemp("fetch-range"), precisions=("bf16", "int4"), hidden=256,
                             ffn=1024, layers=2, experts=2, seed=4)


@pytest.fixture(scope="module")
def server(store_dir, tmp_path_factory):
    proc = StoreServerProcess(store_dir, "--ram-bytes", "0", log_dir=tmp_path_factory.mktemp("logs")).start()
    yield proc
    proc.stop()


def cuts(n: int) -> list[tuple[int, int]]:
    """Ranges that cover [0, n): uneven, crossing 1 MiB chunk boundaries, one of a single byte."""
    marks = sorted({0, 1, 777, (1 << 20) - 5, (1 << 20) + 3, n // 2 + 11, n - 1, n} & set(range(n + 1)))
    return list(zip(marks, marks[1:]))


@pytest.mark.parametrize("remote", [True, False])
def test_ranges_join_into_the_whole_blob(store_dir, server, remote):
    with StoreClient.open(server.address if remote else str(store_dir)) as client:
        for ref in [(0, 0, "bf16"), (1, 1, "bf16"), (1, 0, "int4")]:
            whole = bytes(client.fetch_expert(MODEL, *ref))
            assert len(whole) > 1 << 20 or ref[2] == "int4"
            joined = bytearray(len(whole))
            for start, end in cuts(len(whole)):
                got = client.fetch_expert_range(MODEL, *ref, start, end)
                assert bytes(got) == whole[start:end], (ref, start, end)
                client.fetch_expert_range(MODEL, *ref, start, end, out=memoryview(joined)[start:end])
            assert joined == whole
            blob_format.check_blob(joined)


def test_parts_fetched_side_by_side_into_one_buffer(server):
    """Four threads, one part each, into one buffer (as a striped fetch does); the joined bytes
    pass the blob's own check."""
    with StoreClient.open(server.address, max_streams=4) as client:
        whole = bytes(client.fetch_expert(MODEL, 0, 1, "bf16"))
        n = len(whole)
        buf = bytearray(n)
        bounds = [0, n // 4, n // 2, 3 * n // 4, n]
        errors: list[BaseException] = []

        def part(i: int) -> None:
            try:
                a, b = bounds[i], bounds[i + 1]
                client.fetch_expert_range(MODEL, 0, 1, "bf16", a, b, out=memoryview(buf)[a:b], priority="prefetch")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=part, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and bytes(buf) == whole
        header, _ = blob_format.decode_raw(bytes(buf)) if blob_format.read_header(buf)[0].codec == "none" \
            else (blob_format.check_blob(buf), None)
        assert header.layer == 0 and header.expert == 1


def test_a_down_replica_ahead_of_a_live_one(server):
    dead = f"127.0.0.1:{free_port()}"
    with StoreClient.open(f"{dead},{server.address}", deadline_s=10) as client:
        whole = bytes(client.fetch_expert(MODEL, 1, 0, "bf16"))
        assert bytes(client.fetch_expert_range(MODEL, 1, 0, "bf16", 100, 5000)) == whole[100:5000]


@pytest.mark.parametrize("remote", [True, False])
def test_bad_ranges_are_invalid_arguments(store_dir, server, remote):
    with StoreClient.open(server.address if remote else str(store_dir)) as client:
        n = len(client.fetch_expert(MODEL, 0, 0, "bf16"))
        for start, end in [(10, 10), (20, 10), (-1, 5), (0, n + 1), (n, n + 5)]:
            with pytest.raises(InvalidArgument, match="range"):
                client.fetch_expert_range(MODEL, 0, 0, "bf16", start, end)
        with pytest.raises(InvalidArgument, match="out holds"):
            client.fetch_expert_range(MODEL, 0, 0, "bf16", 0, 100, out=bytearray(99))
        with pytest.raises(InvalidArgument, match="out of range"):
            client.fetch_expert_range(MODEL, 0, 7, "bf16", 0, 10)
        with pytest.raises(NotFound):
            client.fetch_expert_range("no-such-model", 0, 0, "bf16", 0, 10)
