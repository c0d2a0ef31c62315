#!/usr/bin/env bash
# System packages the test suite needs beyond the virtualenv: Debian's Chromium, which the
# dashboard's end-to-end test drives through Playwright (executable_path). Idempotent: does
# nothing when chromium is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
