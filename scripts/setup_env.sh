#!/usr/bin/env bash
# Creates (or reuses) the virtual env at .venv with a Python >= 3.12 and installs megatron-tsp into it.
# Sourced by quickstart.sh and test.sh; afterwards $VENV_PY is the env's python.
# Python is looked up as: $PYTHON, then python3.13/python3.12/python3 on PATH, then pyenv's versions.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"

is_py312() { "$@" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
    local candidate version
    for candidate in ${PYTHON:-} python3.13 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && is_py312 "$candidate"; then
            command -v "$candidate"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        # Newest installed 3.12+ (pyenv shims only run the globally selected version without PYENV_VERSION).
        for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)*$' | sort -t. -k1,1n -k2,2n -k3,3n -r); do
            candidate="$(PYENV_VERSION="$version" pyenv which python 2>/dev/null || true)"
            if [ -n "$candidate" ] && is_py312 "$candidate"; then
                echo "$candidate"; return 0
            fi
        done
    fi
    return 1
}

if [ ! -x "$VENV/bin/python" ] || ! is_py312 "$VENV/bin/python"; then
    BASE_PY="$(find_python)" || { echo "error: megatron-tsp needs Python >= 3.12 (megatron-core 0.19 does);" \
        "install one, put it on PATH or set PYTHON=/path/to/python3.12" >&2; exit 1; }
    echo "> creating $VENV with $BASE_PY ($("$BASE_PY" --version 2>&1))"
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
fi
VENV_PY="$VENV/bin/python"

# Reinstall only when the package metadata changed (the install is editable: code edits need nothing).
STAMP="$VENV/.megatron_tsp_installed"
WANT="$(cat "$REPO_ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    # torch with its CUDA libraries is about 5 GB installed, plus pip's unpacking: say so before pip fails
    # halfway with "No space left on device".
    for dir in "$VENV" "${TMPDIR:-/tmp}"; do
        free_gib="$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print int($4 / 1048576) }')"
        if [ -n "$free_gib" ] && [ "$free_gib" -lt 8 ]; then
            echo "error: installing megatron-tsp's dependencies needs about 8 GB free; $dir has ${free_gib} GB" \
                "(free some space, or point TMPDIR at a larger disk)" >&2
            exit 1
        fi
    done
    echo "> installing megatron-tsp and its dependencies into $VENV (first time: torch is a few GB)"
    "$VENV_PY" -m pip install --quiet --upgrade pip
    "$VENV_PY" -m pip install --quiet -e "$REPO_ROOT[test]"
    echo "$WANT" > "$STAMP"
fi
export VENV_PY
