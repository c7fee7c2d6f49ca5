#!/usr/bin/env bash
# Fetch llama.cpp as llama-cpp-python's source archive on PyPI vendors it, and trim it to what
# builds llama-bench and llama-quantize (CPU and CUDA backends) and converts an HF checkpoint
# (convert_hf_to_gguf.py, conversion/, gguf-py/). The trimmed tree (~22 MB) goes to
# .peers/llama.cpp, an ignored folder that a GPU call carries (the archive itself, ~76 MB, is
# over what a call may carry and stays in the cache folder).
#
# Usage (from the project root): benchmarks/peers/fetch-llama-cpp.sh [LLAMA_CPP_PYTHON_VERSION]
# Writes .peers/llama.cpp/ADAPMOE_SOURCE.json: the archive's version and sha256 and the llama.cpp
# commit that the archive's CHANGELOG names for that version.
set -euo pipefail
VERSION=${1:-0.3.36}
ROOT=$(git rev-parse --show-toplevel)
CACHE=${ADAPMOE_PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/adapmoe-peers}
DEST=$ROOT/.peers/llama.cpp
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz

grep -qx '/.peers/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.peers/' >> "$ROOT/.git/info/exclude"
mkdir -p "$CACHE"
if [ ! -s "$SDIST" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$CACHE" "llama-cpp-python==$VERSION" \
    || python3 -m pip download -q --no-deps --no-binary :all: -d "$CACHE" "llama-cpp-python==$VERSION"
fi
[ -s "$SDIST" ] || { echo "no $SDIST after pip download" >&2; exit 1; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
tar -xzf "$SDIST" -C "$TMP" "llama_cpp_python-$VERSION/vendor/llama.cpp" "llama_cpp_python-$VERSION/CHANGELOG.md"
SRC=$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp
# the llama.cpp commit of this release: the first "llama.cpp@<hash>" in its CHANGELOG section
COMMIT=$(awk -v v="## [$VERSION]" 'index($0, v) == 1 {on = 1; next} on && /^## \[/ {exit}
          on && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART + 10, RLENGTH - 10); exit}' \
          "$TMP/llama_cpp_python-$VERSION/CHANGELOG.md")
[ -n "$COMMIT" ] || { echo "no llama.cpp commit for $VERSION in the archive's CHANGELOG" >&2; exit 1; }

rm -rf "$DEST"
mkdir -p "$DEST/ggml/src" "$DEST/tools"
# the build: top-level CMake, llama, common, its vendored headers, ggml with the CPU and CUDA backends
cp -r "$SRC"/{CMakeLists.txt,cmake,include,src,common,vendor,LICENSE,licenses} "$DEST"/
cp -r "$SRC"/ggml/{CMakeLists.txt,cmake,include} "$DEST/ggml"/
cp "$SRC"/ggml/src/*.* "$DEST/ggml/src"/
cp -r "$SRC"/ggml/src/{ggml-cpu,ggml-cuda} "$DEST/ggml/src"/
cp -r "$SRC"/tools/{llama-bench,quantize} "$DEST/tools"/
# tools/CMakeLists.txt adds every tool (server, mtmd, ...): only the two we build
cat > "$DEST/tools/CMakeLists.txt" <<'CMAKE'
# trimmed by benchmarks/peers/fetch-llama-cpp.sh: only the tools the peer benchmark builds
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(quantize)
CMAKE
# the converter (HF checkpoint -> GGUF) and the gguf Python package it imports
cp -r "$SRC"/{convert_hf_to_gguf.py,conversion,gguf-py} "$DEST"/
rm -rf "$DEST/gguf-py/tests" "$DEST/gguf-py/examples"
find "$DEST" -name '__pycache__' -prune -exec rm -rf {} +

SHA=$(sha256sum "$SDIST" | cut -d' ' -f1)
cat > "$DEST/ADAPMOE_SOURCE.json" <<JSON
{"source": "llama-cpp-python $VERSION sdist (PyPI), vendor/llama.cpp", "llama_cpp_python": "$VERSION",
 "sdist_sha256": "$SHA", "llama_cpp_commit": "$COMMIT"}
JSON
echo "llama.cpp $COMMIT (llama-cpp-python $VERSION) -> $DEST: $(du -sh "$DEST" | cut -f1)"
