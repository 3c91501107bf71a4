"""``python plugin_probe.py MODULE LIBRARY``: load LIBRARY into the plugin registry of MODULE (``tensorrt`` or
``tensorrt_rtx``) and print the creators it added, as one line ``lowbit-plugin-probe: {json}`` with
``{"loaded": bool, "creators": [[name, version, namespace, [field names]], ...]}``.

engines/plugin_library.py runs this in a child process: a registry cannot unload a library safely (TensorRT-RTX 1.7
leaves dangling creators), so checking a library in the caller's own process would pin it there, and a library that
crashes on load takes only the child down. It imports nothing from lowbit_deploy, so it checks whichever library
copy it is given against whichever package asked. TensorRT's registry loads plugin libraries without a GPU.
"""

from __future__ import annotations

import importlib
import json
import sys

MARKER = "lowbit-plugin-probe: "


def _field_names(creator: object) -> list[str]:
    fields = getattr(creator, "field_names", None)
    return [field.name for field in fields] if fields is not None else []


def probe(module_name: str, library: str) -> dict:
    trt = importlib.import_module(module_name)
    registry = trt.get_plugin_registry()
    before = {(c.name, c.plugin_version, c.plugin_namespace) for c in registry.all_creators}
    handle = registry.load_library(library)
    added = [[c.name, c.plugin_version, c.plugin_namespace, _field_names(c)] for c in registry.all_creators
             if (c.name, c.plugin_version, c.plugin_namespace) not in before]
    return {"loaded": handle is not None, "creators": added}


if __name__ == "__main__":
    print(MARKER + json.dumps(probe(sys.argv[1], sys.argv[2])), flush=True)
