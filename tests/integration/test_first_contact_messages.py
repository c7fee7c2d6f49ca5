"""What a new user meets first, through the real console scripts: a store that is down is one
line naming its address (for generate, serve and calibrate alike); a Hugging Face checkpoint
given as --store says how to pack it; calibrate warns when its profile rests on few tokens;
`expert-store inspect` after a pack that did not finish says what is on disk and how to
finish it; every --help shows the defaults; the README has a pip route beside make."""

from __future__ import annotations

import random
import re
import socket
import tomllib
from pathlib import Path

import pytest

from checkpoints import make_mixtral_checkpoint
from service_procs import moe_decoder, pack, run_cli

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-contact")
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", hidden=32, ffn=32, layers=2, experts=4, heads=2, kv_heads=1,
                                      vocab=300, seed=13)
    pack(ckpt, root / "store", MODEL)
    return ckpt, root / "store"


def _free_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(r, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"], ["calibrate", "--text", "TEXT"]])
def test_a_down_store_is_one_line_naming_its_address(tmp_path, command):
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x\n")
    address = f"127.0.0.1:{_free_port()}"
    argv = [a if a != "TEXT" else str(text) for a in command]
    line = _one_line(moe_decoder(argv[0], "--store", address, "--model", MODEL, *argv[1:], timeout=90),
                     f"store {address} is unavailable", "expert-store serve")
    assert "None" not in line and "failing over" not in line


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"], ["calibrate", "--text", "TEXT"]])
def test_a_checkpoint_directory_as_store_says_how_to_pack_it(packed, command):
    ckpt, _ = packed
    argv = [a if a != "TEXT" else str(ckpt / "config.json") for a in command]
    _one_line(moe_decoder(argv[0], "--store", str(ckpt), "--model", MODEL, *argv[1:]),
              "is a Hugging Face checkpoint, not an expert store", f"expert-store pack {ckpt} --store")


def _text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    return " ".join(rng.choice(vocab) for _ in range(words)) + "\n"


def test_calibrate_warns_when_the_profile_rests_on_few_tokens(packed, tmp_path):
    from decoder.calibrate import MIN_RELIABLE_TOKENS

    _, store = packed
    text = tmp_path / "held-out.txt"
    text.write_text(_text(4000, seed=3))
    few = moe_decoder("calibrate", "--store", str(store), "--model", MODEL, "--text", str(text),
                      "--tokens", "16", "--out", str(tmp_path / "few.json"), "--no-progress")
    assert few.returncode == 0, few.stderr
    warned = [ln for ln in few.stderr.splitlines() if "warning" in ln]
    assert len(warned) == 1 and re.search(r"only 1[56] tokens", warned[0]), few.stderr
    assert str(MIN_RELIABLE_TOKENS) in warned[0] and (tmp_path / "few.json").is_file()
    enough = moe_decoder("calibrate", "--store", str(store), "--model", MODEL, "--text", str(text),
                         "--tokens", str(MIN_RELIABLE_TOKENS + 64), "--seq-len", "128",
                         "--out", str(tmp_path / "enough.json"), "--no-progress")
    assert enough.returncode == 0, enough.stderr
    assert "warning" not in enough.stderr


def test_inspect_after_an_unfinished_pack_says_what_is_there_and_how_to_finish(packed, tmp_path):
    import shutil

    ckpt, store = packed
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    manifest = broken / "models" / MODEL / "manifest.json"
    assert manifest.is_file()
    manifest.unlink()  # what a pack that broke off leaves: the manifest is written last
    r = run_cli("inspect", "--store", str(broken))
    assert r.returncode == 0, r.stderr
    assert "no models" not in r.stdout
    assert f"{MODEL}: a pack that did not finish left 8 expert blobs" in r.stdout, r.stdout
    assert f"expert-store pack CHECKPOINT --store {broken} --model {MODEL}` again" in r.stdout
    assert re.search(rf"^{MODEL}\s+expert\s+bf16\s+8\s", r.stdout, re.M), r.stdout
    # following the advice finishes it: the blobs on disk are kept, the model is listed
    again = run_cli("pack", str(ckpt), "--store", str(broken), "--model", MODEL, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "8 already present" in again.stdout, again.stdout
    listed = run_cli("inspect", "--store", str(broken))
    assert "did not finish" not in listed.stdout and f"{MODEL}: 2 layers x 4 experts" in listed.stdout


@pytest.mark.parametrize("argv, shown", [
    (["moe-decoder", "generate"], ["--max-tokens MAX_TOKENS", "(default: 64)", "(default: topk)", "(default: cpu)"]),
    (["moe-decoder", "serve"], ["(default: 127.0.0.1:50052)", "(default: 4)", "(default: 16)"]),
    (["moe-decoder", "calibrate"], ["(default: 256)", "(default: bf16)"]),
    (["expert-store", "serve"], ["(default: 127.0.0.1:50051)", "(default: 64)"]),
    (["expert-store", "pack"], ["(default: bf16)", "(default: 128)", "(default: all)"]),
])
def test_help_shows_the_defaults(argv, shown):
    import subprocess

    from service_procs import child_env, cli

    r = subprocess.run(cli(argv[0]) + [argv[1], "--help"], capture_output=True, text=True, timeout=60,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    text = re.sub(r"\s+", " ", r.stdout)
    for s in shown:
        assert s in text, (s, r.stdout)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_readme_has_a_pip_route_beside_make():
    readme = (REPO / "README.md").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = re.findall(r"pip install (?:-e )?'?\.(?:\[([a-z0-9,]+)\])?'?", readme)
    assert installs, "no `pip install .` line in the README"
    for group in installs:
        assert set(filter(None, group.split(","))) <= extras.keys(), group
    assert "make demo" in readme and "make test" in readme
