#!/usr/bin/env bash
# Builds fastxai._C with the CUDA kernels (FASTXAI_CUDA=1) in a scratch copy of the repository and
# imports it: proves the .cu files compile and link without a GPU. The checkout's own build is left
# alone.
#
# Usage: .ci/cuda_build_check.sh [python]   (default: .venv/bin/python of this repository)
# Honours CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0": the oldest
# architecture setup.py builds for, which refuses the newest instructions: one target instead of
# setup.py's three code objects) and MAX_JOBS (default 2).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
if [[ "$python" == */* && "$python" != /* ]]; then
  # A relative path: make it absolute without resolving the venv's symlink to the base python.
  python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/fastxai-cudabuild.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

# The sources only: no venv, no earlier build outputs.
tar -C "$repo" -cf - \
  --exclude=./.venv --exclude=./.git --exclude=./build --exclude='*.so' \
  --exclude='*.egg-info' --exclude=__pycache__ . | tar -C "$scratch" -xf -

cd "$scratch"
echo "cuda_build_check: building in $scratch with $python"
start=$SECONDS
FASTXAI_CUDA=1 \
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0}" \
  MAX_JOBS="${MAX_JOBS:-2}" \
  "$python" setup.py build_ext --inplace
echo "cuda_build_check: built in $((SECONDS - start)) s"

# Import from the scratch copy (the working directory comes first on sys.path) and check that the
# CUDA kernels registered, not only the CPU ones.
"$python" - <<'PY'
import fastxai._C as ext
import fastxai.ops
from fastxai.ops._extension import registered_kernel
from fastxai.ops._registrations import FAKES

# Every op: its CUDA kernel must be the C++ one, not the Triton kernel that stands in without it.
missing = [op for op in FAKES if registered_kernel(op, "cuda") != "cpp"]
if missing:
    raise SystemExit(f"cuda_build_check: no CUDA kernel registered for {missing} ({ext.__file__})")
print(f"cuda_build_check: OK, {ext.__file__} imports with CUDA kernels")
PY
