"""The image recipe (no docker engine here): what it copies exists and is enough to build the
project, the build context sends only that, both entry points end up in the wheel, and the
image runs as the non-root user the manifests expect."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "docker" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, rest in instructions():
        if op == "FROM":
            result.append([])
        if result:
            result[-1].append((op, rest))
    return result


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; '!' re-includes; a
    pattern matching a directory covers everything under it."""
    state = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        negate = pat.startswith("!")
        p = pat[1:] if negate else pat
        p = p.rstrip("/")
        regex = re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, pre) for pre in prefixes):
            state = not negate
    return state


def ignore_patterns() -> list[str]:
    return [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_base_image_user_and_entry_points():
    build, runtime = stages()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for op, rest in instructions()[:3] if op == "ARG"}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build") and runtime[0] == ("FROM", "${PYTHON_IMAGE}")
    users = [rest for op, rest in runtime if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "runtime must run as a numeric non-root user"
    # no ENTRYPOINT: the manifests choose `expert-store` or `moe-decoder` with `command:`
    assert not any(op == "ENTRYPOINT" for op, _ in runtime)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"expert-store", "moe-decoder"} <= scripts.keys()
    run_lines = " ".join(rest for op, rest in build if op == "RUN")
    assert "expert-store --help" in run_lines and "moe-decoder --help" in run_lines
    # read-only root filesystem: caches and HOME go to /tmp, no bytecode writes
    env = " ".join(rest for op, rest in runtime if op == "ENV")
    for needed in ("PYTHONDONTWRITEBYTECODE=1", "HOME=/tmp", "XDG_CACHE_HOME=/tmp"):
        assert needed in env


def test_torch_variant_build_arg_selects_the_wheel_index():
    build = stages()[0]
    args = dict(rest.split("=", 1) for op, rest in build if op == "ARG" and "=" in rest)
    assert args["TORCH_VARIANT"] == "cpu"
    pip_torch = [rest for op, rest in build if op == "RUN" and "torch==" in rest]
    assert pip_torch and "download.pytorch.org/whl/${TORCH_VARIANT}" in pip_torch[0]
    extras = re.findall(r'pip install "/src\[([a-z0-9,]+)\]"', " ".join(rest for op, rest in build))
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras and set(extras[0].split(",")) <= declared.keys()
    assert "torch" in extras[0].split(",") and "k8s" in extras[0].split(",")


def test_build_context_sends_what_copy_needs_and_nothing_else():
    patterns = ignore_patterns()
    copies = [rest.split() for op, rest in stages()[0] if op == "COPY"]
    sources = [src for parts in copies for src in parts[:-1] if not src.startswith("--")]
    assert sources, "no COPY in the build stage"
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        for f in ([REPO / src] if (REPO / src).is_file() else (REPO / src).rglob("*.py")):
            rel = f.relative_to(REPO).as_posix()
            assert not ignored(rel, patterns), f"{rel} is needed by COPY but .dockerignore drops it"
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "benchmarks/x.py",
                     "expert_store/__pycache__/x.pyc", ".whl/redis.whl"):
        assert ignored(unwanted, patterns), f"{unwanted} would be sent to the docker daemon"


@pytest.mark.timeout(180)
def test_copied_sources_build_a_wheel_with_both_entry_points(tmp_path):
    """`pip install /src[...]` in the image sees only the COPYed files: build a wheel from
    exactly those (offline, this venv's setuptools) and check the console scripts."""
    src = tmp_path / "src"
    src.mkdir()
    patterns = ignore_patterns()
    for op, rest in stages()[0]:
        if op != "COPY":
            continue
        parts = rest.split()
        dest = parts[-1]
        for s in parts[:-1]:
            origin = REPO / s
            target = src / Path(dest).relative_to("/src")
            if dest.endswith("/"):
                target = target / origin.name
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=lambda d, names: [
                    n for n in names if ignored((Path(d) / n).relative_to(REPO).as_posix(), patterns)])
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    out = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=170,
                       env={**os.environ, "PIP_NO_INPUT": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = out.glob("adapmoe-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "expert-store = expert_store.cli:main" in entry_points
    assert "moe-decoder = decoder.cli:main" in entry_points
    for module in ("expert_store/discovery.py", "expert_store/server.py", "decoder/cli.py",
                   "expert_store/_proto/adapmoe/v1/expert_store_pb2.py"):
        assert module in names, f"{module} missing from the wheel"
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
