#!/usr/bin/env bash
# Sets up everything from a fresh clone: a virtualenv in .venv with every dependency (torch
# pinned in the same pip command, so pip never pulls a CUDA build) and zetaguard built from
# source in editable mode. Idempotent: reruns only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.setup-stamp
want=$(cat requirements/dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q -r requirements/dev.txt 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, numpy" # fail loudly if the install above did not work
  echo "$want" > "$stamp"
fi
# The extension: rebuilt by pip whenever the C++ sources or build files change.
# Also when a Python module is added or removed: the editable install maps files by name.
src=$( (cat CMakeLists.txt $(find cpp bindings -type f | sort); find python -name '*.py' | sort) \
  | sha256sum | cut -d' ' -f1)
if [ ! -f .venv/.build-stamp ] || [ "$(cat .venv/.build-stamp)" != "$src" ] || \
   ! .venv/bin/python -c "import zetaguard._core" 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-build-isolation -e . 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import zetaguard._core"
  echo "$src" > .venv/.build-stamp
fi
