#!/usr/bin/env bash
# CI for the Python package (crates/nnscope-py): a virtual environment, the wheel built and installed
# exactly as the README says (`pip install ./crates/nnscope-py`), then its pytest suite. Needs only a
# Rust toolchain and python3 (>= 3.9). Exits with pytest's status.
#
# The wheel is built by cargo in the same target folder as the workspace (CARGO_TARGET_DIR, default
# ./target), so candle and the other dependencies compiled by `cargo test --release --workspace` are
# reused instead of built a second time.
#   PY_VENV=DIR   where the environment lives (default: $TARGET/python-ci-venv; reused if present)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
command -v cargo >/dev/null || { echo "cargo is required" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV="${PY_VENV:-$CARGO_TARGET_DIR/python-ci-venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

if [[ ! -x "$VENV/bin/python" ]]; then
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        # Debian and Ubuntu ship venv's pip bootstrap separately.
        rm -rf "$VENV"
        if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
            ver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            apt-get install -y "python$ver-venv" || apt-get install -y python3-venv
            python3 -m venv "$VENV"
        else
            echo "python3 -m venv failed; install python3-venv (Debian/Ubuntu) and retry" >&2
            exit 1
        fi
    fi
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q maturin numpy pytest safetensors
# --force-reinstall: a reused environment gets this checkout's build, not an older one.
"$PY" -m pip install -q --force-reinstall --no-deps ./crates/nnscope-py
echo "python: wheel built and installed in $(( $(date +%s) - start ))s"

status=0
"$PY" -m pytest -q -rs crates/nnscope-py/tests || status=$?
# The README's walk-through must run top to bottom.
"$PY" examples/python/attention.py >/dev/null || { echo "examples/python/attention.py failed" >&2; status=1; }
echo "python: done in $(( $(date +%s) - start ))s (pytest exit status $status)"
exit "$status"
