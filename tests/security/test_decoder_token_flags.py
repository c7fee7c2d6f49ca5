"""The decoder's two tokens have two names: `--store-token-file` (sent to the store) and
`--auth-token-file` (required from the decoder's own clients). `--token-file` means "require
this token" on `expert-store serve`, so on `moe-decoder` it is refused with one line naming
both, as is `--tls-ca` (the store's CA, or the CA of client certificates?).

Real processes: the `moe-decoder` CLI, an `expert-store serve` that requires a token, a
`moe-decoder serve` that requires its own."""

from __future__ import annotations

import json
import re
import subprocess

import grpc
import pytest

from sec_procs import PROMPTS, ServiceProcess, pack_tiny_model, status_of
from service_procs import child_env, cli

from decoder._proto.adapmoe.v1 import decoder_pb2 as dpb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as dpb_grpc

pytestmark = pytest.mark.timeout(170)
MODEL = "tiny"
STORE_TOKEN = "store-tok-5d1e9a0c7b3f2468"
DECODER_TOKEN = "decoder-tok-8c2b6e4f0a1d3579"


def _moe_decoder(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli("moe-decoder") + list(args), capture_output=True, text=True, timeout=120,
                          env=env or _env_without_tokens())


def _env_without_tokens() -> dict[str, str]:
    env = child_env()
    env.pop("EXPERT_STORE_TOKEN", None)
    env.pop("MOE_DECODER_TOKEN", None)
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("token-flags")
    (d / "store.token").write_text(STORE_TOKEN + "\n")
    (d / "decoder.token").write_text(DECODER_TOKEN + "\n")
    return d


@pytest.fixture(scope="module")
def store(workdir):
    store_dir = pack_tiny_model(workdir, MODEL)
    with ServiceProcess(cli("expert-store") + ["serve", "--store", str(store_dir), "--listen", "127.0.0.1:0",
                                               "--ram-bytes", "0", "--token-file", str(workdir / "store.token")],
                        env=_env_without_tokens()) as proc:
        yield proc


SERVE = ["serve", "--model", MODEL]
GENERATE = ["generate", "--model", MODEL, "--prompt", "x"]


@pytest.mark.parametrize("command, flag, names", [
    (SERVE, "--token-file", ("--store-token-file", "--auth-token-file")),
    (GENERATE, "--token-file", ("--store-token-file", "--auth-token-file")),
    (SERVE, "--tls-ca", ("--store-tls-ca", "--tls-client-ca")),
])
def test_ambiguous_flags_are_refused_with_one_line_naming_both(workdir, command, flag, names):
    r = _moe_decoder(command[0], "--store", "127.0.0.1:1", *command[1:], flag, str(workdir / "store.token"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"{flag} is ambiguous" in lines[0] and all(n in lines[0] for n in names), lines[0]
    assert r.stdout == ""
    help_text = _moe_decoder(command[0], "--help").stdout
    assert not re.search(rf"(?<![\w-]){flag}\b", help_text) and names[0] in help_text


def test_generate_sends_the_store_token_file(workdir, store):
    base = ["generate", "--store", store.address, "--model", MODEL, "--prompt", PROMPTS[0], "--max-tokens", "4",
            "--no-stats"]
    refused = _moe_decoder(*base)
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert "UNAUTHENTICATED" in line and STORE_TOKEN not in line
    ok = _moe_decoder(*base, "--store-token-file", str(workdir / "store.token"))
    assert ok.returncode == 0, ok.stderr


def test_generate_fetch_workers_receive_with_the_store_token_file(workdir, store, tmp_path):
    """--fetch-workers: the host tier's receiving processes open the store with the decoder's
    token; without it the store refuses them as it refuses the decoder."""
    base = ["generate", "--store", store.address, "--model", MODEL, "--prompt", PROMPTS[0], "--max-tokens", "4",
            "--no-stats", "--host-cache-bytes", "16MiB", "--fetch-workers", "2"]
    refused = _moe_decoder(*base)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and STORE_TOKEN not in refused.stderr
    stats = tmp_path / "stats.json"
    ok = _moe_decoder(*base, "--store-token-file", str(workdir / "store.token"), "--stats-json", str(stats))
    assert ok.returncode == 0, ok.stderr
    provider = json.loads(stats.read_text())["provider"]
    pool = provider["fetch_pool"]
    assert pool["workers"] == 2 and pool["completed"] > 0 and pool["failed"] == 0 and pool["bytes"] > 0
    assert provider["tiers"]["store"]["hits"] == pool["completed"]


def test_serve_requires_the_auth_token_file_and_sends_the_store_token_file(workdir, store):
    with ServiceProcess.decoder(store.address, MODEL, "--store-token-file", str(workdir / "store.token"),
                                "--auth-token-file", str(workdir / "decoder.token")) as dec:
        with grpc.insecure_channel(dec.address) as ch:
            stub = dpb_grpc.DecoderStub(ch)
            request = dpb.GenerateRequest(prompt=PROMPTS[0], max_tokens=3)
            assert status_of(lambda: stub.Generate(request, timeout=60)) == grpc.StatusCode.UNAUTHENTICATED
            wrong = (("authorization", f"Bearer {STORE_TOKEN}"),)  # the store's token is not the decoder's
            assert status_of(lambda: stub.Generate(request, timeout=60, metadata=wrong)) \
                == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", f"Bearer {DECODER_TOKEN}"),)
            assert status_of(lambda: stub.Generate(request, timeout=60, metadata=good)) == grpc.StatusCode.OK
