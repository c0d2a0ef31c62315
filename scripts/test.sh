#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs every check: the C++ engine tests through ctest (no
# Python), ruff, mypy, and the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
cmake --preset engine-tests -G Ninja >/dev/null
cmake --build build/engine-tests >/dev/null
ctest --preset engine-tests
ruff check .
mypy
python -m pytest "$@"
