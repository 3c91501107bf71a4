"""Engine builds in a fresh interpreter: a process that loaded the C++ plugin library keeps it (TensorRT-RTX cannot
unload it safely), so tests that build with it never do so in the pytest process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def build_in_fresh_process(kind: str, onnx_path: Path, engine_path: Path, input_shapes: dict | None = None) -> dict:
    """build_engine(..., plugin=kind, input_shapes=...) in a new interpreter (a process that loaded the C++ library
    keeps it): the worker's JSON result plus its TensorRT log under "log"."""
    shapes = [json.dumps(input_shapes)] if input_shapes else []
    result = subprocess.run([sys.executable, str(HERE / "build_worker.py"), kind, str(onnx_path), str(engine_path),
                             *shapes], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the {kind} build process died ({result.returncode}): {result.stderr[-3000:]}"
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "log": result.stdout + result.stderr}
