#!/usr/bin/env bash
# Builds the documentation site in strict mode (every warning is an error) in a scratch venv with
# the `docs` extra's packages. mkdocstrings reads the sources statically, so fastxai itself is not
# installed (that would build the extension again).
#
# Usage: .ci/docs.sh [site folder]   (default: a scratch folder, removed afterwards)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/fastxai-docs.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
site="${1:-$scratch/site}"

cd "$repo"
python3 -m venv "$scratch/venv"
python3 - >"$scratch/requirements.txt" <<'PY'
import tomllib

with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["docs"]))
PY
"$scratch/venv/bin/pip" install -q -r "$scratch/requirements.txt"
NO_MKDOCS_2_WARNING=1 "$scratch/venv/bin/mkdocs" build --strict --site-dir "$site"
echo "docs: built $site"
