#!/usr/bin/env bash
# The project's test command: lint, type-check, then unit + integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=.venv/bin
[ -x "$PYBIN/python" ] || PYBIN=$(dirname "$(command -v python)")
"$PYBIN/ruff" check src tests bench
"$PYBIN/mypy"
"$PYBIN/python" -m pytest tests "$@"
