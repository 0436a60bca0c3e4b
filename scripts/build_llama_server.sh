#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench (and llama-batched-bench) as CPU-only benchmark peers.
# Source: the llama-cpp-python sdist on PyPI, which vendors llama.cpp under vendor/llama.cpp.
# Output: .peers/bin/ under the repo root. Idempotent: exits at once if every required binary runs and was
# built by this script's current recipe (version + flags, stamped in .peers/bin/.build-id); else rebuilds.
# `--build-id` prints that stamp and exits.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
# ggml's AMX kernels segfault in ggml_backend_amx_mul_mat on Sapphire Rapids hosts (llama.cpp issue
# #20824, unfixed), taking llama-server and llama-bench down at the first matmul. -march=native would
# turn them on wherever the CPU has AMX, so they are compiled out (explicit -mno-* wins over -march);
# LLAMA_AMX=1 keeps them.
if [[ "${LLAMA_AMX:-0}" == 1 ]]; then
    ARCH_FLAGS=""
else
    ARCH_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$ROOT/.peers/bin"

# Required binaries: all of them must exist and run, else everything is (re)built.
REQUIRED=(llama-server llama-bench)
BUILD_ID="llama-cpp-python $LLAMA_CPP_PYTHON_VERSION; flags: ${ARCH_FLAGS:-none}; targets: ${REQUIRED[*]}"

if [[ "${1:-}" == --build-id ]]; then
    echo "$BUILD_ID"
    exit 0
fi

all_built() {
    local t
    [[ -f "$BIN_DIR/.build-id" && "$(cat "$BIN_DIR/.build-id")" == "$BUILD_ID" ]] || return 1
    for t in "${REQUIRED[@]}"; do
        [[ -x "$BIN_DIR/$t" ]] && "$BIN_DIR/$t" --help >/dev/null 2>&1 || return 1
    done
}

if all_built; then
    echo "already built: ${REQUIRED[*]/#/$BIN_DIR/}"
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

echo ">> downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
"$PYTHON" -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$WORK/dl"

SDIST="$(ls "$WORK"/dl/llama_cpp_python-*.tar.gz "$WORK"/dl/llama-cpp-python-*.tar.gz 2>/dev/null | head -n1 || true)"
if [[ -z "$SDIST" ]]; then
    echo "error: sdist not found in $WORK/dl" >&2
    exit 1
fi

echo ">> unpacking $(basename "$SDIST")"
mkdir -p "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src" --strip-components=1
LLAMA_SRC="$WORK/src/vendor/llama.cpp"
if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    echo "error: vendored llama.cpp not found at $LLAMA_SRC" >&2
    exit 1
fi

echo ">> configuring (CPU-only, Release, static)"
# LLAMA_CURL is a no-op in newer llama.cpp (kept for older vendored versions); LLAMA_OPENSSL=OFF
# drops the libssl dependency; LLAMA_USE_PREBUILT_UI=OFF stops a web-UI download from Hugging Face
# at build time (the server is then built without an embedded web UI, which a benchmark does not need).
cmake -S "$LLAMA_SRC" -B "$WORK/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$ARCH_FLAGS" \
    -DCMAKE_CXX_FLAGS="$ARCH_FLAGS" \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF \
    -DGGML_METAL=OFF \
    -DGGML_VULKAN=OFF \
    -DGGML_OPENMP=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON

TARGETS=("${REQUIRED[@]}")
# llama-batched-bench is cheap (one small source file on top of the same libraries).
# (Capture first: `cmake ... | grep -q` would trip pipefail via SIGPIPE.)
TARGET_HELP="$(cmake --build "$WORK/build" --target help 2>/dev/null || true)"
if grep -q 'llama-batched-bench' <<<"$TARGET_HELP"; then
    TARGETS+=(llama-batched-bench)
fi

echo ">> building ${TARGETS[*]} with -j$JOBS"
nice -n 10 cmake --build "$WORK/build" --config Release -j"$JOBS" --target "${TARGETS[@]}"

mkdir -p "$BIN_DIR"
rm -f "$BIN_DIR/.build-id"
for t in "${TARGETS[@]}"; do
    install -m 0755 "$WORK/build/bin/$t" "$BIN_DIR/$t"
done
# Static build should need no llama/ggml shared libs; copy any that were produced anyway.
shopt -s nullglob
for lib in "$WORK"/build/bin/*.so* "$WORK"/build/src/*.so* "$WORK"/build/ggml/src/*.so* "$WORK"/build/common/*.so*; do
    cp -a "$lib" "$BIN_DIR/"
done
shopt -u nullglob

"$BIN_DIR/llama-server" --version
echo "$BUILD_ID" >"$BIN_DIR/.build-id"
if ! all_built; then
    echo "error: a required binary does not run: ${REQUIRED[*]}" >&2
    exit 1
fi
echo "installed: ${TARGETS[*]/#/$BIN_DIR/}"
