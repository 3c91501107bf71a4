"""The cpp_app tensor-directory format in Python (numpy only; the C++ side is tensorFiles.cpp):

    DIR/tensors.txt   one line per tensor: ``NAME DTYPE SHAPE`` (SHAPE ``2,1,16,16``; ``scalar`` for rank 0;
                      lines starting with ``#`` are comments)
    DIR/NAME.bin      the elements, raw little-endian, C order

Inputs for the app (make_inputs.py) and its outputs (compare.py) use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MANIFEST = "tensors.txt"
# numpy has no bfloat16: the app reads and writes it, these scripts do not.
DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64", "bool")


class TensorDirError(ValueError):
    """A malformed or incomplete tensor directory; the message names the file and the fix."""


def write_tensors(directory: str | Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write ``tensors`` (name -> array) as NAME.bin files plus tensors.txt, in the given order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["# NAME DTYPE SHAPE; data in NAME.bin (raw little-endian, C order)"]
    for name, array in tensors.items():
        array = np.asarray(array)
        if array.dtype.name not in DTYPES:
            raise TensorDirError(f"tensor {name!r} has dtype {array.dtype.name}; the format holds {', '.join(DTYPES)}")
        if not name or "/" in name or "\\" in name or any(c.isspace() for c in name) or name in (".", ".."):
            raise TensorDirError(f"tensor name {name!r} cannot be a file name in {directory}")
        np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tofile(directory / f"{name}.bin")
        shape = ",".join(str(extent) for extent in array.shape) or "scalar"
        lines.append(f"{name} {array.dtype.name} {shape}")
    # The manifest last: a reader never sees it listing a file that is not written yet.
    (directory / MANIFEST).write_text("\n".join(lines) + "\n")
    return directory


def read_tensors(directory: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a directory written by :func:`write_tensors` or by the app, in manifest order."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise TensorDirError(f"no {MANIFEST} in {directory}: not a cpp_app tensor directory")
    tensors: dict[str, np.ndarray] = {}
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{manifest}:{number}"
        if len(fields) != 3:
            raise TensorDirError(f"{where}: expected 'NAME DTYPE SHAPE', got {line!r}")
        name, dtype, shape_text = fields
        if dtype not in DTYPES:
            raise TensorDirError(f"{where}: dtype {dtype!r} is not readable here (known: {', '.join(DTYPES)})")
        try:
            shape = () if shape_text == "scalar" else tuple(int(extent) for extent in shape_text.split(","))
        except ValueError:
            raise TensorDirError(f"{where}: shape {shape_text!r} is not like 2,4,64,64 or 'scalar'") from None
        data = directory / f"{name}.bin"
        if not data.is_file():
            raise TensorDirError(f"{where} lists {name!r}, but {data} is missing")
        array = np.fromfile(data, dtype=np.dtype(dtype).newbyteorder("<"))
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise TensorDirError(f"{data} holds {array.size} {dtype} values; shape {list(shape)} needs "
                                 f"{int(np.prod(shape, dtype=np.int64))}")
        tensors[name] = array.reshape(shape).astype(dtype)
    if not tensors:
        raise TensorDirError(f"{manifest} lists no tensor")
    return tensors
