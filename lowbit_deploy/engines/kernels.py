"""ctypes binding of ``plugins/build/liblowbit_kernels.so`` (built from plugins/ with nvcc).

The library carries the CUDA kernels of ``lowbit::UnpackDequantize`` versions 1 (word formats) and 2 (bit stream) and
of ``lowbit::QuantizeDequantizeActivation`` v1 and their host reference behind a C ABI, with cudart linked statically,
so it loads on machines without a GPU (the host path then runs; the device launcher reports a CUDA error).
"""

from __future__ import annotations

import ctypes
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

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
LIBRARY_NAME = "liblowbit_kernels.so"
_SOURCE_SUFFIXES = (".cu", ".h", ".cuh", ".cpp")
_WORD_DTYPES = {8: np.int8, 32: np.int32}


class KernelError(RuntimeError):
    """A kernel call returned an error code (argument error or CUDA error)."""


class LowbitFormatConstants(ctypes.Structure):
    """Mirror of ``LowbitFormatConstants`` in plugins/unpack_dequantize/unpackDequantizeKernel.h."""

    _fields_ = [
        ("int8_words_format_id", ctypes.c_int32),
        ("int8_words_word_bits", ctypes.c_int32),
        ("int32_words_format_id", ctypes.c_int32),
        ("int32_words_word_bits", ctypes.c_int32),
        ("min_levels", ctypes.c_int32),
        ("max_levels", ctypes.c_int32),
        ("op_name", ctypes.c_char_p),
        ("plugin_namespace", ctypes.c_char_p),
        ("op_version", ctypes.c_char_p),
        ("bitstream_format_id", ctypes.c_int32),
        ("bitstream_word_bits", ctypes.c_int32),
        ("max_group_bits", ctypes.c_int32),
        ("bitstream_op_version", ctypes.c_char_p),
    ]


def find_nvcc() -> str | None:
    """nvcc from $NVCC, PATH, $CUDA_HOME/bin or /usr/local/cuda/bin."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    candidates += [str(Path(root) / "bin" / "nvcc") for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if root]
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


class KernelLibrary:
    """Typed wrapper around the C ABI."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        args = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.lowbit_unpack_dequantize_launch.argtypes = args + [ctypes.c_void_p]
        self._lib.lowbit_unpack_dequantize_launch.restype = ctypes.c_int
        self._lib.lowbit_unpack_dequantize_host.argtypes = args
        self._lib.lowbit_unpack_dequantize_host.restype = ctypes.c_int
        stream_args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.lowbit_unpack_dequantize_bitstream_launch.argtypes = stream_args + [ctypes.c_void_p]
        self._lib.lowbit_unpack_dequantize_bitstream_launch.restype = ctypes.c_int
        self._lib.lowbit_unpack_dequantize_bitstream_host.argtypes = stream_args
        self._lib.lowbit_unpack_dequantize_bitstream_host.restype = ctypes.c_int
        self._lib.lowbit_bitstream_group.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                                     ctypes.POINTER(ctypes.c_int)]
        self._lib.lowbit_bitstream_group.restype = ctypes.c_int
        self._lib.lowbit_format_constants.argtypes = [ctypes.POINTER(LowbitFormatConstants)]
        self._lib.lowbit_format_constants.restype = ctypes.c_int
        activation_args = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
        self._lib.lowbit_quantize_dequantize_activation_launch.argtypes = activation_args + [ctypes.c_void_p]
        self._lib.lowbit_quantize_dequantize_activation_launch.restype = ctypes.c_int
        self._lib.lowbit_quantize_dequantize_activation_host.argtypes = activation_args
        self._lib.lowbit_quantize_dequantize_activation_host.restype = ctypes.c_int
        self._lib.lowbit_error_string.argtypes = [ctypes.c_int]
        self._lib.lowbit_error_string.restype = ctypes.c_char_p

    def error_string(self, code: int) -> str:
        return self._lib.lowbit_error_string(code).decode()

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise KernelError(f"{what} failed with code {code}: {self.error_string(code)}")

    def format_constants(self) -> dict[str, Any]:
        constants = LowbitFormatConstants()
        self._check(self._lib.lowbit_format_constants(ctypes.byref(constants)), "lowbit_format_constants")
        return {name: (value.decode() if isinstance(value, bytes) else value)
                for name, value in ((f, getattr(constants, f)) for f, _ in LowbitFormatConstants._fields_)}

    def unpack_dequantize_host(self, packed_ptr: int, word_bits: int, scale_ptr: int, out_ptr: int, numel: int,
                               channels: int, levels: int, qmin: int, codes_per_word: int) -> None:
        code = self._lib.lowbit_unpack_dequantize_host(packed_ptr, word_bits, scale_ptr, out_ptr, numel, channels,
                                                       levels, qmin, codes_per_word)
        self._check(code, "lowbit_unpack_dequantize_host")

    def unpack_dequantize_launch(self, packed_ptr: int, word_bits: int, scale_ptr: int, out_ptr: int, numel: int,
                                 channels: int, levels: int, qmin: int, codes_per_word: int, stream: int) -> None:
        """Device pointers and a cudaStream_t handle (ints); asynchronous on ``stream``."""
        code = self._lib.lowbit_unpack_dequantize_launch(packed_ptr, word_bits, scale_ptr, out_ptr, numel, channels,
                                                         levels, qmin, codes_per_word, stream)
        self._check(code, "lowbit_unpack_dequantize_launch")

    def bitstream_group(self, levels: int) -> tuple[int, int]:
        """``(g, B)`` from the C++ twin of ``packing.bitstream_group``."""
        size, bits = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.lowbit_bitstream_group(levels, ctypes.byref(size), ctypes.byref(bits)),
                    "lowbit_bitstream_group")
        return size.value, bits.value

    def unpack_dequantize_bitstream_host(self, packed_ptr: int, num_bytes: int, scale_ptr: int, out_ptr: int,
                                         numel: int, channels: int, levels: int, qmin: int, group_size: int,
                                         group_bits: int) -> None:
        code = self._lib.lowbit_unpack_dequantize_bitstream_host(packed_ptr, num_bytes, scale_ptr, out_ptr, numel,
                                                                 channels, levels, qmin, group_size, group_bits)
        self._check(code, "lowbit_unpack_dequantize_bitstream_host")

    def unpack_dequantize_bitstream_launch(self, packed_ptr: int, num_bytes: int, scale_ptr: int, out_ptr: int,
                                           numel: int, channels: int, levels: int, qmin: int, group_size: int,
                                           group_bits: int, stream: int) -> None:
        """v2 on device pointers and a cudaStream_t handle (ints); asynchronous on ``stream``."""
        code = self._lib.lowbit_unpack_dequantize_bitstream_launch(packed_ptr, num_bytes, scale_ptr, out_ptr, numel,
                                                                   channels, levels, qmin, group_size, group_bits,
                                                                   stream)
        self._check(code, "lowbit_unpack_dequantize_bitstream_launch")

    def quantize_dequantize_activation_host(self, x_ptr: int, scale_ptr: int, step_index_ptr: int,
                                            zero_point_ptr: int | None, out_ptr: int, batch: int, per_sample: int,
                                            steps: int, qmin: int, qmax: int) -> None:
        """lowbit::QuantizeDequantizeActivation on host pointers (``zero_point_ptr`` None: symmetric grid)."""
        code = self._lib.lowbit_quantize_dequantize_activation_host(x_ptr, scale_ptr, step_index_ptr, zero_point_ptr,
                                                                    out_ptr, batch, per_sample, steps, qmin, qmax)
        self._check(code, "lowbit_quantize_dequantize_activation_host")

    def quantize_dequantize_activation_launch(self, x_ptr: int, scale_ptr: int, step_index_ptr: int,
                                              zero_point_ptr: int | None, out_ptr: int, batch: int, per_sample: int,
                                              steps: int, qmin: int, qmax: int, stream: int) -> None:
        """Same on device pointers and a cudaStream_t handle (ints); asynchronous on ``stream``."""
        code = self._lib.lowbit_quantize_dequantize_activation_launch(x_ptr, scale_ptr, step_index_ptr,
                                                                      zero_point_ptr, out_ptr, batch, per_sample,
                                                                      steps, qmin, qmax, stream)
        self._check(code, "lowbit_quantize_dequantize_activation_launch")


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
        raise ValueError(f"codes_per_word={codes_per_word} but {levels} levels in {word_bits}-bit words give {expected}")
    if not shape or any(int(d) < 1 for d in shape):
        raise ValueError(f"shape must be non-empty with positive dimensions, got {tuple(shape)}")
    numel = int(np.prod(shape, dtype=np.int64))
    if num_words != -(-numel // codes_per_word):
        raise ValueError(f"{num_words} words cannot hold {numel} codes at {codes_per_word} per word")
    if num_scales != int(shape[0]):
        raise ValueError(f"expected {shape[0]} scales (one per output channel), got {num_scales}")
    return numel


def unpack_dequantize_host(packed: np.ndarray, scale_fp16: np.ndarray, levels: int, qmin: int, word_bits: int,
                           codes_per_word: int, shape: Sequence[int]) -> np.ndarray:
    """Dense float32 weight of ``shape`` decoded by the C++ host path (same decode function as the CUDA kernel)."""
    packed = np.ascontiguousarray(packed).reshape(-1)
    scale_fp16 = np.ascontiguousarray(scale_fp16).reshape(-1)
    numel = _check_arguments(packed.dtype, scale_fp16.dtype, levels, word_bits, codes_per_word, shape, packed.size,
                             scale_fp16.size)
    out = np.empty(tuple(int(d) for d in shape), dtype=np.float32)
    load_kernel_library().unpack_dequantize_host(packed.ctypes.data, word_bits, scale_fp16.ctypes.data,
                                                 out.ctypes.data, numel, int(shape[0]), levels, qmin, codes_per_word)
    return out


def unpack_dequantize_cuda(packed: Any, scale_fp16: Any, levels: int, qmin: int, word_bits: int,
                           codes_per_word: int, shape: Sequence[int]) -> Any:
    """Same on torch CUDA tensors, launched on torch's current stream; returns a float32 CUDA tensor."""
    import torch  # lazy: torch is only needed for this convenience wrapper

    packed = packed.contiguous().reshape(-1)
    scale_fp16 = scale_fp16.contiguous().reshape(-1)
    numel = _check_arguments(np.dtype(str(packed.dtype).removeprefix("torch.")),
                             np.dtype(str(scale_fp16.dtype).removeprefix("torch.")), levels, word_bits,
                             codes_per_word, shape, packed.numel(), scale_fp16.numel())
    if not (packed.is_cuda and scale_fp16.is_cuda):
        raise ValueError("packed and scale_fp16 must be CUDA tensors")
    out = torch.empty(tuple(int(d) for d in shape), dtype=torch.float32, device=packed.device)
    stream = torch.cuda.current_stream(packed.device).cuda_stream
    load_kernel_library().unpack_dequantize_launch(packed.data_ptr(), word_bits, scale_fp16.data_ptr(),
                                                   out.data_ptr(), numel, int(shape[0]), levels, qmin,
                                                   codes_per_word, stream)
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
                                     group_size: int, group_bits: int, shape: Sequence[int]) -> np.ndarray:
    """Op v2: dense float32 weight of ``shape`` decoded from the bit stream by the C++ host path (same decode
    function as the CUDA kernel)."""
    packed = np.ascontiguousarray(packed).reshape(-1)
    scale_fp16 = np.ascontiguousarray(scale_fp16).reshape(-1)
    numel = _check_bitstream_arguments(packed.dtype, scale_fp16.dtype, levels, group_size, group_bits, shape,
                                       packed.size, scale_fp16.size)
    out = np.empty(tuple(int(d) for d in shape), dtype=np.float32)
    load_kernel_library().unpack_dequantize_bitstream_host(packed.ctypes.data, packed.size, scale_fp16.ctypes.data,
                                                           out.ctypes.data, numel, int(shape[0]), levels, qmin,
                                                           group_size, group_bits)
    return out


def unpack_dequantize_bitstream_cuda(packed: Any, scale_fp16: Any, levels: int, qmin: int, group_size: int,
                                     group_bits: int, shape: Sequence[int]) -> Any:
    """Op v2 on torch CUDA tensors, launched on torch's current stream; returns a float32 CUDA tensor."""
    import torch  # lazy: torch is only needed for this convenience wrapper

    packed = packed.contiguous().reshape(-1)
    scale_fp16 = scale_fp16.contiguous().reshape(-1)
    numel = _check_bitstream_arguments(np.dtype(str(packed.dtype).removeprefix("torch.")),
                                       np.dtype(str(scale_fp16.dtype).removeprefix("torch.")), levels, group_size,
                                       group_bits, shape, packed.numel(), scale_fp16.numel())
    if not (packed.is_cuda and scale_fp16.is_cuda):
        raise ValueError("packed and scale_fp16 must be CUDA tensors")
    out = torch.empty(tuple(int(d) for d in shape), dtype=torch.float32, device=packed.device)
    stream = torch.cuda.current_stream(packed.device).cuda_stream
    load_kernel_library().unpack_dequantize_bitstream_launch(packed.data_ptr(), packed.numel(),
                                                             scale_fp16.data_ptr(), out.data_ptr(), numel,
                                                             int(shape[0]), levels, qmin, group_size, group_bits,
                                                             stream)
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
                                        qmax: int, zero_point: np.ndarray | None = None) -> np.ndarray:
    """lowbit::QuantizeDequantizeActivation by the C++ host path (same per-element function as the CUDA kernel).
    Arrays must already have the op's dtypes (float32, int64); an out-of-range step index gives NaN for that
    sample, as the kernel (the numpy reference raises instead)."""
    # np.require keeps a 0-d x 0-d (ascontiguousarray would make it 1-d), so it is refused for its rank.
    arrays = [np.require(a, requirements="C") for a in (x, scale, step_index)]
    zero = None if zero_point is None else np.require(zero_point, requirements="C")
    x, scale, step_index = arrays
    _check_activation_arguments(x.shape, [a.dtype for a in arrays] + [np.float32 if zero is None else zero.dtype],
                                step_index.size, scale.size, None if zero is None else zero.size, qmin, qmax)
    out = np.empty_like(x)
    load_kernel_library().quantize_dequantize_activation_host(
        x.ctypes.data, scale.ctypes.data, step_index.ctypes.data, None if zero is None else zero.ctypes.data,
        out.ctypes.data, x.shape[0], x.size // x.shape[0] if x.shape[0] else 0, scale.size, qmin, qmax)
    return out


def quantize_dequantize_activation_cuda(x: Any, scale: Any, step_index: Any, qmin: int, qmax: int,
                                        zero_point: Any | None = None) -> Any:
    """Same on torch CUDA tensors, launched on torch's current stream; returns a float32 CUDA tensor."""
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
    out = torch.empty_like(x)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    load_kernel_library().quantize_dequantize_activation_launch(
        x.data_ptr(), scale.data_ptr(), step_index.data_ptr(), None if zero is None else zero.data_ptr(),
        out.data_ptr(), x.shape[0], x.numel() // x.shape[0] if x.shape[0] else 0, scale.numel(), qmin, qmax, stream)
    return out
