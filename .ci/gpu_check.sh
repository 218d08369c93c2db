#!/usr/bin/env bash
# The device check of a machine with a CUDA GPU, in one command per kernel family:
#
#   .ci/gpu_check.sh cuda   [out-dir] [python]   # the C++ CUDA kernels (FASTXAI_CUDA=1)
#   .ci/gpu_check.sh triton [out-dir] [python]   # no C++ CUDA kernels: Triton is every op's
#                                                 # CUDA kernel (FASTXAI_CUDA=0)
#
# Each builds fastxai._C in place for the running torch, runs `python -m fastxai.selftest` (every
# op on every kernel of the CPU and of each GPU against the reference, then the benchmark table;
# `cuda` mode only, `triton` mode runs the checks) and the op tests, whose GPU cases run here,
# including torch.compile on CUDA tensors. Logs go to out-dir (default gpu-check/): the build,
# selftest-<mode>.txt (the table for benchmarks/README.md) and tests-<mode>.txt. Exit status 1 if
# anything failed. About 3-6 minutes per mode on 16 cores and an H100.
set -uo pipefail

mode="${1:?usage: .ci/gpu_check.sh cuda|triton [out-dir] [python]}"
out="${2:-gpu-check}"
python="${3:-python3}"
case "$mode" in
  cuda) build_cuda=1 ;;
  triton) build_cuda=0 ;;
  *) echo "gpu_check: mode must be cuda or triton, got '$mode'" >&2; exit 2 ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
mkdir -p "$out"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
start=$SECONDS
rm -f fastxai/_C*.so
if ! FASTXAI_CUDA=$build_cuda MAX_JOBS="${MAX_JOBS:-16}" "$python" setup.py build_ext --inplace \
  >"$out/build-$mode.log" 2>&1; then
  tail -n 40 "$out/build-$mode.log"
  echo "gpu_check: the $mode build failed" >&2
  exit 1
fi
echo "gpu_check: built ($mode) in $((SECONDS - start)) s"
"$python" -c "import fastxai.ops as o; print(o.extension_status())" | tee "$out/status-$mode.txt"

status=0
selftest=(-m fastxai.selftest --seconds 30)
[[ "$mode" == triton ]] && selftest+=(--quick)
"$python" "${selftest[@]}" >"$out/selftest-$mode.txt" 2>&1 || status=1
grep -v '^PASS' "$out/selftest-$mode.txt" | tail -n 40
"$python" -m pytest -q -p no:cacheprovider tests/test_ops_*.py >"$out/tests-$mode.txt" 2>&1 || status=1
tail -n 5 "$out/tests-$mode.txt"
echo "gpu_check: $mode done in $((SECONDS - start)) s, status $status"
exit $status
