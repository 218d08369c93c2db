#!/usr/bin/env bash
# The oldest supported torch, through the package a user installs: in a scratch copy of the
# repository, `python -m build` makes the sdist and, from it, the wheel (compiling fastxai._C
# against torch 2.9.1 / torchvision 0.24.1); the wheel is installed (not editable) into a venv
# that has only torch, and `fastxai demo` and a representative subset of the tests run against
# that installed package, from a folder without the sources.
#
# Usage: .ci/oldest_torch.sh
# The venv is kept in ~/.cache/fastxai/venv-torch-2.9.1 and reused while its torch is still 2.9.1
# (fastxai is uninstalled from it first, so each run installs the new wheel into a venv without
# fastxai); FASTXAI_OLDEST_VENV names an existing venv with torch 2.9.1 to use instead. Honours
# MAX_JOBS (default 2).
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
# left to the main run; vgg16's and densenet121's parity cases add nothing the other models
# don't check.
deselect="not triton and not vgg16 and not densenet121"

start=$SECONDS
if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  if [[ "$venv" != "$default_venv" ]]; then
    echo "oldest_torch: $venv has no torch $torch_version (FASTXAI_OLDEST_VENV)" >&2
    exit 1
  fi
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version" "torchvision==$torchvision_version"
fi
# What `python -m build --no-isolation` needs beside torch (pyproject's build-system.requires).
"$venv/bin/python" -c "import build, ninja, wheel" 2>/dev/null \
  || "$venv/bin/pip" install -q ninja "setuptools>=70.1" wheel build
if "$venv/bin/python" -c "import importlib.metadata as m; m.version('fastxai')" 2>/dev/null; then
  "$venv/bin/pip" uninstall -q -y fastxai
fi
echo "oldest_torch: venv with torch $torch_version ready in $((SECONDS - start)) s ($venv)"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/fastxai-oldest-torch.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/src" "$scratch/run"
tar -C "$repo" -cf - \
  --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./site --exclude=./dist \
  --exclude='*.so' --exclude='*.egg-info' --exclude=__pycache__ --exclude=./fastxai/_torch_build.py . \
  | tar -C "$scratch/src" -xf -

# torch 2.9's extension builder does not add ccache itself: its masquerading compilers do.
[[ -d /usr/lib/ccache ]] && export PATH="/usr/lib/ccache:$PATH"

start=$SECONDS
# --no-isolation: build against the venv's torch (an isolated build would fetch the newest one).
MAX_JOBS="${MAX_JOBS:-2}" "$venv/bin/python" -m build --no-isolation --outdir "$scratch/dist" \
  "$scratch/src" >"$scratch/build.log" 2>&1 || { tail -n 40 "$scratch/build.log"; exit 1; }
ls "$scratch/dist"
sdist=("$scratch"/dist/fastxai-*.tar.gz)
wheel=("$scratch"/dist/fastxai-*.whl)
echo "oldest_torch: sdist and wheel built in $((SECONDS - start)) s"
sdist_files="$(tar -tzf "${sdist[0]}")"
grep -q "/csrc/cpu/.*\.cpp$" <<<"$sdist_files" || { echo "oldest_torch: the sdist has no csrc/" >&2; exit 1; }

start=$SECONDS
"$venv/bin/pip" install -q "${wheel[0]}[dev,demo]"
echo "oldest_torch: wheel installed in $((SECONDS - start)) s"

# From a folder without the sources, so that the installed package is what runs.
cp -r "$repo/tests" "$scratch/run/tests"
cd "$scratch/run"
"$venv/bin/python" - <<'PY'
import sys

import torch

import fastxai
import fastxai.ops as ops

if "site-packages" not in fastxai.__file__ or not fastxai.has_extension():
    sys.exit(f"oldest_torch: expected the installed wheel with its extension, got {fastxai.__file__}")
print("oldest_torch: torch", torch.__version__, "-", fastxai.__file__, "-", ops.extension_status())
PY

start=$SECONDS
# The gradient methods and TFT on the four photos (Score-CAM and Activation Matching take minutes:
# README command 1 runs the whole demo).
"$venv/bin/fastxai" demo --out "$scratch/demo" --methods gradcam gradcampp layercam --no-am
compgen -G "$scratch/demo/*.png" >/dev/null || { echo "oldest_torch: the demo wrote no PNG" >&2; exit 1; }
echo "oldest_torch: demo from the wheel took $((SECONDS - start)) s"

start=$SECONDS
"$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$scratch/run" -k "$deselect" "${tests[@]}"
echo "oldest_torch: tests took $((SECONDS - start)) s"
