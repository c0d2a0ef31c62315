#!/usr/bin/env bash
# Sets up (scripts/setup.sh and the system packages the browser test needs), then runs every
# check: the C++ engine tests through ctest (no Python), ruff (lint and format), mypy, the
# pytest suite, and the native code under ASan+UBSan (scripts/sanitize.sh). Arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
export PATH="$PWD/.venv/bin:$PATH"
cmake --preset engine-tests -G Ninja >/dev/null
cmake --build build/engine-tests >/dev/null
ctest --preset engine-tests
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
bash scripts/sanitize.sh
