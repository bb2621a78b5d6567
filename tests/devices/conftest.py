"""The device tests: `simulated_device` (a CUDA stand-in the CPU suite runs everything on) is importable."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
