"""Run every benchmark in turn (each prints its own table of ratios)."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
for script in ("size.py", "qat_cost.py", "quality.py"):
    sys.argv = [script]
    runpy.run_path(str(HERE / script), run_name="__main__")
