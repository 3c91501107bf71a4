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


def creator_verdicts(script: str, cases: dict) -> dict[str, dict[str, dict]]:
    """Run a fuzz worker (plugin_fuzz_cases.py, activation_fuzz_cases.py) with the C++ and with the Python creators,
    each in a fresh process, and check what every op's fuzz test requires: the process survives, every case is
    reported in order, the "valid:" controls are accepted and every other case is refused with a message. Returns
    the verdict lines by kind and case."""
    verdicts = {}
    for kind in ("cpp", "python"):
        result = subprocess.run([sys.executable, str(HERE / script), kind], capture_output=True, text=True,
                                timeout=300)
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        last = lines[-1]["case"] if lines else "before the first case"
        assert result.returncode == 0, f"{kind} creator process died after {last!r}: {result.stderr[-2000:]}"
        verdicts[kind] = {line["case"]: line for line in lines}
    malformed = [case for case in cases if not case.startswith("valid:")]
    for kind, by_case in verdicts.items():
        assert list(by_case) == list(cases), kind
        wrong = [c for c in cases if by_case[c]["verdict"] != ("accepted" if c.startswith("valid:") else "refused")]
        assert wrong == [], (kind, wrong)
        silent = [c for c in malformed if not by_case[c]["message"]]
        assert silent == [], (kind, "refused without an error message", silent)
    return verdicts
