"""Malformed UnpackDequantize plugin fields, driven through a TensorRT registry's creator in a worker process.

    python plugin_fuzz_cases.py cpp|python

registers the C++ library or the Python plugin, calls ``creator.create_plugin(name, PluginFieldCollection,
TensorRTPhase.BUILD)`` for every case of :data:`CASES` and prints one JSON line per case (flushed before the next,
so a crash names its case): ``{"case", "verdict": "accepted"|"refused", "message"}``. The C++ creator refuses by
returning None and logging through TensorRT's logger; the Python creator by raising UserError.
"""

from __future__ import annotations

import json
import sys

import numpy as np

I32, I64, F32, CHAR = "INT32", "INT64", "FLOAT32", "CHAR"
V1 = {"levels": (I32, [3]), "qmin": (I32, [-1]), "word_bits": (I32, [8]), "codes_per_word": (I32, [5]),
      "shape": (I64, [4, 2, 3, 3])}
V2 = {"levels": (I32, [3]), "qmin": (I32, [-1]), "group_size": (I32, [29]), "group_bits": (I32, [46]),
      "shape": (I64, [4, 2, 3, 3])}
DROP = object()


def _case(version: str, base: dict, **changes) -> tuple[str, list[tuple[str, str, object]]]:
    fields = [(name, *value) for name, value in base.items() if changes.get(name, None) is not DROP]
    fields = [(name, *changes[name]) if name in changes else (name, kind, data) for name, kind, data in fields]
    fields += [(name, *value) for name, value in changes.items() if name not in base and value is not DROP]
    return version, fields


# name -> (creator version, [(field name, type, values)]); every case but the "valid:" ones must be refused.
CASES: dict[str, tuple[str, list]] = {
    "v1 missing levels": _case("1", V1, levels=DROP),
    "v1 missing shape": _case("1", V1, shape=DROP),
    "v1 no fields at all": ("1", []),
    "v1 levels 0": _case("1", V1, levels=(I32, [0])),
    "v1 levels 1": _case("1", V1, levels=(I32, [1])),
    "v1 levels 70000": _case("1", V1, levels=(I32, [70000])),
    "v1 levels -5": _case("1", V1, levels=(I32, [-5])),
    "v1 levels as NUL-less CHAR '3'": _case("1", V1, levels=(CHAR, b"3")),
    "v1 levels as FLOAT32": _case("1", V1, levels=(F32, [3.0])),
    "v1 levels with two values": _case("1", V1, levels=(I32, [3, 4])),
    "v1 levels with no values": _case("1", V1, levels=(I32, [])),
    "v1 levels INT64 beyond int32": _case("1", V1, levels=(I64, [2**40 + 3])),
    "v1 qmin overflows with levels": _case("1", V1, qmin=(I32, [2**31 - 2])),
    "v1 word_bits 16": _case("1", V1, word_bits=(I32, [16])),
    "v1 word_bits 0": _case("1", V1, word_bits=(I32, [0])),
    "v1 codes_per_word 4 (ternary bytes hold 5)": _case("1", V1, codes_per_word=(I32, [4])),
    "v1 codes_per_word 6": _case("1", V1, codes_per_word=(I32, [6])),
    "v1 codes_per_word 0": _case("1", V1, codes_per_word=(I32, [0])),
    "v1 257 levels in bytes": _case("1", V1, levels=(I32, [257]), codes_per_word=(I32, [1])),
    "v1 empty shape": _case("1", V1, shape=(I64, [])),
    "v1 zero extent": _case("1", V1, shape=(I64, [4, 0])),
    "v1 negative extent": _case("1", V1, shape=(I64, [4, -3])),
    "v1 nine dimensions": _case("1", V1, shape=(I64, [1] * 9)),
    "v1 huge shape": _case("1", V1, shape=(I64, [2**31 - 1] * 3)),
    "v1 huge INT64 extent": _case("1", V1, shape=(I64, [2**62, 4])),
    "v1 shape as FLOAT32": _case("1", V1, shape=(F32, [4.0, 2.0])),
    "v1 shape as NUL-less CHAR": _case("1", V1, shape=(CHAR, b"4,2")),
    "v1 unknown field": _case("1", V1, bits=(I32, [2])),
    "v1 levels given twice": ("1", [*_case("1", V1)[1], ("levels", I32, [3])]),
    "v1 v2 fields": ("1", _case("2", V2)[1]),
    "v1 bad levels next to NUL-less plugin_version": _case("1", V1, levels=(I32, [1]), plugin_version=(CHAR, b"1")),
    "v2 group_bits 45 (ternary groups need 46)": _case("2", V2, group_bits=(I32, [45])),
    "v2 group_size 28": _case("2", V2, group_size=(I32, [28])),
    "v2 group_bits 0": _case("2", V2, group_bits=(I32, [0])),
    "v2 group_bits 57": _case("2", V2, group_bits=(I32, [57])),
    "v2 levels 5 with the ternary group": _case("2", V2, levels=(I32, [5])),
    "v2 levels 70000": _case("2", V2, levels=(I32, [70000])),
    "v2 levels 1": _case("2", V2, levels=(I32, [1])),
    "v2 group_size INT64 beyond int32": _case("2", V2, group_size=(I64, [2**33 + 29])),
    "v2 negative extent": _case("2", V2, shape=(I32, [-4, 2])),
    "v2 missing group_bits": _case("2", V2, group_bits=DROP),
    "v2 v1 fields": ("2", _case("1", V1)[1]),
    "v2 group_bits as NUL-less CHAR": _case("2", V2, group_bits=(CHAR, b"46")),
    # Controls: INT32 and INT64 both accepted; the parser's node attributes are ignored even when unterminated.
    "valid: v1 INT32 scalars, INT64 shape": _case("1", V1),
    "valid: v1 all INT64": _case("1", {k: (I64, v) for k, (_, v) in V1.items()}),
    "valid: v1 INT32 shape and NUL-less plugin_namespace": _case("1", V1, shape=(I32, [4, 18]),
                                                                  plugin_namespace=(CHAR, b"lowbit")),
    "valid: v2 INT32 shape": _case("2", V2, shape=(I32, [4, 2, 3, 3])),
    "valid: v2 65536 levels": _case("2", V2, levels=(I64, [65536]), group_size=(I32, [1]), group_bits=(I64, [16])),
}

_DTYPES = {I32: np.int32, I64: np.int64, F32: np.float32}


def _collection(trt, fields: list) -> tuple[object, list]:
    arrays = [np.frombuffer(data, np.int8).copy() if kind == CHAR else np.array(data, dtype=_DTYPES[kind])
              for _, kind, data in fields]
    plugin_fields = [trt.PluginField(name, array, getattr(trt.PluginFieldType, kind))
                     for (name, kind, _), array in zip(fields, arrays)]
    return trt.PluginFieldCollection(plugin_fields), arrays  # PluginField does not own its buffer


def run_cases(kind: str, op_name: str, cases: dict[str, tuple[str, list]]) -> None:
    """Drive every case through the ``kind`` registry creator of ``op_name`` (its version per case), one JSON line
    each (also used by activation_fuzz_cases.py)."""
    from lowbit_deploy.engines.plugin_library import use_plugins
    from lowbit_deploy.engines.tensorrt_import import tensorrt_backend
    from lowbit_deploy.errors import UserError

    backend = tensorrt_backend("tensorrt_rtx")
    trt = backend.module

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message) -> None:
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(message)

    logger = Logger()
    builder = trt.Builder(logger)  # the library's ILoggerFinder answers with this builder's logger
    use_plugins(backend, kind)
    registry = trt.get_plugin_registry()
    for name, (version, fields) in cases.items():
        creator = registry.get_creator(op_name, version, "lowbit")
        collection, keep_alive = _collection(trt, fields)
        errors_before = len(logger.errors)
        try:
            plugin = creator.create_plugin("fuzz", collection, trt.TensorRTPhase.BUILD)
            verdict = "accepted" if plugin is not None else "refused"
            message = logger.errors[-1] if len(logger.errors) > errors_before else ""
        except UserError as error:
            verdict, message = "refused", str(error)
        del keep_alive
        print(json.dumps({"case": name, "verdict": verdict, "message": message}), flush=True)
    del builder


if __name__ == "__main__":
    run_cases(sys.argv[1], "UnpackDequantize", CASES)
