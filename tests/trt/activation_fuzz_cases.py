"""Malformed QuantizeDequantizeActivation plugin fields, driven through a TensorRT registry's creator in a worker
process (as plugin_fuzz_cases.py does for UnpackDequantize):

    python activation_fuzz_cases.py cpp|python

prints one JSON line per case of :data:`CASES`: ``{"case", "verdict": "accepted"|"refused", "message"}``.
"""

from __future__ import annotations

import sys

from plugin_fuzz_cases import CHAR, DROP, F32, I32, I64, _case, run_cases

BASE = {"qmin": (I32, [-8]), "qmax": (I32, [7])}


def _activation(**changes) -> tuple[str, list]:
    return _case("1", BASE, **changes)


# name -> (creator version, [(field name, type, values)]); every case but the "valid:" ones must be refused.
CASES: dict[str, tuple[str, list]] = {
    "missing qmin": _activation(qmin=DROP),
    "missing qmax": _activation(qmax=DROP),
    "no fields at all": ("1", []),
    "qmin as FLOAT32": _activation(qmin=(F32, [-8.0])),
    "qmax as NUL-less CHAR '7'": _activation(qmax=(CHAR, b"7")),
    "qmin with two values": _activation(qmin=(I32, [-8, -7])),
    "qmax with no values": _activation(qmax=(I32, [])),
    "qmin INT64 beyond int32": _activation(qmin=(I64, [-2**40])),
    "qmax INT64 beyond int32": _activation(qmax=(I64, [2**31])),
    "qmin == qmax": _activation(qmin=(I32, [7])),
    "qmin > qmax": _activation(qmin=(I32, [100]), qmax=(I32, [-100])),
    "65537 levels": _activation(qmin=(I32, [0]), qmax=(I32, [65536])),
    "full int32 range": _activation(qmin=(I32, [-2**31]), qmax=(I32, [2**31 - 1])),
    "80001 levels as INT64": _activation(qmin=(I64, [-40000]), qmax=(I64, [40000])),
    "unknown field levels": _activation(levels=(I32, [16])),
    "qmin given twice": ("1", [*_activation()[1], ("qmin", I32, [-8])]),
    "UnpackDequantize fields": ("1", [("levels", I32, [3]), ("qmin", I32, [-1]), ("word_bits", I32, [8]),
                                      ("codes_per_word", I32, [5]), ("shape", I64, [4])]),
    "bad grid next to NUL-less plugin_version": _activation(qmin=(I32, [9]), plugin_version=(CHAR, b"1")),
    # Controls: INT32 and INT64 both accepted; the parser's node attributes are ignored even when unterminated.
    "valid: symmetric 4-bit INT32": _activation(),
    "valid: asymmetric 8-bit INT64": _activation(qmin=(I64, [0]), qmax=(I64, [255])),
    "valid: 65536 levels and NUL-less plugin_namespace": _activation(qmin=(I32, [-32768]), qmax=(I32, [32767]),
                                                                      plugin_namespace=(CHAR, b"lowbit")),
}

if __name__ == "__main__":
    run_cases(sys.argv[1], "QuantizeDequantizeActivation", CASES)
