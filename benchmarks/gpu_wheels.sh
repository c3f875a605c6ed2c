#!/usr/bin/env bash
# Fill .whl/ (ignored) with the wheels the GPU check needs that the lent H200 image lacks (it reaches no
# package registry): Python 3.12, x86-64 manylinux. Run here, from anywhere, before a device call that
# carries .whl:   bash benchmarks/gpu_wheels.sh
# The device's own package list is benchmarks/device_packages.txt; gpu_check.sh --preflight checks every
# import of the check against it plus these wheels. Keep one version per name (two stop the install).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(
  jsonschema==4.26.0                 # redi.config validates every config (redi train, the benchmarks)
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==0.30.0                    # referencing's compiled part
  torch-fidelity==0.4.0              # the Inception network of the evaluate stage (benchmarks/inception.py)
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
ls -la .whl
du -sh .whl
