#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and its own torch (never reinstalled here), build
# llmcache._C in place for that card, run the GPU tests, the kernel microbenchmarks and the
# end-to-end benchmark in bf16, and write logs plus a results table into the directory given
# as $1. Budget: under 8 minutes on an H100/H200.
#   bash bench/gpu_check.sh OUTDIR
# The STS-B sentences of the end-to-end streams live outside the repository (../shared/data), which
# does not travel to the device: before the run copy them into the ignored bench/.data/ and carry it
#   mkdir -p bench/.data && cp -r ../shared/data/stsbenchmark bench/.data/   (run(carry=["bench/.data"]))
# (without it bench.e2e falls back to the packaged demo corpus, too small for --rows 1024).
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
cc=$($PY -c "import torch; p=torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
echo "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader) cc=$cc" | tee "$out/env.txt"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/env.txt"

# 1. Build in place for this card only (no pip: the machine's torch stays as it is).
start=$(date +%s)
LLMCACHE_CUDA_ARCHS=$cc MAX_JOBS=${MAX_JOBS:-16} timeout 300 $PY setup.py build_ext --inplace > "$out/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$out/env.txt"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import llmcache, json; print(json.dumps(llmcache.build_info()))" | tee -a "$out/env.txt"

# 2. GPU tests: the CUDA kernels and Triton (compiled) against the reference, the cache on CUDA.
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py tests/test_triton_ops.py \
  tests/test_accelerate.py > "$out/tests.log" 2>&1
echo "tests: $(tail -n 1 "$out/tests.log")" | tee -a "$out/env.txt"

# 3. Kernel microbenchmarks (do_bench medians) and the end-to-end benchmark in bf16.
timeout 150 $PY -m bench.kernels --device cuda --out "$out" > "$out/kernels.log" 2>&1
echo "kernels rc=$?" | tee -a "$out/env.txt"
for model in bert-base gpt2; do
  timeout 60 $PY -m bench.e2e --model $model --device cuda --dtype bf16 --rows 1024 --batch 64 \
    --data "${LLMCACHE_DATA:-bench/.data}" --out "$out" >> "$out/e2e.log" 2>&1
done
echo "accelerate rc=$?" | tee -a "$out/env.txt"

# 4. The table: the microbenchmark's table and targets, the end-to-end lines.
{
  echo "# llmcache GPU check — $(date -u +%Y-%m-%d) — $(nvidia-smi --query-gpu=name --format=csv,noheader)"
  cat "$out/env.txt"
  echo
  grep -v -E "^\s*$" "$out/kernels.log" | grep -v -i "warn" || true
  echo
  grep -E "ms/row|layer hit" "$out/e2e.log" || true
} > "$out/results.md"
echo "wrote $out/results.md"
