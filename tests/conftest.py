from __future__ import annotations

import os

# Keep frameworks on the CPU and quiet, and never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
