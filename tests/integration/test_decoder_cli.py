"""`moe-decoder generate` end to end (real subprocesses, a real store dir and `expert-store serve`),
and its bad-input behaviour: one clear line on stderr, non-zero exit, never a traceback.

The happy paths, an unknown model and a store that is down run the real console script in a
subprocess; the other bad inputs call the same `decoder.cli.main(argv)` in-process (what the
script runs), which keeps this file fast on 2 cores."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import xxhash

from checkpoints import make_mixtral_checkpoint
from service_procs import ServiceProcess, moe_decoder, pack

from decoder.cli import main as cli_main

pytestmark = pytest.mark.timeout(300)

CONTEXT = 24


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder-cli")
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", hidden=32, ffn=32, layers=2, experts=4, top_k=2, heads=2,
                                      kv_heads=1, vocab=280, max_position_embeddings=CONTEXT, dtype=torch.bfloat16)
    store = root / "store"
    pack(ckpt, store, "tiny")  # the real CLI
    # a second copy (packed in-process, same code) that the store then says is a llama:
    # the decoder must refuse it with a clear error, not crash on it
    from expert_store.pack import pack_checkpoint
    from expert_store.store import ModelStore

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    data = json.dumps(cfg).encode()
    with ModelStore.open(str(store), ram_bytes=0) as ms:
        pack_checkpoint(ckpt, ms.tiered, model="notmixtral", progress=False)
        ms.put_file("notmixtral", "config", data, xxhash.xxh3_128_hexdigest(data))
    return store


class InProcess:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(capsys, *argv: str) -> InProcess:
    capsys.readouterr()
    try:
        rc = cli_main(list(argv))
    except SystemExit as e:  # argparse usage errors exit(2)
        rc = e.code
    out = capsys.readouterr()
    return InProcess(rc, out.out, out.err)


def assert_one_line_error(r, *needles: str, rc: int = 1) -> str:
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, r.stderr
    assert err.startswith("moe-decoder"), err
    for n in needles:
        assert n in err, err
    return err


def test_generate_from_store_dir_prints_text_and_stats(store_dir, tmp_path):
    stats_path = tmp_path / "stats.json"
    r = moe_decoder("generate", "--store", str(store_dir), "--model", "tiny", "--prompt", "Hello world",
                    "--max-tokens", "6", "--stats-json", str(stats_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    for row in ("decode tokens/s", "experts per token", "single-expert ratio", "bytes fetched", "hit rate"):
        assert row in r.stdout
    stats = json.loads(stats_path.read_text())
    assert stats["generated_tokens"] == 6 and stats["experts_per_token"] == 2.0 and stats["bytes_fetched"] > 0


def test_generate_over_grpc_with_cache_budget(store_dir):
    with ServiceProcess.expert_store(store_dir) as server:
        r = moe_decoder("generate", "--store", server.address, "--model", "tiny", "--prompt", "Once upon a time",
                        "--max-tokens", "5", "--gpu-cache-bytes", "64KiB", "--host-cache-bytes", "64KiB")
        assert r.returncode == 0, r.stderr
        assert "decode tokens/s" in r.stdout and "hit rate" in r.stdout
        # unknown model against the live server
        r = moe_decoder("generate", "--store", server.address, "--model", "nope", "--prompt", "x")
        assert_one_line_error(r, "nope", "not found")


def test_unknown_model(store_dir, capsys):
    assert_one_line_error(run_main(capsys, "generate", "--store", str(store_dir), "--model", "missing",
                                   "--prompt", "x"), "'missing'", "not found")


def test_not_a_mixtral_checkpoint(store_dir, capsys):
    assert_one_line_error(run_main(capsys, "generate", "--store", str(store_dir), "--model", "notmixtral",
                                   "--prompt", "x"), "not a Mixtral-layout checkpoint", "llama")


def test_prompt_longer_than_context(store_dir, capsys):
    prompt = " ".join(f"word{i}" for i in range(40))
    assert_one_line_error(run_main(capsys, "generate", "--store", str(store_dir), "--model", "tiny",
                                   "--prompt", prompt), "longer than the model's context", str(CONTEXT))


def test_store_down():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_one_line_error(moe_decoder("generate", "--store", f"127.0.0.1:{port}", "--model", "tiny",
                                      "--prompt", "x", timeout=90), "unavailable", str(port))


def test_store_directory_missing(tmp_path, capsys):
    assert_one_line_error(run_main(capsys, "generate", "--store", str(tmp_path / "nope"), "--model", "tiny",
                                   "--prompt", "x"), "does not exist")
    assert not (tmp_path / "nope").exists()


def test_usage_errors(store_dir, capsys):
    base = ("generate", "--store", str(store_dir), "--model", "tiny")
    assert_one_line_error(run_main(capsys, *base), "--prompt", rc=2)
    assert_one_line_error(run_main(capsys, *base, "--prompt", "x", "--gpu-cache-bytes", "lots"),
                          "invalid size", rc=2)
    assert_one_line_error(run_main(capsys, *base, "--prompt", "x", "--max-tokens", "-1"), "max-tokens")
    assert_one_line_error(run_main(capsys, *base, "--prompt", "x", "--precision", "int8"), "no int8 experts")
    assert_one_line_error(run_main(capsys, *base, "--prompt", "x", "--gating", "bogus"), "bogus")
    assert_one_line_error(run_main(capsys, *base, "--prompt", "x", "--top-p", "1.5"), "top_p")
