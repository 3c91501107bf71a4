"""Builds one engine in a fresh process (a process keeps the C++ plugin library once loaded, see
lowbit_deploy/engines/plugin_library.py): ``python build_worker.py cpp|python MODEL.onnx OUT.engine [SHAPES_JSON]``
prints one JSON line ``{"ok": true, "report": {...}}`` or ``{"ok": false, "error": "..."}``. SHAPES_JSON maps an
input with dynamic dimensions to its [min, opt, max] shapes."""

from __future__ import annotations

import json
import sys

from lowbit_deploy.engines.engine import build_engine
from lowbit_deploy.errors import UserError

if __name__ == "__main__":
    kind, onnx_path, engine_path = sys.argv[1:4]
    input_shapes = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    try:
        report = build_engine(onnx_path, engine_path, compute_capabilities=((8, 9),), backend="tensorrt_rtx",
                              plugin=kind, input_shapes=input_shapes)
        print(json.dumps({"ok": True, "report": report.to_dict()}))
    except UserError as error:
        print(json.dumps({"ok": False, "error": str(error)}))
