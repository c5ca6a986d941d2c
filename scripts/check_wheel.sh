#!/usr/bin/env bash
# Build a fastinfer wheel from this checkout, install it with numpy (and no torch) into a
# fresh virtual environment, and run scripts/smoke_test.py there from outside the source tree.
#
#   scripts/check_wheel.sh                 # FASTINFER_CUDA=auto: CUDA part built when nvcc is found
#   FASTINFER_CUDA=off scripts/check_wheel.sh
#   KEEP=1 scripts/check_wheel.sh          # keep the temp dir (wheel, venv) for inspection
#
# The build uses the current interpreter's scikit-build-core and pybind11 (no build
# isolation) and its own temporary build directory, so it never touches build/ in the
# checkout. Exit status is non-zero when any step fails.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastinfer-wheel.XXXXXX")"
if [[ "${KEEP:-0}" == 1 ]]; then
  echo "keeping $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi

step() { printf '\n== %s\n' "$*"; }

step "build the wheel (FASTINFER_CUDA=${FASTINFER_CUDA:-auto})"
"$PYTHON" -m build --wheel --no-isolation --outdir "$WORK/dist" \
  --config-setting=build-dir="$WORK/build" "$REPO"
WHEEL="$(ls "$WORK"/dist/fastinfer-*.whl)"
echo "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
"$PYTHON" -m zipfile -l "$WHEEL"

step "fresh venv with the wheel and numpy, no torch"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check "$WHEEL" numpy
if "$VPY" -c "import torch" 2>/dev/null; then
  echo "error: torch is importable in the test venv; the check must run without it" >&2
  exit 1
fi

step "run the smoke test from outside the source tree"
mkdir -p "$WORK/run"
cp "$REPO/scripts/smoke_test.py" "$WORK/run/"
cd "$WORK/run"
"$VPY" - "$REPO" <<'EOF'
import sys, fastinfer
repo = sys.argv[1]
if fastinfer.__file__.startswith(repo):
    sys.exit(f"error: fastinfer was imported from the checkout ({fastinfer.__file__}), not from the wheel")
print("fastinfer imported from", fastinfer.__file__)
EOF
"$VPY" smoke_test.py

step "the extension links neither libtorch nor a shared CUDA runtime"
SO="$("$VPY" -c 'import fastinfer._C as c; print(c.__file__)')"
if command -v ldd >/dev/null; then
  ldd "$SO"
  if ldd "$SO" | grep -E 'libtorch|libc10|libcudart|libcuda\.so'; then
    echo "error: $SO must not depend on the libraries above" >&2
    exit 1
  fi
fi

step "check_wheel: OK ($(basename "$WHEEL"))"
