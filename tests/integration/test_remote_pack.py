"""`expert-store pack CHECKPOINT --store grpc://A,B`: packing into running `expert-store serve`
replicas over PutBlob, on loopback, against real server processes with empty store dirs.

What must hold: every replica ends with the same files, byte for byte, as a local pack of
the checkpoint (placement "all"); a StoreClient over the replicas fetches every expert and
the dense file; each replica lists the model; a re-run uploads nothing but the manifests
(resume: the server checks the files it already holds), and re-uploads a file it finds
corrupt; adding a precision keeps the earlier ones; placement "owner" puts each blob on its
rendezvous owner only; a replica that is down (at the start or mid-pack) fails the pack with
one line naming it and leaves no manifest anywhere (GetManifest NOT_FOUND).
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import grpc
import pytest
import torch

from checkpoints import make_mixtral_checkpoint
from redis_server import free_port
from service_procs import StoreServerProcess, child_env, run_cli

from expert_store import format as blob_format
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc as pb_grpc
from expert_store.client import StoreClient, rendezvous_order
from expert_store.errors import StoreError
from expert_store.pack import pack_checkpoint, pack_remote
from expert_store.tiers import NvmeTier

MODEL = "tiny"
LAYERS, EXPERTS = 2, 4
PRECISIONS = ("bf16", "int4")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("remote-pack")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    ckpt, _ = make_mixtral_checkpoint(workdir / "ckpt", hidden=64, ffn=96, layers=LAYERS, experts=EXPERTS,
                                      dtype=torch.bfloat16, seed=11, chat_template=CHAT_TEMPLATE)
    return ckpt


@pytest.fixture(scope="module")
def local_store(workdir, checkpoint) -> Path:
    """The reference: the same checkpoint packed into a directory."""
    root = workdir / "local"
    pack_checkpoint(checkpoint, NvmeTier(root), model=MODEL, precisions=PRECISIONS, progress=False)
    return root


def _serve(workdir: Path, name: str) -> StoreServerProcess:
    store = workdir / name
    store.mkdir(exist_ok=True)
    return StoreServerProcess(store, "--ram-bytes", "0", log_dir=workdir / "logs").start()


@pytest.fixture(scope="module")
def replicas(workdir):
    a, b = _serve(workdir, "replica-a"), _serve(workdir, "replica-b")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def target(*servers: StoreServerProcess) -> str:
    return "grpc://" + ",".join(s.address for s in servers)


def store_of(server: StoreServerProcess) -> Path:
    return Path(server.argv[server.argv.index("--store") + 1])


def model_files(store: Path, model: str) -> dict[str, bytes]:
    root = store / "models" / model
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def cli_pack(*args: str) -> tuple[int, str, str]:
    r = run_cli("pack", *args, "--no-progress", env=child_env(), timeout=180)
    return r.returncode, r.stdout, r.stderr


def counts(stdout: str) -> tuple[int, int]:
    m = re.search(r"(\d+) files uploaded .*?, (\d+) already there", stdout)
    assert m, stdout
    return int(m[1]), int(m[2])


def manifest_code(server: StoreServerProcess, model: str) -> grpc.StatusCode:
    with grpc.insecure_channel(server.address) as ch:
        try:
            pb_grpc.ExpertStoreStub(ch).GetManifest(pb.GetManifestRequest(model=model), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def listed_models(server: StoreServerProcess) -> list[str]:
    with grpc.insecure_channel(server.address) as ch:
        return list(pb_grpc.ExpertStoreStub(ch).Stat(pb.StatRequest(), timeout=10).models)


def fetch_all(address_target: str, model: str, precisions=PRECISIONS) -> tuple[dict, bytes]:
    refs = [(l, e, p) for l in range(LAYERS) for e in range(EXPERTS) for p in precisions]
    with StoreClient.open(address_target, deadline_s=20) as client:
        blobs = {ref: bytes(blob) for ref, blob in client.fetch_experts(model, refs)}
        dense = bytes(client.fetch_dense(model))
    return blobs, dense


def assert_matches_local(blobs: dict, dense: bytes, local_store: Path, model: str = MODEL) -> None:
    local = model_files(local_store, model)
    assert len(blobs) == LAYERS * EXPERTS * len(PRECISIONS)
    for (layer, expert, precision), blob in blobs.items():
        assert blob == local[f"experts/L{layer:03d}/E{expert:03d}.{precision}.blob"], (layer, expert, precision)
    assert dense == local["dense.safetensors"]


# --------------------------------------------------------------------------------------------


def test_pack_into_two_replicas_equals_a_local_pack(replicas, checkpoint, local_store):
    a, b = replicas
    rc, out, err = cli_pack(str(checkpoint), "--store", target(a, b), "--model", MODEL,
                            "--precisions", ",".join(PRECISIONS))
    assert rc == 0, err
    assert f"packed {MODEL} into 2 replica(s)" in out and "placement all" in out
    # config, tokenizer, tokenizer_config, dense; blobs; manifest
    files_per_replica = 4 + LAYERS * EXPERTS * len(PRECISIONS) + 1
    assert counts(out) == (2 * files_per_replica, 0)

    # a client over both replicas fetches every expert and the dense file, equal to the local pack
    assert_matches_local(*fetch_all(target(a, b), MODEL), local_store)
    # placement "all": each replica alone serves the whole model, and holds the local pack's
    # files byte for byte (manifest included: the same JSON)
    local = model_files(local_store, MODEL)
    for server in (a, b):
        assert MODEL in listed_models(server)
        assert model_files(store_of(server), MODEL) == local
        assert_matches_local(*fetch_all(target(server), MODEL), local_store)
    # the chat template travels with the model (tokenizer_config.json, verbatim)
    assert json.loads(local["tokenizer_config.json"])["chat_template"] == CHAT_TEMPLATE
    with StoreClient.open(target(a, b)) as client:
        assert client.manifest(MODEL).tokenizer_config["chat_template"] == CHAT_TEMPLATE


def test_a_rerun_uploads_only_the_manifests_and_repairs_a_corrupt_blob(replicas, checkpoint, local_store):
    a, b = replicas
    rc, out, err = cli_pack(str(checkpoint), "--store", target(a, b), "--model", MODEL,
                            "--precisions", ",".join(PRECISIONS))
    assert rc == 0, err
    files_per_replica = 4 + LAYERS * EXPERTS * len(PRECISIONS)
    assert counts(out) == (2, 2 * files_per_replica)  # only the manifest, last, to each replica

    # a blob rotted on replica b's disk: the probe makes b check it, b answers DATA_LOSS, the
    # pack uploads that one blob again (and nothing else)
    path = store_of(b) / "models" / blob_format.expert_key(MODEL, 1, 2, "int4")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    result = pack_remote(checkpoint, target(a, b), model=MODEL, precisions=PRECISIONS, progress=False)
    assert result.uploaded == {a.address: 1, b.address: 2}
    assert result.skipped == {a.address: files_per_replica, b.address: files_per_replica - 1}
    local = model_files(local_store, MODEL)
    for server in (a, b):
        assert model_files(store_of(server), MODEL) == local
    assert_matches_local(*fetch_all(target(a, b), MODEL), local_store)


def test_adding_a_precision_keeps_the_earlier_ones(replicas, checkpoint, local_store):
    a, b = replicas
    result = pack_remote(checkpoint, target(a, b), model=MODEL, precisions=("int8",), progress=False)
    assert result.manifest.precisions == ("bf16", "int8", "int4")
    with StoreClient.open(target(a, b), deadline_s=20) as client:
        assert client.manifest(MODEL).precisions == ("bf16", "int8", "int4")
        assert sorted(ref for ref, _ in client.fetch_experts(MODEL, [(1, 3, "int8"), (1, 3, "bf16")])) == \
            [(1, 3, "bf16"), (1, 3, "int8")]
    # the earlier blobs are untouched and still served
    assert_matches_local(*fetch_all(target(a, b), MODEL), local_store)


def test_owner_placement_puts_each_blob_on_its_rendezvous_owner_only(workdir, replicas, checkpoint):
    a, b = replicas
    model = "tiny-owner"
    local_root = workdir / "local-owner"  # blob headers name their model: the reference under this name
    pack_checkpoint(checkpoint, NvmeTier(local_root), model=model, precisions=PRECISIONS, progress=False)
    local = model_files(local_root, model)
    rc, out, err = cli_pack(str(checkpoint), "--store", target(a, b), "--model", model,
                            "--precisions", ",".join(PRECISIONS), "--placement", "owner")
    assert rc == 0, err
    addresses = [a.address, b.address]
    for server in (a, b):
        files = model_files(store_of(server), model)
        assert {"manifest.json", "config.json", "tokenizer.json"} <= set(files)  # every replica needs them
        for layer in range(LAYERS):
            for expert in range(EXPERTS):
                for precision in PRECISIONS:
                    key = blob_format.expert_key(model, layer, expert, precision)
                    owner = rendezvous_order(key, addresses)[0]
                    rel = key.split("/", 1)[1]
                    assert (rel in files) == (owner == server.address), (key, server.address)
                    if rel in files:
                        assert files[rel] == local[rel]
        owns_dense = rendezvous_order(blob_format.dense_key(model), addresses)[0] == server.address
        assert ("dense.safetensors" in files) == owns_dense
        assert files["manifest.json"] == local["manifest.json"]
    blobs, dense = fetch_all(target(a, b), model)  # each blob from its owner: all there
    assert_matches_local(blobs, dense, local_root, model)


def test_a_replica_down_at_the_start_is_one_line_naming_it_and_nothing_is_visible(replicas, checkpoint):
    a, _ = replicas
    dead = f"127.0.0.1:{free_port()}"
    rc, out, err = cli_pack(str(checkpoint), "--store", f"grpc://{a.address},{dead}", "--model", "tiny-down")
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines[-1].startswith("expert-store pack: error: replica ") and dead in lines[-1], err
    assert sum(line.startswith("expert-store pack: error") for line in lines) == 1
    assert manifest_code(a, "tiny-down") == grpc.StatusCode.NOT_FOUND
    assert "tiny-down" not in listed_models(a)


def test_a_replica_killed_mid_pack_fails_the_pack_and_leaves_no_manifest(workdir, replicas, checkpoint):
    a, _ = replicas
    c = _serve(workdir, "replica-c")
    model = "tiny-killed"
    uploads_to_c: list[str] = []

    def on_upload(address: str, key: str) -> None:
        if address == c.address:
            uploads_to_c.append(key)
            if len(uploads_to_c) == 5:  # config, tokenizer, dense and two expert blobs are in
                c.signal(signal.SIGKILL)

    try:
        with pytest.raises(StoreError) as info:
            pack_remote(checkpoint, target(a, c), model=model, precisions=PRECISIONS, progress=False,
                        on_upload=on_upload)
        message = str(info.value)
        assert message.startswith(f"replica {c.address}: ") and "\n" not in message, message
        assert info.value.code == "UNAVAILABLE"
        c.wait(10)
        c.stop()
        # some files reached c's disk, but no manifest: restarted, it does not serve the model
        files = model_files(store_of(c), model)
        assert "dense.safetensors" in files and "manifest.json" not in files
        c = _serve(workdir, "replica-c")
        assert manifest_code(c, model) == grpc.StatusCode.NOT_FOUND
        assert model not in listed_models(c)
        # nor does the replica that accepted everything: manifests go last, only after all
        assert manifest_code(a, model) == grpc.StatusCode.NOT_FOUND
        # a re-run with both up completes the model on both
        pack_remote(checkpoint, target(a, c), model=model, precisions=PRECISIONS, progress=False)
        assert manifest_code(c, model) == grpc.StatusCode.OK and model in listed_models(a)
    finally:
        c.stop()


_MEMORY_PROBE = """
import json, sys
import torch
torch.set_num_threads(1)  # 2 shared cores: intra-op threads only contend
import grpc  # imported before the baseline: what is measured is the pack, not the imports
from expert_store import client
from expert_store.pack import pack_remote

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

ckpt, target = sys.argv[1:3]
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark to the current RSS
    f.write("5")
base = status("VmRSS:")
result = pack_remote(ckpt, target, model="big", precisions=("bf16", "int4"), progress=False)
print(json.dumps({"base": base, "peak": status("VmHWM:"), "uploaded": sum(result.uploaded.values())}))
"""


def test_remote_pack_memory_stays_bounded(workdir):
    import json
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak RSS")
    # ~200 MB of float32 experts (8 layers x 8 experts x 3 MiB, bf16 blobs of 1.5 MiB); the pack
    # holds one expert and a few blobs in flight, so its peak RSS may grow by < 96 MiB
    ckpt, _ = make_mixtral_checkpoint(workdir / "big", hidden=256, ffn=1024, layers=8, experts=8, vocab=320)
    size_mib = sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) / 2**20
    cap_mib = 96
    assert size_mib > 2 * cap_mib
    server = _serve(workdir, "replica-mem")
    try:
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(ckpt), target(server)],
                             capture_output=True, text=True, timeout=200, env=child_env())
        assert out.returncode == 0, out.stderr[-2000:]
        m = json.loads(out.stdout.strip().splitlines()[-1])
        assert m["uploaded"] == 3 + 8 * 8 * 2 + 1
        growth = m["peak"] - m["base"]
        print(f"remote pack of {size_mib:.0f} MiB: peak RSS +{growth:.0f} MiB")
        assert growth < cap_mib, f"packing a {size_mib:.0f} MiB checkpoint remotely grew peak RSS by {growth:.0f} MiB"
        assert "big" in listed_models(server)
    finally:
        server.stop()


def test_pack_into_a_replica_that_requires_a_token(workdir, checkpoint, local_store):
    store = workdir / "replica-auth"
    store.mkdir()
    token_file = workdir / "token"
    token_file.write_text("pack-token-123\n")
    with StoreServerProcess(store, "--ram-bytes", "0", "--token-file", str(token_file),
                            log_dir=workdir / "logs") as server:
        rc, out, err = cli_pack(str(checkpoint), "--store", target(server), "--model", MODEL,
                                "--precisions", ",".join(PRECISIONS))
        assert rc != 0
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"expert-store pack: error: replica {server.address}") and "UNAUTHENTICATED" in line
        assert "pack-token-123" not in err
        rc, out, err = cli_pack(str(checkpoint), "--store", target(server), "--model", MODEL,
                                "--precisions", ",".join(PRECISIONS), "--token-file", str(token_file))
        assert rc == 0, err
        assert model_files(store, MODEL) == model_files(local_store, MODEL)
