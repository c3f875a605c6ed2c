#!/usr/bin/env bash
# The one-command GPU check, sized for one 15-minute lease of one H100/H200 (all parts <= --budget s,
# default 480), from the repository root:
#   bash benchmarks/gpu_check.sh             # on the GPU machine (carry .whl: benchmarks/gpu_wheels.sh)
#   bash benchmarks/gpu_check.sh --cpu       # the same parts at toy size on CPU: a dry run (budget 1200 s)
#   bash benchmarks/gpu_check.sh --preflight # only the static import check against the device's packages
# Parts, in this order, each under `timeout` min(its cap, time left to the shared deadline); a part is
# skipped with a printed reason once less than 20 s are left, and every part writes what it measured:
#   preflight  static imports (benchmarks/gpu_preflight.py) + the real imports, nvidia-smi
#   a1/a2      benchmarks/train_throughput.py --model: DiT-B/2 and DiT-XL/2, $FUSIONS, bf16, eager
#   a3         the same, torch.compile, DiT-$COMPILE_SIZE/2 for $COMPILE_FUSIONS only (compile time)
#   b          benchmarks/gpu_train.py: 200 steps of `python -m redi.cli train` on synthetic data,
#              loss finite and falling, checkpoint at 100 + resume to 200
#   e          pytest -m gpu tests/test_gpu.py
#   c          benchmarks/sampling.py: SDE 250 steps, no guidance / CFG / CFG + RG
#   d          benchmarks/inception.py, random weights of the ADM Inception's architecture (the real
#              TF-Inception file is ~95 MB, too big to carry)
# Output in $OUT (default ./gpu_check_out), at most 8 files: gpu_check.log, parts.tsv (part, exit status,
# seconds) and one JSON per benchmark part. Exit status 1 when a part failed or was skipped.
# Knobs (environment): FUSIONS (default none,concat,merged,separate),
# B_BATCH (256), XL_BATCH (96), COMPILE_SIZE (XL), COMPILE_FUSIONS (none,merged), SAMPLE_PRESET (xl2),
# SAMPLE_BATCH (64), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu budget=
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) mode=cpu ;;
    --preflight) mode=preflight ;;
    --budget) budget=$2; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--cpu | --preflight] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
py=${PYTHON:-python3}
[ -n "$budget" ] || { [ "$mode" = cpu ] && budget=1200 || budget=480; }  # the dry run checks code, not time
if [ "$mode" = preflight ]; then exec "$py" benchmarks/gpu_preflight.py; fi

out="${OUT:-gpu_check_out}"
mkdir -p "$out"
start=$(date +%s)
deadline=$((start + budget))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FUSIONS=${FUSIONS:-none,concat,merged,separate}
COMPILE_FUSIONS=${COMPILE_FUSIONS:-none,merged}
if [ "$mode" = gpu ]; then
  B_SIZE=B XL_SIZE=XL COMPILE_SIZE=${COMPILE_SIZE:-XL}
  common=(--device cuda --dtype bf16 --input-size 32)
  b_args=(--batch "${B_BATCH:-256}" --warmup 2 --steps 10)
  xl_args=(--batch "${XL_BATCH:-96}" --warmup 2 --steps 10)
  train_args=(--device cuda --size B --input-size 32 --batch 64 --samples 4096)
  sample_args=(--preset "${SAMPLE_PRESET:-xl2}" --batch "${SAMPLE_BATCH:-64}")
  inception_args=(--device cuda --images 2000 --batch 250 --sizes 256)
  compile_args=()
  caps=(60 100 200 60 60 70 45)  # a1 a2 a3 b e c d
else  # toy sizes, same code paths, one CPU thread each
  B_SIZE=S XL_SIZE=S COMPILE_SIZE=S
  common=(--device cpu --dtype fp32 --input-size 8 --threads 1)
  b_args=(--batch 2 --warmup 1 --steps 1)
  xl_args=(--batch 2 --warmup 1 --steps 1)
  train_args=(--device cpu --size S --depth 2 --hidden-size 64 --heads 2 --input-size 8 --batch 16 --samples 256)
  export OMP_NUM_THREADS=1
  sample_args=(--preset demo --batch 2 --steps-scale 0.02 --threads 1)
  inception_args=(--device cpu --images 4 --batch 4 --sizes 32 --threads 1)
  compile_args=(--compile-backend aot_eager)  # traces as inductor would, without its minutes of codegen
  caps=(150 150 240 150 120 120 120)
fi

failed=0
printf 'part\texit\tseconds\n' > "$out/parts.tsv"
part() {  # part NAME CAP COMMAND...: run under timeout min(CAP, time to the deadline - 10 s)
  local name=$1 cap=$2 now left limit rc t0
  shift 2
  now=$(date +%s)
  left=$((deadline - now - 10))
  if [ "$left" -lt 20 ]; then
    echo; echo "=== $name: SKIPPED, ${left} s left of the ${budget} s budget"
    printf '%s\tskipped\t0\n' "$name" >> "$out/parts.tsv"
    failed=1
    return
  fi
  limit=$((cap < left ? cap : left))
  echo; echo "=== $name (cap ${limit} s, $((now - start)) s elapsed): $*"
  t0=$(date +%s)
  PART_DEADLINE=$((t0 + limit - 5)) timeout -k 5 "$limit" "$@"
  rc=$?
  [ "$rc" = 124 ] && echo "=== $name: TIMED OUT after ${limit} s"
  [ "$rc" = 0 ] || { echo "=== $name: FAILED (exit $rc)"; failed=1; }
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$out/parts.tsv"
}

checks() {
  echo "gpu_check: mode $mode, budget ${budget} s, out $out, $(date -u +%FT%TZ)"
  if [ "$mode" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    if compgen -G ".whl/*.whl" > /dev/null; then  # packages the device image lacks (gpu_wheels.sh)
      "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/redi-gpu-site .whl/*.whl || { echo "gpu_check: wheel install failed"; return 1; }
      export PYTHONPATH="$PYTHONPATH:/tmp/redi-gpu-site"
    else
      echo "gpu_check: no .whl/ wheels (run benchmarks/gpu_wheels.sh here and carry .whl)"
    fi
  fi
  "$py" benchmarks/gpu_preflight.py || echo "gpu_check: static preflight failed (the real imports decide)"
  "$py" -c "
import torch, redi.cli, redi.train, redi.sample, redi.metrics.evaluate, redi.metrics.features, torch_fidelity, h5py, jsonschema
print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')
assert '$mode' != 'gpu' or torch.cuda.is_available(), 'torch sees no CUDA device'
" || { echo "gpu_check: imports failed, nothing else can run"; return 1; }

  local tt=benchmarks/train_throughput.py
  part a1_throughput_B2 "${caps[0]}" "$py" $tt --model --size "$B_SIZE" --patch 2 --fusion "$FUSIONS" \
    "${common[@]}" "${b_args[@]}" --json "$out/throughput_B2.json"
  part a2_throughput_XL2 "${caps[1]}" "$py" $tt --model --size "$XL_SIZE" --patch 2 --fusion "$FUSIONS" \
    "${common[@]}" "${xl_args[@]}" --json "$out/throughput_XL2.json"
  part a3_throughput_compiled "${caps[2]}" "$py" $tt --model --size "$COMPILE_SIZE" --patch 2 --compile \
    "${compile_args[@]}" --fusion "$COMPILE_FUSIONS" "${common[@]}" "${xl_args[@]}" \
    --json "$out/throughput_compiled.json"
  part b_train_resume "${caps[3]}" "$py" benchmarks/gpu_train.py "${train_args[@]}" --json "$out/train.json"
  part e_pytest_gpu "${caps[4]}" "$py" -m pytest -v -rs -m gpu -p no:cacheprovider tests/test_gpu.py
  part c_sampling "${caps[5]}" "$py" benchmarks/sampling.py "${sample_args[@]}" --objectives interpolant \
    --samplers sde --json "$out/sampling.json"
  part d_inception "${caps[6]}" "$py" benchmarks/inception.py --weights random "${inception_args[@]}" \
    --json "$out/inception.json"

  echo; echo "gpu_check: $(($(date +%s) - start)) s of ${budget} s; parts (exit status, seconds):"
  column -t "$out/parts.tsv" 2>/dev/null || cat "$out/parts.tsv"
  [ "$failed" = 0 ] && echo "gpu_check: all parts ran" || echo "gpu_check: SOME PARTS FAILED OR WERE SKIPPED"
  return "$failed"
}

checks 2>&1 | tee "$out/gpu_check.log"
