"""The live dashboard (``zeta-dashboard``): Starlette + uvicorn over the run stores.

Needs the ``dashboard`` extra (``pip install zetaguard[dashboard]``); importing
:mod:`zetaguard` never imports it.
"""

from __future__ import annotations

from zetaguard.dashboard.app import Dashboard, create_app

__all__ = ["Dashboard", "create_app"]
