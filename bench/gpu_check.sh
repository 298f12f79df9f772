#!/usr/bin/env bash
# GPU check: build llmcache._C in place for the card, run the GPU tests, the kernel microbenchmarks
# (with the tensor-core route) and the end-to-end benchmark in bf16 on BERT-base and GPT-2 sized
# random-weight models, on a machine with an NVIDIA GPU and its own torch (never reinstalled).
#   bash bench/gpu_check.sh --prepare          here, once: copy the tokenizer and STS-B into bench/.data
#   bash bench/gpu_check.sh --dry-run OUTDIR   here, on the CPU: every step at tiny sizes (well under 3 min)
#   bash bench/gpu_check.sh OUTDIR             on the GPU machine, with bench/.data carried beside the tree
#   ... [--steps build,tests,kernels,e2e]      only these steps (env and the extension check always run)
# OUTDIR gets results.md (a section appended after each step, so a killed run keeps what it did), check.log
# (every step's full output) and the benchmarks' JSON/CSV rows: seven files. The exit status is 1, with the
# reasons at the end of results.md, when the build fails, llmcache._C lacks CUDA kernels for this card or
# dispatch would not pick them, any GPU test fails or is skipped, a step fails or outruns its budget.
# Step budgets add to 540 s (the lent machine runs one command for at most 600 s); on the GPU no step
# may outlast what is left of the 540. The dry run reports each step's time against its budget and is
# never failed by one (a loaded CPU is no measure of the GPU's times): its limit only stops a hung step.
# Environment: PYTHON (python3), GPU_CHECK_DATA (bench/.data), GPU_CHECK_TESTS (the GPU test files),
# GPU_CHECK_STRICT_SKIPS=1 (a dry run fails on skips too), MAX_JOBS (16).
set -uo pipefail
mode=gpu steps=all out=
while (($#)); do
  case $1 in
    --prepare) mode=prepare ;;
    --dry-run) mode=dry ;;
    --steps) steps=${2:?--steps needs a comma-separated list}; shift ;;
    --steps=*) steps=${1#*=} ;;
    -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out=$(realpath -m "$1") ;;
  esac
  shift
done
data=$(realpath -m "${GPU_CHECK_DATA:-$(dirname "$0")/.data}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ $mode == prepare ]]; then exec $PY -m bench.gpu_check prepare --data "$data"; fi
[[ -n $out ]] || { echo "usage: bash bench/gpu_check.sh [--prepare | --dry-run] OUTDIR (see --help)" >&2; exit 2; }
mkdir -p "$out"
tmp=$(mktemp -d)

order=(env build ext tests kernels hostpath e2e-bert-base e2e-gpt2)
declare -A budget=([env]=15 [build]=150 [ext]=15 [tests]=135 [kernels]=90 [hostpath]=30 [e2e-bert-base]=55
                   [e2e-gpt2]=50)
total=0
for name in "${order[@]}"; do total=$((total + budget[$name])); done
((total <= 540)) || { echo "step budgets add to $total s, over 540" >&2; exit 2; }

want() { [[ $steps == all || ,$steps, == *,$1,* || ,$steps, == *,${1%%-*},* ]]; }

tests=${GPU_CHECK_TESTS:-tests/test_cuda_ops.py tests/test_triton_ops.py}
if [[ $mode == gpu ]]; then
  unset TRITON_INTERPRET  # compiled Triton: the interpreter accepts kernels the compiler rejects
  cc=$($PY -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null)
  card="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null) cc=${cc:-none}"
  # The build first removes llmcache/_C*.so: a warm machine's earlier build must not pass for this one.
  cmd_build=(bash -c 'rm -f llmcache/_C*.so && exec "$@"' build env LLMCACHE_CUDA_ARCHS="$cc"
    MAX_JOBS="${MAX_JOBS:-16}" $PY setup.py build_ext --inplace)
  dry=() device=(--device cuda) skips=()
  $PY -c "import xdist" 2>/dev/null && tests="-n 4 $tests"  # Triton compiles on 4 cores at once
  sizes=() e2e_sizes=(--rows 1024 --batch 64) host_rounds=(--rounds 7) scale=1
else
  card="no GPU: dry run on $(uname -m), $(nproc) cores"
  cmd_build=(ls -l llmcache/_C*.so)  # the dry run reuses the in-place build (pip install -e . made it)
  dry=(--dry-run) device=(--device cpu) skips=(--allow-skips)
  [[ ${GPU_CHECK_STRICT_SKIPS:-0} == 1 ]] && skips=()
  sizes=(--quick) e2e_sizes=(--size tiny --rows 64 --batch 16 --repeats 1) host_rounds=(--rounds 2) scale=10
fi

extract() {  # what of a step's stdout goes into results.md
  case $1 in
    build) tail -n 12 "$tmp/$1.out" ;;  # a compiler error ends up here, ninja prints to stdout
    tests) grep '^junit ' "$tmp/$1.out" ;;
    *) grep -v -i -E '^\s*$|warn' "$tmp/$1.out" ;;
  esac
}

reasons=()
step() {  # NAME CMD...: CMD under the step's budget (GPU: capped by what is left of the 540 s)
  local name=$1 rc verdict
  shift
  local limit=$((540 * scale - SECONDS))  # SECONDS: since the script started
  ((limit > budget[$name] * scale)) && limit=$((budget[$name] * scale))
  [[ $mode == dry ]] && limit=$((budget[$name] * scale))  # a hang guard only
  local start=$SECONDS
  if ((limit <= 0)); then
    rc=124 && : >"$tmp/$name.out" && : >"$tmp/$name.err"
  else
    timeout -k 2 "$limit" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err"
    rc=$?
  fi
  local took=$((SECONDS - start))
  { echo "===== $name: rc=$rc in $took s: $*"; cat "$tmp/$name.out" "$tmp/$name.err"; } >>"$out/check.log"
  verdict=PASS
  if ((rc == 124 || rc == 137)); then
    verdict="FAIL: timed out after $limit s (budget ${budget[$name]} s, x$scale)"
  elif ((rc != 0)); then
    verdict="FAIL: rc=$rc"
  elif [[ $mode == dry ]] && ((took > budget[$name])); then
    verdict="PASS (over its GPU budget on this CPU: reported, not failed)"
  fi
  if [[ $verdict == FAIL* ]]; then
    local why
    why=$(grep -h '^FAIL: ' "$tmp/$name.err" | sed 's/^FAIL: //' | paste -sd ';' -)
    reasons+=("$name: ${verdict#FAIL: }${why:+ ($why)}")
  fi
  {
    printf '\n## %s — %s (%s s of %s s)\n\n```\n' "$name" "$verdict" "$took" "${budget[$name]}"
    extract "$name"
    [[ $verdict == FAIL* ]] && { echo "--- the end of its stderr:"; tail -n 15 "$tmp/$name.err"; }
    echo '```'
  } >>"$out/results.md"
  return $rc
}

finish() {
  if ((${#reasons[@]})); then
    { printf '\n## summary — FAIL\n\n'; printf -- '- %s\n' "${reasons[@]}"; } >>"$out/results.md"
  else
    printf '\n## summary — PASS: every step ran and passed\n' >>"$out/results.md"
  fi
  rm -rf "$tmp"
  echo "wrote $out/results.md"
}
trap 'reasons+=("interrupted by a signal"); exit 1' TERM INT
trap finish EXIT

# A rerun into the same OUTDIR (--steps after a step ran out of time) appends: nothing earlier is lost.
[[ -s $out/results.md ]] && printf '\n' >>"$out/results.md"
{
  echo "# llmcache GPU check — $(date -u +%Y-%m-%dT%H:%MZ) — $card"
  echo
  echo "mode: $mode; steps: $steps; data: $data"
  echo "budgets: $(for n in "${order[@]}"; do printf '%s %s s, ' "$n" "${budget[$n]}"; done)total: $total s" \
    "$([[ $mode == dry ]] && echo "(GPU budgets, reported only; hang guard x$scale)" || echo "(limits x$scale)")"
} >>"$out/results.md"

if [[ $mode == gpu && -z $cc ]]; then
  reasons+=("torch sees no CUDA device here: run with --dry-run on a machine without a GPU")
  exit 1
fi
step env $PY -m bench.gpu_check env --data "$data" "${dry[@]}"
if want build && ! step build "${cmd_build[@]}"; then exit 1; fi
step ext $PY -m bench.gpu_check ext "${dry[@]}" || exit 1
# shellcheck disable=SC2086  # $tests is a word list: files and pytest options
want tests && step tests $PY -m bench.gpu_check tests --xml "$tmp/tests.xml" "${skips[@]}" -- $tests
want kernels && step kernels $PY -m bench.micro.kernels "${device[@]}" "${sizes[@]}" --out "$out"
# The host path on tiny-dims twins (#24): on the GPU, the table the CPU can only project.
want hostpath && step hostpath $PY -m bench.costs.hostpath "${device[@]}" "${host_rounds[@]}" --stages \
  --out "$out/hostpath-${device[1]}.json"
for model in bert-base gpt2; do
  want "e2e-$model" && step "e2e-$model" $PY -m bench.experiments.e2e --model $model "${device[@]}" --dtype bf16 \
    "${e2e_sizes[@]}" --data "$data" --out "$out"
done
((${#reasons[@]} == 0))
