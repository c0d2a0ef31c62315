"""Command-line tools: ``zeta-dashboard``, ``zeta-monitor`` and ``zeta-test``."""

from __future__ import annotations

import sys
from typing import NoReturn


class CliError(SystemExit):
    """A user-facing failure: the message goes to stderr and the process exits non-zero."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code`` (2: bad input)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise CliError(code)
