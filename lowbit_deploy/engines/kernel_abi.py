"""ctypes signatures of the C ABI of ``liblowbit_kernels.so`` (plugins/*/…Kernel.h) and the typed wrapper around it.

Pointers are plain ints (numpy ``ctypes.data``, torch ``data_ptr()``, TensorRT's device pointers); every call checks
the returned code and raises :class:`KernelError` with the library's own message. Loading and building the library
is engines/kernels.py's job.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
# Argument lists shared by several entry points (device launchers take a trailing cudaStream_t).
_WORDS = [_P, _I, _P, _P, _I64, _I64, _I, _I, _I]  # packed, word_bits, scale, out, numel, channels, levels, qmin, k
_STREAM = [_P, _I64, _P, _P, _I64, _I64, _I, _I, _I, _I]  # packed, num_bytes, scale, out, numel, ..., g, B
_ACTIVATION = [_P] * 5 + [_I64] * 3 + [_I] * 2  # x, scale, step_index, zero_point, out, batch, per_sample, steps, ...
SIGNATURES: dict[str, list[Any]] = {
    "lowbit_unpack_dequantize_launch": _WORDS + [_P],
    "lowbit_unpack_dequantize_launch_fp16": _WORDS + [_P],
    "lowbit_unpack_dequantize_host": _WORDS,
    "lowbit_unpack_dequantize_host_fp16": _WORDS,
    "lowbit_unpack_dequantize_host_grid": _WORDS[:4] + [_I] + _WORDS[4:] + [_I64, _I],
    "lowbit_unpack_dequantize_bitstream_launch": _STREAM + [_P],
    "lowbit_unpack_dequantize_bitstream_launch_fp16": _STREAM + [_P],
    "lowbit_unpack_dequantize_bitstream_host": _STREAM,
    "lowbit_unpack_dequantize_bitstream_host_fp16": _STREAM,
    "lowbit_unpack_dequantize_bitstream_host_grid": _STREAM[:4] + [_I] + _STREAM[4:] + [_I64, _I],
    "lowbit_bitstream_group": [_I, ctypes.POINTER(_I), ctypes.POINTER(_I)],
    "lowbit_quantize_dequantize_activation_launch": _ACTIVATION + [_P],
    "lowbit_quantize_dequantize_activation_launch_fp16": _ACTIVATION + [_P],
    "lowbit_quantize_dequantize_activation_host": _ACTIVATION,
    "lowbit_quantize_dequantize_activation_host_fp16": _ACTIVATION,
}


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


def _suffix(out_fp16: bool) -> str:
    return "_fp16" if out_fp16 else ""


class KernelLibrary:
    """Typed wrapper around the C ABI. ``out_fp16`` picks the float16-output entry point (``out`` then holds IEEE
    binary16 values: the float32 output rounded to nearest even)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        for name, argtypes in SIGNATURES.items():
            function = getattr(self._lib, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        self._lib.lowbit_format_constants.argtypes = [ctypes.POINTER(LowbitFormatConstants)]
        self._lib.lowbit_format_constants.restype = ctypes.c_int
        self._lib.lowbit_error_string.argtypes = [ctypes.c_int]
        self._lib.lowbit_error_string.restype = ctypes.c_char_p

    def error_string(self, code: int) -> str:
        return self._lib.lowbit_error_string(code).decode()

    def _call(self, name: str, *args: Any) -> None:
        code = getattr(self._lib, name)(*args)
        if code != 0:
            raise KernelError(f"{name} failed with code {code}: {self.error_string(code)}")

    def format_constants(self) -> dict[str, Any]:
        constants = LowbitFormatConstants()
        self._call("lowbit_format_constants", ctypes.byref(constants))
        return {name: (value.decode() if isinstance(value, bytes) else value)
                for name, value in ((f, getattr(constants, f)) for f, _ in LowbitFormatConstants._fields_)}

    def unpack_dequantize_host(self, packed_ptr: int, word_bits: int, scale_ptr: int, out_ptr: int, numel: int,
                               channels: int, levels: int, qmin: int, codes_per_word: int,
                               out_fp16: bool = False) -> None:
        self._call(f"lowbit_unpack_dequantize_host{_suffix(out_fp16)}", packed_ptr, word_bits, scale_ptr, out_ptr,
                   numel, channels, levels, qmin, codes_per_word)

    def unpack_dequantize_host_grid(self, packed_ptr: int, word_bits: int, scale_ptr: int, out_ptr: int,
                                    out_fp16: bool, numel: int, channels: int, levels: int, qmin: int,
                                    codes_per_word: int, max_blocks: int, wide_index: bool = False) -> None:
        """The host path over a grid of at most ``max_blocks`` blocks, with 64-bit loop arithmetic if ``wide_index``
        (tests: multi-iteration thread loops, both index widths)."""
        self._call("lowbit_unpack_dequantize_host_grid", packed_ptr, word_bits, scale_ptr, out_ptr, int(out_fp16),
                   numel, channels, levels, qmin, codes_per_word, max_blocks, int(wide_index))

    def unpack_dequantize_launch(self, packed_ptr: int, word_bits: int, scale_ptr: int, out_ptr: int, numel: int,
                                 channels: int, levels: int, qmin: int, codes_per_word: int, stream: int,
                                 out_fp16: bool = False) -> None:
        """Device pointers and a cudaStream_t handle (ints); asynchronous on ``stream``."""
        self._call(f"lowbit_unpack_dequantize_launch{_suffix(out_fp16)}", packed_ptr, word_bits, scale_ptr, out_ptr,
                   numel, channels, levels, qmin, codes_per_word, stream)

    def bitstream_group(self, levels: int) -> tuple[int, int]:
        """``(g, B)`` from the C++ twin of ``packing.bitstream_group``."""
        size, bits = ctypes.c_int(), ctypes.c_int()
        self._call("lowbit_bitstream_group", levels, ctypes.byref(size), ctypes.byref(bits))
        return size.value, bits.value

    def unpack_dequantize_bitstream_host(self, packed_ptr: int, num_bytes: int, scale_ptr: int, out_ptr: int,
                                         numel: int, channels: int, levels: int, qmin: int, group_size: int,
                                         group_bits: int, out_fp16: bool = False) -> None:
        self._call(f"lowbit_unpack_dequantize_bitstream_host{_suffix(out_fp16)}", packed_ptr, num_bytes, scale_ptr,
                   out_ptr, numel, channels, levels, qmin, group_size, group_bits)

    def unpack_dequantize_bitstream_host_grid(self, packed_ptr: int, num_bytes: int, scale_ptr: int, out_ptr: int,
                                              out_fp16: bool, numel: int, channels: int, levels: int, qmin: int,
                                              group_size: int, group_bits: int, max_blocks: int,
                                              wide_index: bool = False) -> None:
        self._call("lowbit_unpack_dequantize_bitstream_host_grid", packed_ptr, num_bytes, scale_ptr, out_ptr,
                   int(out_fp16), numel, channels, levels, qmin, group_size, group_bits, max_blocks, int(wide_index))

    def unpack_dequantize_bitstream_launch(self, packed_ptr: int, num_bytes: int, scale_ptr: int, out_ptr: int,
                                           numel: int, channels: int, levels: int, qmin: int, group_size: int,
                                           group_bits: int, stream: int, out_fp16: bool = False) -> None:
        """v2 on device pointers and a cudaStream_t handle (ints); asynchronous on ``stream``."""
        self._call(f"lowbit_unpack_dequantize_bitstream_launch{_suffix(out_fp16)}", packed_ptr, num_bytes,
                   scale_ptr, out_ptr, numel, channels, levels, qmin, group_size, group_bits, stream)

    def quantize_dequantize_activation_host(self, x_ptr: int, scale_ptr: int, step_index_ptr: int,
                                            zero_point_ptr: int | None, out_ptr: int, batch: int, per_sample: int,
                                            steps: int, qmin: int, qmax: int, out_fp16: bool = False) -> None:
        """lowbit::QuantizeDequantizeActivation on host pointers (``zero_point_ptr`` None: symmetric grid)."""
        self._call(f"lowbit_quantize_dequantize_activation_host{_suffix(out_fp16)}", x_ptr, scale_ptr, step_index_ptr,
                   zero_point_ptr, out_ptr, batch, per_sample, steps, qmin, qmax)

    def quantize_dequantize_activation_launch(self, x_ptr: int, scale_ptr: int, step_index_ptr: int,
                                              zero_point_ptr: int | None, out_ptr: int, batch: int, per_sample: int,
                                              steps: int, qmin: int, qmax: int, stream: int,
                                              out_fp16: bool = False) -> None:
        """Same on device pointers and a cudaStream_t handle (ints); asynchronous on ``stream``."""
        self._call(f"lowbit_quantize_dequantize_activation_launch{_suffix(out_fp16)}", x_ptr, scale_ptr,
                   step_index_ptr, zero_point_ptr, out_ptr, batch, per_sample, steps, qmin, qmax, stream)
