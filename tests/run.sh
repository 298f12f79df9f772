#!/usr/bin/env bash
# The whole test suite: the C++ kernels alone (CMake + ctest), the Python suite on the
# fallbacks (LLMCACHE_SKIP_EXT=1: Triton under the interpreter and PyTorch), then the full
# Python suite with the compiled extension. GPU tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
build=$(mktemp -d)
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release > "$build/configure.log"
cmake --build "$build" -j "${MAX_JOBS:-2}" > "$build/build.log"
ctest --test-dir "$build" --output-on-failure
rm -rf "$build"
echo "== Python suite on the fallbacks (LLMCACHE_SKIP_EXT=1) =="
LLMCACHE_SKIP_EXT=1 .venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests
echo "== Python suite with the compiled extension =="
.venv/bin/python -m pytest -q -p no:cacheprovider tests
