"""Disk full while writing the store: `expert-store pack` and PutBlob run in processes whose
file size limit (RLIMIT_FSIZE) is below the size of some blobs, so writing them fails with
EFBIG exactly as a full disk fails with ENOSPC (NvmeTier treats both as ResourceExhausted).

Each must end with a clean error (one line, RESOURCE_EXHAUSTED over gRPC), leave no partial
blob and no temp file visible, keep the server healthy, and complete when re-run with room.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash

from checkpoints import make_mixtral_checkpoint
from fault_procs import ServiceProcess, child_env_with, cli, free_port, my_children, wait_until
from service_procs import run_cli

from expert_store import format as blob_format
from expert_store.client import StoreClient
from expert_store.errors import ResourceExhausted
from expert_store.quant import expert_to_blob
from expert_store.store import ModelStore

pytestmark = pytest.mark.timeout(150)
LIMIT = 256 * 1024  # bytes per file: the dense part and int8 experts fit, bf16 experts do not
MODEL = "wide"


def limited(argv: list[str], fsize: int) -> list[str]:
    """argv run under RLIMIT_FSIZE = fsize (Python ignores SIGXFSZ: writes fail with EFBIG)."""
    shim = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
            "os.execv(sys.argv[2], sys.argv[2:])")
    exe = argv[0] if os.path.isabs(argv[0]) else sys.executable
    return [sys.executable, "-c", shim, str(fsize), exe, *argv[1:]]


def leftovers(store: Path) -> list[str]:
    """Temp files (a write that did not finish) anywhere under the store."""
    return [str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and ".tmp-" in p.name]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # experts large (bf16 ~393 KB, int8 ~200 KB), the dense part small (bf16, ~150 KB)
    ckpt, _ = make_mixtral_checkpoint(tmp_path_factory.mktemp("diskfull") / "ckpt", hidden=64, ffn=1024, layers=2,
                                      experts=2, dtype=torch.bfloat16, seed=5)
    return ckpt


def test_pack_with_a_full_disk_fails_cleanly_and_a_rerun_completes(checkpoint, tmp_path):
    store = tmp_path / "store"
    argv = cli("expert-store") + ["pack", str(checkpoint), "--store", str(store), "--model", MODEL,
                                  "--precisions", "int8,bf16", "--no-progress"]
    r = subprocess.run(limited(argv, LIMIT), capture_output=True, text=True, timeout=120, env=child_env_with())
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("expert-store pack: error:") and "no space" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert leftovers(store) == []
    # what was written is whole (int8 blobs, the dense part); no bf16 blob and no manifest:
    # the model is not visible to any reader
    written = sorted(str(p.relative_to(store / "models")) for p in (store / "models").rglob("*.blob"))
    assert written and all(".int8." in k for k in written)
    for k in written:
        blob_format.check_blob((store / "models" / k).read_bytes())
    with ModelStore.open(store, ram_bytes=0) as s:
        assert s.models() == []
    # with room: the re-run completes, keeping what was already there
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=child_env_with())
    assert r.returncode == 0, r.stderr
    assert f"{len(written)} already present" in r.stdout
    v = run_cli("verify", "--store", str(store))
    assert v.returncode == 0, v.stdout
    with ModelStore.open(store, ram_bytes=0) as s:
        assert s.models() == [MODEL] and len(s.manifest(MODEL).blobs) == 2 * 2 * 2


def test_put_blob_with_a_full_disk_is_resource_exhausted_and_nothing_is_visible(tmp_path):
    children_before = my_children()
    store = tmp_path / "store"
    store.mkdir()
    g = torch.Generator().manual_seed(1)
    w = {"w1": torch.randn(1024, 64, generator=g), "w3": torch.randn(1024, 64, generator=g),
         "w2": torch.randn(64, 1024, generator=g)}
    big = expert_to_blob("up", 0, 0, "bf16", w)
    assert len(big) > LIMIT
    path = store / "models" / blob_format.expert_key("up", 0, 0, "bf16")
    config = json.dumps({"num_hidden_layers": 1, "num_local_experts": 1, "hidden_size": 64}).encode()
    port = free_port()
    argv = cli("expert-store") + ["serve", "--store", str(store), "--listen", f"127.0.0.1:{port}", "--ram-bytes", "0"]
    with ServiceProcess(limited(argv, LIMIT)) as srv, StoreClient.open(srv.address, deadline_s=20) as c:
        assert c.put("up", "config", config)[1] == len(config)
        for _ in range(2):  # twice: the first failure left nothing that trips the second
            with pytest.raises(ResourceExhausted) as e:
                c.put("up", "expert", big, layer=0, expert=0, precision="bf16")
            assert "space" in str(e.value)
            assert not path.exists() and leftovers(store) == []
        # the server is fine: it still stores what fits and answers Stat
        assert c.put("up", "config", config + b" ")[1] == len(config) + 1
        assert "up" not in next(iter(c.stat().values())).get("models", [])  # no manifest: no model
    # with room (the same directory, a server without the limit): the upload completes
    with ServiceProcess(argv) as srv, StoreClient.open(srv.address, deadline_s=20) as c:
        key, size = c.put("up", "expert", big, layer=0, expert=0, precision="bf16")
        assert size == len(big) and path.read_bytes() == big
        assert xxhash.xxh3_128_hexdigest(path.read_bytes()) == xxhash.xxh3_128_hexdigest(big)
    assert leftovers(store) == []
    assert wait_until(lambda: my_children() <= children_before, 10)
