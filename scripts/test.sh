#!/usr/bin/env bash
# Sets up .venv like quickstart.sh, then runs the whole test suite (multi-process gloo cases included).
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$REPO_ROOT"
exec "$VENV_PY" -m pytest -q -rs --durations=15 "$@"
