#!/usr/bin/env bash
# One-command GPU check for a lent H100 (or H200), from the repository root or anywhere:
#   bash benchmarks/gpu_check.sh
# Runs, each capped at 300 s, bf16 autocast throughout:
#   1. benchmarks/train_throughput.py --model: DiT-B/2 at batch 256 and DiT-XL/2 at batch 32, fusion
#      none,merged,separate (three XL variants' weights + EMA + AdamW state hold ~30 GB and separate
#      doubles the tokens, so batch 64 would not fit in 80 GB with all three), plus XL/2 at batch 64 for
#      none,merged only;
#   2. benchmarks/model_step.py (loss + backward only, no AdamW/EMA) for DiT-B/2 at batch 256;
#   3. pytest -q tests/test_models.py on the machine with CUDA visible.
# Output: everything goes to $OUT (default ./gpu_check_out): gpu_check.log and one JSON per benchmark.
# Exit status 1 when a part failed (an out-of-memory variant is reported and dropped, and counts).
#
# Expects python >= 3.10 with a CUDA build of torch >= 2.4 and the repo's dependencies; on a fresh machine:
#   pip install torch              # the default Linux wheel on PyPI is the CUDA build
#   pip install -e ".[test]"       # redi + h5py, numpy, timm, diffusers, jsonschema, pyyaml, tqdm, pytest, ...
# (machines without network: the same names with pip install --no-index --find-links <wheelhouse>)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # redi importable without the editable install
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export HF_HUB_OFFLINE=1

checks() {
  local failed=0 tt=benchmarks/train_throughput.py
  run() { echo; echo "+ $*"; timeout 300 "$@" || { echo "FAILED (exit $?): $*"; failed=1; }; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c "
import importlib.util, sys
missing = [m for m in ('torch', 'h5py', 'numpy', 'timm', 'diffusers', 'jsonschema', 'yaml', 'tqdm', 'pytest')
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit('missing modules: ' + ' '.join(missing) + ' (see the pip installs at the top of this script)')
import torch, redi.train
assert torch.cuda.is_available(), 'torch sees no CUDA device'
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))
" || return 1
  run python $tt --model --size B --patch 2 --batch 256 --fusion none,merged,separate --dtype bf16 \
    --json "$out/train_B2_b256.json"
  run python $tt --model --size XL --patch 2 --batch 32 --fusion none,merged,separate --dtype bf16 \
    --json "$out/train_XL2_b32.json"
  run python $tt --model --size XL --patch 2 --batch 64 --fusion none,merged --dtype bf16 \
    --json "$out/train_XL2_b64.json"
  run python benchmarks/model_step.py --device cuda --size B --patch 2 --batch 256 --dtype bf16 \
    --warmup 2 --steps 10 --json "$out/model_step_B2_b256.json"
  run python -m pytest -q tests/test_models.py
  echo; [ "$failed" = 0 ] && echo "gpu_check: all parts ran" || echo "gpu_check: SOME PARTS FAILED"
  return "$failed"
}

checks 2>&1 | tee "$out/gpu_check.log"
