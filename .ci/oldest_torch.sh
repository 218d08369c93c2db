#!/usr/bin/env bash
# The oldest supported torch: builds fastxai._C against torch 2.9.1 / torchvision 0.24.1 in a
# scratch copy of the repository (the checkout's own build is left alone) and runs a
# representative subset of the tests there.
#
# Usage: .ci/oldest_torch.sh
# The venv is kept in ~/.cache/fastxai/venv-torch-2.9.1 and reused while its torch is still 2.9.1;
# FASTXAI_OLDEST_VENV names an existing venv with torch 2.9.1 to use instead. Honours MAX_JOBS
# (default 2).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_version="2.9.1"
torchvision_version="0.24.1"
default_venv="${XDG_CACHE_HOME:-$HOME/.cache}/fastxai/venv-torch-$torch_version"
venv="${FASTXAI_OLDEST_VENV:-$default_venv}"
tests=(
  tests/test_api.py
  tests/test_ops_tft.py
  tests/test_thresholding.py
  tests/test_cam_parity.py
  tests/test_extension_loading.py
)
# Triton 3.5 (pinned by torch 2.9.1) cannot interpret kernels whose loops run to a kernel argument
# (TRITON_INTERPRET=1, how the tests run Triton on a CPU), so the Triton backends are
# left to the main run; vgg16's parity cases (80 s) add nothing the other models don't check.
deselect="not triton and not vgg16"

start=$SECONDS
if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  if [[ "$venv" != "$default_venv" ]]; then
    echo "oldest_torch: $venv has no torch $torch_version (FASTXAI_OLDEST_VENV)" >&2
    exit 1
  fi
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version" "torchvision==$torchvision_version" ninja \
    "setuptools>=70.1" wheel
fi
echo "oldest_torch: venv with torch $torch_version ready in $((SECONDS - start)) s ($venv)"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/fastxai-oldest-torch.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
tar -C "$repo" -cf - \
  --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./site --exclude='*.so' \
  --exclude='*.egg-info' --exclude=__pycache__ --exclude=./fastxai/_torch_build.py . \
  | tar -C "$scratch" -xf -

cd "$scratch"
start=$SECONDS
MAX_JOBS="${MAX_JOBS:-2}" "$venv/bin/pip" install -q --no-build-isolation -e ".[dev]"
echo "oldest_torch: built in $((SECONDS - start)) s"
"$venv/bin/python" -c "import fastxai.ops as o, torch; print('oldest_torch: torch', torch.__version__, '-', o.extension_status())"
"$venv/bin/python" -c "import sys, fastxai; sys.exit(not fastxai.has_extension())"

start=$SECONDS
"$venv/bin/python" -m pytest -q -p no:cacheprovider -k "$deselect" "${tests[@]}"
echo "oldest_torch: tests took $((SECONDS - start)) s"
