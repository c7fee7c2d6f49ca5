"""The llama.cpp source the peer rows are built from, and its build.

benchmarks/peers/fetch-llama-cpp.sh puts llama.cpp, as llama-cpp-python's PyPI source archive
vendors it, trimmed to what the build and the converter need, in `.peers/llama.cpp` (ignored;
a GPU call carries it). This module builds the two tools the benchmark runs, llama-bench and
llama-quantize: CPU backend always, CUDA for sm_90 (the H200) with `cuda=True`, nothing
optional (no server, tests, examples, OpenSSL), and records the version and build flags that
go into every peer row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / ".peers" / "llama.cpp"
TARGETS = ("llama-bench", "llama-quantize")
FETCH = "benchmarks/peers/fetch-llama-cpp.sh"


def source_info(src: Path = SRC) -> dict[str, Any]:
    """What fetch-llama-cpp.sh recorded: archive version and sha256, llama.cpp commit."""
    path = src / "ADAPMOE_SOURCE.json"
    if not path.is_file():
        raise FileNotFoundError(f"no llama.cpp source at {src} (run {FETCH} from the project root first)")
    return json.loads(path.read_text())


def use_gguf_py(src: Path = SRC) -> str:
    """Import `gguf` from the fetched source's gguf-py (the version its converter and loader
    match; the GPU image has no `gguf` package), else the installed one. Returns its path."""
    local = src / "gguf-py"
    if local.is_dir() and str(local) not in sys.path and "gguf" not in sys.modules:
        sys.path.insert(0, str(local))
    import gguf

    return str(Path(gguf.__file__).parent)


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for p in (Path("/usr/local/cuda/bin/nvcc"), *sorted(Path("/usr/local").glob("cuda-*/bin/nvcc"), reverse=True)):
        if p.is_file():
            return str(p)
    return None


def cmake_args(src: Path, build: Path, cuda: bool, commit: str) -> list[str]:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []   # else CMake's default (make)
    args = ["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", f"-DLLAMA_BUILD_COMMIT={commit}",
            f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"]
    if cuda:
        args.append("-DCMAKE_CUDA_ARCHITECTURES=90")
        compiler = nvcc()
        if compiler and not shutil.which("nvcc"):
            args.append(f"-DCMAKE_CUDA_COMPILER={compiler}")
    return args


def build_env() -> dict[str, str]:
    """The source sits inside the project's git tree: stop llama.cpp's CMake from reading the
    project's commit as its own (the version comes from -DLLAMA_BUILD_COMMIT)."""
    return {**os.environ, "GIT_CEILING_DIRECTORIES": str(SRC.parent)}


def build_script(src: Path, build: Path, cuda: bool, jobs: int, nice: int = 0) -> tuple[str, list[str]]:
    """A shell command that configures and builds the tools (what `start_build` runs), and the
    cmake configure arguments (the build flags a row records)."""
    import shlex

    conf = cmake_args(src, build, cuda, source_info(src)["llama_cpp_commit"])
    make = ["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)]
    prefix = f"nice -n {nice} " if nice else ""
    return f"{shlex.join(conf)} && {prefix}{shlex.join(make)}", conf


def start_build(build: Path, cuda: bool, jobs: int, log: Path, nice: int = 0, src: Path = SRC) -> subprocess.Popen:
    """Configure + build in the background, in a new session (so the whole tree of compiler
    processes can be paused and resumed as one group: os.killpg(proc.pid, SIGSTOP/SIGCONT))."""
    script, conf = build_script(src, build, cuda, jobs, nice)
    build.mkdir(parents=True, exist_ok=True)
    (build / "adapmoe_cmake_args.json").write_text(json.dumps(conf) + "\n")
    with open(log, "ab") as f:
        return subprocess.Popen(["bash", "-c", script], stdout=f, stderr=subprocess.STDOUT, env=build_env(),
                                start_new_session=True)


def binaries(build: Path) -> dict[str, Path]:
    return {t: build / "bin" / t for t in TARGETS}


def built(build: Path) -> bool:
    return all(p.is_file() for p in binaries(build).values())


def build_info(build: Path, src: Path = SRC) -> dict[str, Any]:
    """Version and build flags of a finished build: the source record, the cmake arguments,
    the compilers CMake found."""
    info: dict[str, Any] = {"source": source_info(src)}
    args = build / "adapmoe_cmake_args.json"
    if args.is_file():
        conf = json.loads(args.read_text())
        info["cmake_flags"] = conf[conf.index("-B") + 2:]     # what follows cmake -S SRC -B BUILD
    cache = build / "CMakeCache.txt"
    if cache.is_file():
        text = cache.read_text(errors="replace")
        for key in ("CMAKE_CXX_COMPILER", "CMAKE_CUDA_COMPILER", "GGML_NATIVE", "GGML_CUDA"):
            m = re.search(rf"^{key}:[A-Z]+=(.*)$", text, re.M)
            if m:
                info[key] = m.group(1)
    return info
