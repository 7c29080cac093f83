#!/usr/bin/env bash
# Create (or refresh) the virtual environment and install moekit into it, editable, with its test extra.
#   usage: scripts/setup-venv.sh PYTHON VENV
# torch is pinned through constraints.txt so no CUDA build is downloaded. A torch that is already
# installed is kept: in VENV, or in PYTHON's own site-packages (then the venv sees it through
# --system-site-packages and the pin follows its version).
set -euo pipefail
python=${1:-python3.11}
venv=${2:-.venv}
root=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v "$python" >/dev/null 2>&1; then
  echo "setup: '$python' was not found; moekit needs Python 3.11 or newer. Run: make PYTHON=/path/to/python3.11" >&2
  exit 2
fi
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "setup: '$python' is $("$python" --version 2>&1); moekit needs Python 3.11 or newer." >&2
  exit 2
}

torch_version() { "$1" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true; }

if [ ! -x "$venv/bin/python" ]; then
  base_torch=$(torch_version "$python")
  if [ -n "$base_torch" ]; then
    echo "setup: keeping the torch $base_torch already installed for $python"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
have_torch=$(torch_version "$venv/bin/python")
if [ -n "$have_torch" ]; then
  grep -v '^torch==' "$root/constraints.txt" >"$constraints"
  echo "torch==$have_torch" >>"$constraints"
else
  cp "$root/constraints.txt" "$constraints"
fi

"$venv/bin/python" -m pip install --quiet -c "$constraints" -e "$root[test]"
"$venv/bin/python" -c 'import moekit, torch; print(f"setup: moekit {moekit.__version__} with torch {torch.__version__} in '"$venv"'")'
