from __future__ import annotations

import os
import sys

# Tests import helpers such as tests/reference.py by module name.
sys.path.insert(0, os.path.dirname(__file__))
# Keep frameworks on the CPU and quiet, and never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
