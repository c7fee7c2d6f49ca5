"""Hypothesis fuzzing of every ExpertStore RPC over real gRPC (a real `expert-store serve`):
huge and negative-looking indices (uint32/uint64 extremes), empty and oversized ref lists,
invalid model names, path traversal, unknown precisions, offsets past the end, malformed
PutBlob uploads, Verify of every kind of ref (it must keep every good blob). The server may only answer with a proper status (OK, INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED, DATA_LOSS for a checksum that does not match), whatever OK
returns is exactly the stored bytes, nothing lands outside its store directory, its memory
stays small, and it is healthy afterwards.
"""

from __future__ import annotations

import collections
import json
import os
import shutil

import grpc
import psutil
import pytest
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sec_procs import pack_tiny_model, store_proc

from expert_store import format as blob_format
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as spb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as spb_grpc

pytestmark = pytest.mark.timeout(170)
MODEL, MAX_REFS = "tiny", 16
PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# the plausible branch is repeated so that examples reach the success paths too
U32 = st.one_of(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.sampled_from([2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 999, 1000]),
                st.integers(0, 2 ** 32 - 1))
U64 = st.one_of(st.integers(0, 4096), st.integers(0, 4096), st.sampled_from([2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 36_000, 40_000]),
                st.integers(0, 2 ** 64 - 1))
HOSTILE_NAMES = ["", ".", "..", "../tiny", "tiny/../tiny", "/etc/passwd", "..\\..\\x", "tiny\x00", "TINY", " tiny",
                 "a" * 129, "a" * 128, "%2e%2e", "models", "tiny/experts", "{tiny}", "tiny:meta", "ｔｉｎｙ"]
NAMES = st.one_of(st.just(MODEL), st.just(MODEL), st.just(MODEL), st.sampled_from(HOSTILE_NAMES), st.text(max_size=30))
PRECISIONS = st.one_of(st.sampled_from(blob_format.PRECISIONS), st.sampled_from(blob_format.PRECISIONS),
                       st.sampled_from(["", "fp8", "BF16", "bf16 ", "bf16/../x", "int4\x00", "int2"]),
                       st.text(max_size=8))
REF = st.builds(spb.ExpertRef, layer=U32, expert=U32, precision=PRECISIONS, offset=U64)
PLAUSIBLE_REF = st.builds(spb.ExpertRef, layer=st.integers(0, 1), expert=st.integers(0, 3), precision=st.just("bf16"),
                          offset=st.one_of(st.just(0), st.integers(0, 40_000)))  # a blob is ~37 kB


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-store")
    d = pack_tiny_model(root, MODEL)
    shutil.rmtree(root / "ckpt")
    return d


@pytest.fixture(scope="module")
def server(store_dir):
    with store_proc(store_dir, "--max-refs", str(MAX_REFS)) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as ch:
        yield spb_grpc.ExpertStoreStub(ch)


SEEN: collections.Counter = collections.Counter()  # (rpc, status) over all examples


def code_and_result(fn, rpc: str):
    try:
        result = fn()
        if not hasattr(result, "ListFields"):
            result = list(result)
        SEEN[rpc, "OK"] += 1
        return grpc.StatusCode.OK, result
    except grpc.RpcError as e:
        assert e.code() in PROPER | {grpc.StatusCode.DATA_LOSS}, (e.code(), e.details())
        assert e.details(), "an error status without details"
        SEEN[rpc, e.code().name] += 1
        return e.code(), None


@FUZZ
@given(model=NAMES)
def test_get_manifest(stub, model):
    code, reply = code_and_result(lambda: stub.GetManifest(spb.GetManifestRequest(model=model), timeout=10), "GetManifest")
    assert code in PROPER
    if code == grpc.StatusCode.OK:
        assert reply.model == model == MODEL


@FUZZ
@given(model=NAMES, refs=st.one_of(st.lists(PLAUSIBLE_REF, min_size=1, max_size=3), st.lists(REF, max_size=4), st.lists(REF, min_size=MAX_REFS, max_size=200)),
       priority=st.integers(-5, 10))
def test_fetch_experts(stub, store_dir, model, refs, priority):
    request = spb.FetchExpertsRequest(model=model, refs=refs, priority=priority)
    code, chunks = code_and_result(lambda: stub.FetchExperts(request, timeout=20), "FetchExperts")
    assert code in PROPER
    if code == grpc.StatusCode.OK:  # every byte sent is the stored blob's, from the ref's offset
        got: dict[int, bytearray] = {}
        for c in chunks:
            got.setdefault(c.index, bytearray()).extend(c.data)
        assert sorted(got) == list(range(len(refs)))
        for i, ref in enumerate(refs):
            blob = (store_dir / "models" / blob_format.expert_key(model, ref.layer, ref.expert, ref.precision)
                    ).read_bytes()
            assert bytes(got[i]) == blob[ref.offset:]


@FUZZ
@given(model=NAMES, offset=U64)
def test_fetch_dense(stub, store_dir, model, offset):
    code, chunks = code_and_result(lambda: stub.FetchDense(spb.FetchDenseRequest(model=model, offset=offset),
                                                           timeout=20), "FetchDense")
    assert code in PROPER
    if code == grpc.StatusCode.OK:
        assert b"".join(c.data for c in chunks) == (store_dir / "models" / MODEL / "dense.safetensors"
                                                     ).read_bytes()[offset:]


@FUZZ
@given(model=NAMES, ref=st.one_of(PLAUSIBLE_REF, PLAUSIBLE_REF, REF, st.none()), dense=st.booleans())
def test_verify(stub, store_dir, model, ref, dense):
    # every blob of this store is good (this runs before the PutBlob fuzzing, which may replace
    # files): Verify may refuse a request properly, but whatever it checks it must find good and
    # keep (it removes only copies that fail their checks)
    request = spb.VerifyRequest(model=model, dense=dense)
    if ref is not None:
        request.ref.CopyFrom(ref)
    code, reply = code_and_result(lambda: stub.Verify(request, timeout=20), "Verify")
    assert code in PROPER
    if code == grpc.StatusCode.OK:
        assert reply.key and reply.good and not reply.dropped, reply
        assert (store_dir / "models" / reply.key).is_file()


KINDS = st.one_of(st.sampled_from(["expert", "dense", "config", "tokenizer", "profile", "manifest"]),
                  st.sampled_from(["config", "tokenizer", "profile"]),
                  st.sampled_from(["", "weights", "../config", "config.json", "EXPERT"]), st.text(max_size=10))


@FUZZ
@given(data=st.data(), model=st.one_of(st.just("fuzzed"), st.just("fuzzed"), NAMES), kind=KINDS, layer=U32, expert=U32,
       precision=PRECISIONS, parts=st.lists(st.binary(max_size=3000), max_size=4),
       size_mode=st.sampled_from(["exact", "exact", "short", "long", "any"]),
       digest_mode=st.sampled_from(["right", "right", "wrong"]), json_payload=st.booleans(),
       layout=st.sampled_from(["header-first", "header-first", "no-header", "two-headers", "header-only"]))
def test_put_blob(stub, store_dir, data, model, kind, layer, expert, precision, parts, size_mode, digest_mode,
                  json_payload, layout):
    if json_payload:  # a JSON object, what config/tokenizer/profile uploads must be
        parts = [json.dumps({"fuzz": data.draw(st.text(max_size=40))}).encode()]
    payload = b"".join(parts)
    size = {"exact": len(payload), "short": max(0, len(payload) - 1), "long": len(payload) + 1,
            "any": data.draw(U64)}[size_mode]
    digest = xxhash.xxh3_128_hexdigest(payload) if digest_mode == "right" else data.draw(st.text(max_size=40))
    header = spb.PutBlobHeader(model=model, kind=kind, layer=layer, expert=expert, precision=precision,
                               total_size=size, xxh3=digest)
    msgs = [spb.PutBlobChunk(data=p) for p in parts]
    if layout != "no-header":
        msgs.insert(0, spb.PutBlobChunk(header=header))
    if layout == "two-headers":
        msgs.insert(1, spb.PutBlobChunk(header=header))
    if layout == "header-only":
        msgs = msgs[:1]
    code, reply = code_and_result(lambda: stub.PutBlob(iter(msgs), timeout=20), "PutBlob")
    if code == grpc.StatusCode.OK:
        # accepted only whole and matching: the stored file is exactly the payload
        assert layout in ("header-first", "header-only") and size == len(payload)
        assert digest == xxhash.xxh3_128_hexdigest(payload)
        assert (store_dir / "models" / reply.key).read_bytes() == payload


def test_after_fuzzing_the_server_is_healthy_small_and_confined(server, stub, store_dir):
    # the fuzzing reached the success paths as well as every kind of refusal
    print(sorted(SEEN.items()))
    for rpc, code in (("GetManifest", "OK"), ("GetManifest", "INVALID_ARGUMENT"), ("GetManifest", "NOT_FOUND"),
                      ("FetchExperts", "OK"), ("FetchExperts", "INVALID_ARGUMENT"),
                      ("FetchExperts", "RESOURCE_EXHAUSTED"), ("FetchDense", "OK"), ("PutBlob", "OK"),
                      ("PutBlob", "INVALID_ARGUMENT"), ("PutBlob", "DATA_LOSS"), ("Verify", "OK"),
                      ("Verify", "INVALID_ARGUMENT"), ("Verify", "NOT_FOUND")):
        assert SEEN[rpc, code] > 0 or not SEEN, (rpc, code, sorted(SEEN.items()))
    with grpc.insecure_channel(server.address) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status \
            == health_pb2.HealthCheckResponse.SERVING
    blob = b"".join(c.data for c in stub.FetchExperts(spb.FetchExpertsRequest(
        model=MODEL, refs=[spb.ExpertRef(layer=1, expert=3, precision="bf16")]), timeout=10))
    assert blob == (store_dir / "models" / blob_format.expert_key(MODEL, 1, 3, "bf16")).read_bytes()
    # a header announcing gigabytes cost nothing: memory stays small
    assert psutil.Process(server.proc.pid).memory_info().rss < 1 << 30
    # nothing was written outside <store>/models, and no temp file was left behind
    for dirpath, _dirs, files in os.walk(store_dir.parent):
        for f in files:
            path = os.path.join(dirpath, f)
            assert path.startswith(str(store_dir / "models") + os.sep), f"unexpected file {path}"
            assert ".tmp-" not in f, f"temp file left behind: {path}"
