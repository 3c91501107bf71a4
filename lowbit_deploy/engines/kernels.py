"""ctypes binding of ``plugins/build/liblowbit_kernels.so`` (built from plugins/ with nvcc).

The library carries the CUDA kernels of ``lowbit::UnpackDequantize`` versions 1 (word formats) and 2 (bit stream) and
of ``lowbit::QuantizeDequantizeActivation`` v1 and their host reference behind a C ABI, with cudart linked statically,
so it loads on machines without a GPU (the host path then runs; the device launcher reports a CUDA error).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from ..quant import packing
from .kernel_abi import KernelError, KernelLibrary, LowbitFormatConstants

__all__ = ["KernelError", "KernelLibrary", "LowbitFormatConstants", "ensure_kernel_library", "find_nvcc",
           "load_kernel_library", "quantize_dequantize_activation_cuda", "quantize_dequantize_activation_host",
           "unpack_dequantize_bitstream_cuda", "unpack_dequantize_bitstream_host", "unpack_dequantize_cuda",
           "unpack_dequantize_host"]

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
LIBRARY_NAME = "liblowbit_kernels.so"
_SOURCE_SUFFIXES = (".cu", ".h", ".cuh", ".cpp")
_WORD_DTYPES = {8: np.int8, 32: np.int32}


def find_nvcc() -> str | None:
    """nvcc from $NVCC, PATH, $CUDA_HOME/bin or /usr/local/cuda/bin."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    roots = (os.environ.get("CUDA_HOME"), "/usr/local/cuda")
    candidates += [str(Path(root) / "bin" / "nvcc") for root in roots if root]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _newest_source_mtime(plugins_dir: Path) -> float:
    sources = [p for p in plugins_dir.rglob("*")
               if p.suffix in _SOURCE_SUFFIXES and p.relative_to(plugins_dir).parts[0] != "build"]
    return max([p.stat().st_mtime for p in sources] + [(plugins_dir / "Makefile").stat().st_mtime])


def ensure_kernel_library(plugins_dir: Path = PLUGINS_DIR) -> Path:
    """Path of an up-to-date ``liblowbit_kernels.so``: runs ``make -C plugins`` when it is missing or older than a
    source and nvcc exists. A stale library is kept (with no nvcc to rebuild it); a missing one is a UserError."""
    library = plugins_dir / "build" / LIBRARY_NAME
    if not (plugins_dir / "Makefile").exists():
        # No source checkout: an installed package uses the copy its wheel carries (engines/native.py).
        from .native import installed_library

        installed = installed_library(LIBRARY_NAME)
        if installed is not None:
            return installed
        if library.exists():
            return library
        raise UserError(f"{library} not found and no {plugins_dir / 'Makefile'} to build it; reinstall lowbit-deploy "
                        "where nvcc and make exist (the wheel build compiles it into lowbit_deploy/_native/) or from "
                        "a source checkout that contains plugins/")
    if library.exists() and library.stat().st_mtime >= _newest_source_mtime(plugins_dir):
        return library
    nvcc = find_nvcc()
    if nvcc is None:
        if library.exists():
            return library
        raise UserError(f"{library} is missing and nvcc was not found; install the CUDA toolkit (nvcc >= 12) and run "
                        f"`make -C {plugins_dir}` (or set NVCC=/path/to/nvcc)")
    (plugins_dir / "build").mkdir(exist_ok=True)
    # Serialise concurrent builds (pytest-xdist, parallel CLI runs) on one lock file.
    with open(plugins_dir / "build" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shutil.which("make") is None:
            raise UserError(f"building {library} needs GNU make; install it (apt-get install make) and retry")
        result = subprocess.run(["make", "-C", str(plugins_dir), f"NVCC={nvcc}"], capture_output=True, text=True)
    if result.returncode != 0 or not library.exists():
        raise UserError(f"building {library} failed (make -C {plugins_dir}):\n{result.stdout[-3000:]}"
                        f"{result.stderr[-3000:]}")
    return library


@lru_cache(maxsize=None)
def load_kernel_library(path: Path | None = None) -> KernelLibrary:
    """The loaded library (built first if needed); cached per process."""
    return KernelLibrary(path or ensure_kernel_library())


def _check_arguments(packed_dtype: np.dtype, scale_dtype: np.dtype, levels: int, word_bits: int,
                     codes_per_word: int, shape: Sequence[int], num_words: int, num_scales: int) -> int:
    if word_bits not in _WORD_DTYPES:
        raise ValueError(f"word_bits must be 8 or 32, got {word_bits}")
    if packed_dtype != np.dtype(_WORD_DTYPES[word_bits]):
        raise ValueError(f"packed words must be {np.dtype(_WORD_DTYPES[word_bits]).name} for word_bits={word_bits}, "
                         f"got {packed_dtype}")
    if scale_dtype != np.float16:
        raise ValueError(f"scales must be float16, got {scale_dtype}")
    expected = packing.codes_per_word(levels, word_bits)
    if codes_per_word != expected:
        raise ValueError(f"codes_per_word={codes_per_word} but {levels} levels in {word_bits}-bit words give "
                         f"{expected}")
    if not shape or any(int(d) < 1 for d in shape):
        raise ValueError(f"shape must be non-empty with positive dimensions, got {tuple(shape)}")
    numel = int(np.prod(shape, dtype=np.int64))
    if num_words != -(-numel // codes_per_word):
        raise ValueError(f"{num_words} words cannot hold {numel} codes at {codes_per_word} per word")
    if num_scales != int(shape[0]):
        raise ValueError(f"expected {shape[0]} scales (one per output channel), got {num_scales}")
    return numel


_OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# kDECODE_MAX_BLOCKS of plugins/unpack_dequantize/unpackDequantizeDecode.h: the grid cap of the default launch.
DECODE_MAX_BLOCKS = 4096


def _out_fp16(out_dtype: Any) -> bool:
    """True for a float16 output, False for float32 (numpy or torch dtypes, or their names)."""
    try:  # numpy dtypes, types and names; torch dtypes by their name ("torch.float16")
        dtype = np.dtype(str(out_dtype).removeprefix("torch.") if "torch." in str(out_dtype) else out_dtype)
    except TypeError:
        dtype = None
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"the output dtype must be float32 or float16, got {out_dtype}")
    return dtype == np.float16


def _host_output(shape: Sequence[int], out_dtype: Any, max_blocks: int | None) -> tuple[np.ndarray, bool]:
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
    fp16 = _out_fp16(out_dtype)
    return np.empty(tuple(int(d) for d in shape), dtype=np.float16 if fp16 else np.float32), fp16


def _cuda_output(reference: Any, shape: Sequence[int], out_dtype: Any, out: Any | None) -> tuple[Any, bool]:
    """A new CUDA tensor on ``reference``'s device, or ``out`` checked (contiguous, dtype, element count, device)."""
    import torch  # lazy: only the torch wrappers need it

    fp16 = _out_fp16(out_dtype)
    dtype = torch.float16 if fp16 else torch.float32
    shape = tuple(int(d) for d in shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=reference.device), fp16
    if out.dtype != dtype or not out.is_contiguous() or out.numel() != int(np.prod(shape)) or \
            out.device != reference.device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {int(np.prod(shape))} elements on "
                         f"{reference.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out, fp16


def _cuda_inputs(packed: Any, scale_fp16: Any) -> tuple[Any, Any, np.dtype, np.dtype]:
    packed = packed.contiguous().reshape(-1)
    scale_fp16 = scale_fp16.contiguous().reshape(-1)
    if not (packed.is_cuda and scale_fp16.is_cuda):
        raise ValueError("packed and scale_fp16 must be CUDA tensors")
    return (packed, scale_fp16, np.dtype(str(packed.dtype).removeprefix("torch.")),
            np.dtype(str(scale_fp16.dtype).removeprefix("torch.")))


def unpack_dequantize_host(packed: np.ndarray, scale_fp16: np.ndarray, levels: int, qmin: int, word_bits: int,
                           codes_per_word: int, shape: Sequence[int], out_dtype: Any = np.float32,
                           max_blocks: int | None = None, wide_index: bool = False) -> np.ndarray:
    """Dense weight of ``shape`` decoded by the C++ host path (the same per-thread function as the CUDA kernel, over
    the same grid): float32, or float16 rounded to nearest even from the float32 value. ``max_blocks`` caps the grid
    and ``wide_index`` forces the 64-bit loop arithmetic of weights near 2^31 elements (tests: several loop
    iterations per thread, both index widths, on a small weight)."""
    packed = np.ascontiguousarray(packed).reshape(-1)
    scale_fp16 = np.ascontiguousarray(scale_fp16).reshape(-1)
    numel = _check_arguments(packed.dtype, scale_fp16.dtype, levels, word_bits, codes_per_word, shape, packed.size,
                             scale_fp16.size)
    out, fp16 = _host_output(shape, out_dtype, max_blocks)
    library = load_kernel_library()
    if max_blocks is None and not wide_index:
        library.unpack_dequantize_host(packed.ctypes.data, word_bits, scale_fp16.ctypes.data, out.ctypes.data, numel,
                                       int(shape[0]), levels, qmin, codes_per_word, out_fp16=fp16)
    else:
        library.unpack_dequantize_host_grid(packed.ctypes.data, word_bits, scale_fp16.ctypes.data, out.ctypes.data,
                                            fp16, numel, int(shape[0]), levels, qmin, codes_per_word,
                                            max_blocks or DECODE_MAX_BLOCKS, wide_index)
    return out


def unpack_dequantize_cuda(packed: Any, scale_fp16: Any, levels: int, qmin: int, word_bits: int,
                           codes_per_word: int, shape: Sequence[int], out_dtype: Any = "float32",
                           out: Any | None = None) -> Any:
    """Same on torch CUDA tensors, launched on torch's current stream: a new float32 (or float16) CUDA tensor, or
    the decode written into ``out`` (a preallocated contiguous tensor of that dtype: benchmarks, graph capture)."""
    import torch  # lazy: torch is only needed for this convenience wrapper

    packed, scale_fp16, packed_dtype, scale_dtype = _cuda_inputs(packed, scale_fp16)
    numel = _check_arguments(packed_dtype, scale_dtype, levels, word_bits, codes_per_word, shape, packed.numel(),
                             scale_fp16.numel())
    out, fp16 = _cuda_output(packed, shape, out_dtype, out)
    stream = torch.cuda.current_stream(packed.device).cuda_stream
    load_kernel_library().unpack_dequantize_launch(packed.data_ptr(), word_bits, scale_fp16.data_ptr(),
                                                   out.data_ptr(), numel, int(shape[0]), levels, qmin,
                                                   codes_per_word, stream, out_fp16=fp16)
    return out


def _check_bitstream_arguments(packed_dtype: np.dtype, scale_dtype: np.dtype, levels: int, group_size: int,
                               group_bits: int, shape: Sequence[int], num_bytes: int, num_scales: int) -> int:
    if packed_dtype != np.int8:
        raise ValueError(f"the packed bit stream must be int8, got {packed_dtype}")
    if scale_dtype != np.float16:
        raise ValueError(f"scales must be float16, got {scale_dtype}")
    expected = packing.bitstream_group(levels)
    if (group_size, group_bits) != expected:
        raise ValueError(f"group_size={group_size}, group_bits={group_bits} but {levels} levels use the bit-stream "
                         f"group (g, B) = {expected}")
    if not shape or any(int(d) < 1 for d in shape):
        raise ValueError(f"shape must be non-empty with positive dimensions, got {tuple(shape)}")
    numel = int(np.prod(shape, dtype=np.int64))
    layout = packing.PackedLayout(levels, packing.PackingFormat.BITSTREAM, numel)
    if num_bytes != layout.num_words:
        raise ValueError(f"a {numel}-code bit stream of {levels} levels is {layout.num_words} bytes, got {num_bytes}")
    if num_scales != int(shape[0]):
        raise ValueError(f"expected {shape[0]} scales (one per output channel), got {num_scales}")
    return numel


def unpack_dequantize_bitstream_host(packed: np.ndarray, scale_fp16: np.ndarray, levels: int, qmin: int,
                                     group_size: int, group_bits: int, shape: Sequence[int],
                                     out_dtype: Any = np.float32, max_blocks: int | None = None,
                                     wide_index: bool = False) -> np.ndarray:
    """Op v2: dense weight of ``shape`` decoded from the bit stream by the C++ host path (the same per-thread
    function as the CUDA kernel); float32 or float16, ``max_blocks`` and ``wide_index`` as in
    :func:`unpack_dequantize_host`."""
    packed = np.ascontiguousarray(packed).reshape(-1)
    scale_fp16 = np.ascontiguousarray(scale_fp16).reshape(-1)
    numel = _check_bitstream_arguments(packed.dtype, scale_fp16.dtype, levels, group_size, group_bits, shape,
                                       packed.size, scale_fp16.size)
    out, fp16 = _host_output(shape, out_dtype, max_blocks)
    library = load_kernel_library()
    if max_blocks is None and not wide_index:
        library.unpack_dequantize_bitstream_host(packed.ctypes.data, packed.size, scale_fp16.ctypes.data,
                                                 out.ctypes.data, numel, int(shape[0]), levels, qmin, group_size,
                                                 group_bits, out_fp16=fp16)
    else:
        library.unpack_dequantize_bitstream_host_grid(packed.ctypes.data, packed.size, scale_fp16.ctypes.data,
                                                      out.ctypes.data, fp16, numel, int(shape[0]), levels, qmin,
                                                      group_size, group_bits, max_blocks or DECODE_MAX_BLOCKS,
                                                      wide_index)
    return out


def unpack_dequantize_bitstream_cuda(packed: Any, scale_fp16: Any, levels: int, qmin: int, group_size: int,
                                     group_bits: int, shape: Sequence[int], out_dtype: Any = "float32",
                                     out: Any | None = None) -> Any:
    """Op v2 on torch CUDA tensors, launched on torch's current stream; ``out_dtype`` and ``out`` as in
    :func:`unpack_dequantize_cuda`."""
    import torch  # lazy: torch is only needed for this convenience wrapper

    packed, scale_fp16, packed_dtype, scale_dtype = _cuda_inputs(packed, scale_fp16)
    numel = _check_bitstream_arguments(packed_dtype, scale_dtype, levels, group_size, group_bits, shape,
                                       packed.numel(), scale_fp16.numel())
    out, fp16 = _cuda_output(packed, shape, out_dtype, out)
    stream = torch.cuda.current_stream(packed.device).cuda_stream
    load_kernel_library().unpack_dequantize_bitstream_launch(packed.data_ptr(), packed.numel(),
                                                             scale_fp16.data_ptr(), out.data_ptr(), numel,
                                                             int(shape[0]), levels, qmin, group_size, group_bits,
                                                             stream, out_fp16=fp16)
    return out


def _check_activation_arguments(x_shape: Sequence[int], dtypes: Sequence[Any], step_index_length: int,
                                scale_length: int, zero_point_length: int | None, qmin: int, qmax: int) -> None:
    """The checks of docs/ops/QuantizeDequantizeActivation_v1.md that the plugin makes at build time."""
    names = ("x", "scale", "step_index", "zero_point")
    wanted = (np.dtype(np.float32), np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.float32))
    for name, dtype, expected in zip(names, dtypes, wanted):
        if np.dtype(dtype) != expected:
            raise ValueError(f"{name} must be {expected.name}, got {np.dtype(dtype).name}")
    if len(x_shape) < 1:
        raise ValueError("x needs a batch dimension (rank >= 1)")
    if step_index_length != x_shape[0]:
        raise ValueError(f"step_index has {step_index_length} entries; it needs one per sample ({x_shape[0]})")
    if scale_length < 1 or zero_point_length not in (None, scale_length):
        raise ValueError(f"scale ({scale_length} steps) must be non-empty and zero_point ({zero_point_length}) as long")
    if not qmin < qmax or qmax - qmin + 1 > 65536:
        raise ValueError(f"grid [{qmin}, {qmax}] needs qmin < qmax and at most 65536 levels")


def quantize_dequantize_activation_host(x: np.ndarray, scale: np.ndarray, step_index: np.ndarray, qmin: int,
                                        qmax: int, zero_point: np.ndarray | None = None,
                                        out_dtype: Any = np.float32) -> np.ndarray:
    """lowbit::QuantizeDequantizeActivation by the C++ host path (same per-element function as the CUDA kernel):
    float32, or float16 rounded to nearest even from the float32 value. Arrays must already have the op's dtypes
    (float32, int64); an out-of-range step index gives NaN for that sample, as the kernel (the numpy reference
    raises instead)."""
    # np.require keeps a 0-d x 0-d (ascontiguousarray would make it 1-d), so it is refused for its rank.
    arrays = [np.require(a, requirements="C") for a in (x, scale, step_index)]
    zero = None if zero_point is None else np.require(zero_point, requirements="C")
    x, scale, step_index = arrays
    _check_activation_arguments(x.shape, [a.dtype for a in arrays] + [np.float32 if zero is None else zero.dtype],
                                step_index.size, scale.size, None if zero is None else zero.size, qmin, qmax)
    fp16 = _out_fp16(out_dtype)
    out = np.empty(x.shape, np.float16 if fp16 else np.float32)
    load_kernel_library().quantize_dequantize_activation_host(
        x.ctypes.data, scale.ctypes.data, step_index.ctypes.data, None if zero is None else zero.ctypes.data,
        out.ctypes.data, x.shape[0], x.size // x.shape[0] if x.shape[0] else 0, scale.size, qmin, qmax, out_fp16=fp16)
    return out


def quantize_dequantize_activation_cuda(x: Any, scale: Any, step_index: Any, qmin: int, qmax: int,
                                        zero_point: Any | None = None, out_dtype: Any = "float32") -> Any:
    """Same on torch CUDA tensors, launched on torch's current stream; returns a float32 (or float16) CUDA
    tensor."""
    import torch  # lazy: torch is only needed for this convenience wrapper

    tensors = [t.contiguous() for t in (x, scale, step_index)]
    zero = None if zero_point is None else zero_point.contiguous()
    x, scale, step_index = tensors
    dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors] + ["float32" if zero is None else
                                                                        str(zero.dtype).removeprefix("torch.")]
    _check_activation_arguments(tuple(x.shape), dtypes, step_index.numel(), scale.numel(),
                                None if zero is None else zero.numel(), qmin, qmax)
    if not all(t.is_cuda for t in tensors + ([] if zero is None else [zero])):
        raise ValueError("x, scale, step_index and zero_point must be CUDA tensors")
    fp16 = _out_fp16(out_dtype)
    out = torch.empty_like(x, dtype=torch.float16 if fp16 else torch.float32)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    load_kernel_library().quantize_dequantize_activation_launch(
        x.data_ptr(), scale.data_ptr(), step_index.data_ptr(), None if zero is None else zero.data_ptr(),
        out.data_ptr(), x.shape[0], x.numel() // x.shape[0] if x.shape[0] else 0, scale.numel(), qmin, qmax, stream,
        out_fp16=fp16)
    return out
