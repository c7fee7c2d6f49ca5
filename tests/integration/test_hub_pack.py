"""`expert-store pack hf://ORG/NAME[@REVISION]`: the real `huggingface_hub`, offline
(HF_HUB_OFFLINE=1) against a hub cache directory laid out the way the library writes it
(models--ORG--NAME/{blobs,refs/main,snapshots/<commit>/...}, snapshot files linking to blobs),
holding a small random Mixtral checkpoint. No network and no fake server: what is tested is
our reference parsing, the library call (cache dir, revision, file patterns) and packing the
snapshot it returns, through the real CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from checkpoints import make_mixtral_checkpoint
from service_procs import child_env, cli

from expert_store import hub

pytestmark = pytest.mark.timeout(240)
ORG, NAME = "test-org", "tiny-moe"
COMMIT = hashlib.sha1(b"adapmoe hub test").hexdigest()


def _hub_cache(root: Path, checkpoint: Path, extra_files: dict[str, bytes]) -> Path:
    """root/models--ORG--NAME as huggingface_hub lays out a downloaded snapshot."""
    repo = root / f"models--{ORG}--{NAME}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    files = {f.name: f.read_bytes() for f in checkpoint.iterdir() if f.is_file()}
    files.update(extra_files)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", hidden=64, ffn=96, layers=2, experts=4, seed=11)
    # a repository also holds files pack never reads
    cache = _hub_cache(root / "cache", ckpt, {"README.md": b"# tiny\n", "pytorch_model.bin": os.urandom(64)})
    return ckpt, cache


def _pack(*args: str) -> subprocess.CompletedProcess:
    env = child_env()
    env.update(HF_HUB_OFFLINE="1", HF_TOKEN="hf_not_a_real_token_offline", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([*cli("expert-store"), "pack", *args, "--no-progress"], capture_output=True, text=True,
                          timeout=200, env=env)


def _store_files(store: Path, model: str) -> dict[str, bytes]:
    base = store / model if (store / model).is_dir() else store
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and model in p.as_posix()}


@pytest.mark.parametrize("suffix", ["", "@main", f"@{COMMIT}"])
def test_pack_from_the_hub_cache_equals_packing_the_checkpoint_directory(hub_cache, tmp_path, suffix):
    ckpt, cache = hub_cache
    r = _pack(f"hf://{ORG}/{NAME}{suffix}", "--hf-cache", str(cache), "--store", str(tmp_path / "hub-store"),
              "--precisions", "bf16,int4")
    assert r.returncode == 0, r.stderr
    assert f"packed {NAME} into" in r.stdout  # the model is named after the repository, not the commit
    direct = _pack(str(ckpt), "--store", str(tmp_path / "dir-store"), "--model", NAME, "--precisions", "bf16,int4")
    assert direct.returncode == 0, direct.stderr
    from_hub, from_dir = _store_files(tmp_path / "hub-store", NAME), _store_files(tmp_path / "dir-store", NAME)
    assert from_hub and from_hub.keys() == from_dir.keys()
    assert all(from_hub[k] == from_dir[k] for k in from_dir), "the hub snapshot packs to other bytes"


@pytest.mark.parametrize("ref, needle", [
    (f"hf://{ORG}/not-cached", "not in the hub cache"),
    (f"hf://{ORG}/{NAME}@v9.9", "not in the hub cache"),
    ("hf://just-a-name", "expected hf://ORG/NAME"),
    (f"hf://{ORG}/{NAME}@", "expected hf://ORG/NAME"),
])
def test_unusable_references_fail_with_one_line(hub_cache, tmp_path, ref, needle):
    _, cache = hub_cache
    r = _pack(ref, "--hf-cache", str(cache), "--store", str(tmp_path / "store"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "hf_not_a_real_token" not in r.stderr
    assert not (tmp_path / "store" / "manifest").exists()


def test_hf_cache_needs_a_hub_reference(hub_cache, tmp_path):
    ckpt, cache = hub_cache
    r = _pack(str(ckpt), "--hf-cache", str(cache), "--store", str(tmp_path / "store"))
    assert r.returncode == 1 and "--hf-cache goes with an hf://" in r.stderr


def test_only_the_files_pack_reads_are_fetched():
    """The patterns go through the library's own filter, as snapshot_download applies them."""
    from huggingface_hub.utils import filter_repo_objects

    repo_files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "model-00001-of-00002.safetensors",
                  "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                  "pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.00.pt", "original/params.json",
                  "model.gguf", "README.md", ".gitattributes", "figures/arch.png"]
    kept = set(filter_repo_objects(repo_files, allow_patterns=list(hub.ALLOW_PATTERNS)))
    assert kept == set(repo_files[:8])


@pytest.mark.parametrize("text, repo, revision", [
    ("hf://mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-v0.1", None),
    ("hf://Org/Name@refs/pr/3", "Org/Name", "refs/pr/3"),
    (f"hf://a/b@{COMMIT}", "a/b", COMMIT),
])
def test_hub_references_parse(text, repo, revision):
    ref = hub.parse_hub_ref(text)
    assert (ref.repo_id, ref.revision, str(ref)) == (repo, revision, text)
    for bad in ("hf://", "hf://a", "hf://a/b/c", "hf://../b", "hf://a/b@x y", "hf:///a/b"):
        with pytest.raises(hub.HubError):
            hub.parse_hub_ref(bad)
