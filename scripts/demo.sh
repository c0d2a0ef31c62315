#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the demonstration: a digits MLP driven into a
# learning-rate blow-up without and with the guard, written to ./zetaguard_runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m zetaguard.demo "$@"
