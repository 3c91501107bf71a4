"""The kernel library's v1 host path (same decode function as the CUDA kernel) equals the packing reference exactly.
The v2 (bit stream) host path is tested in test_kernel_host_bitstream.py."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit_deploy.engines.kernels import KernelError, unpack_dequantize_host
from lowbit_deploy.quant import packing
from lowbit_deploy.quant.packing import WORD_FORMATS, PackingFormat

LEVELS = [*range(2, 18), 256, 257, 65536]
SHAPES = [(1,), (3, 5), (7, 3, 3, 3), (5, 11, 1, 1), (13, 17)]


def reference(packed: np.ndarray, scale_fp16: np.ndarray, levels: int, qmin: int, fmt: PackingFormat,
              shape: tuple[int, ...]) -> np.ndarray:
    """docs/ops/UnpackDequantize_v1.md: float32(code + qmin) * float32(scale[channel]), one float32 multiply."""
    codes = packing.unpack_codes(packed, levels, fmt, int(np.prod(shape)))
    q = (codes + qmin).astype(np.float32).reshape(shape[0], -1)
    return (q * scale_fp16.astype(np.float32)[:, None]).reshape(shape)


def _cases():
    for levels in LEVELS:
        for fmt in WORD_FORMATS:
            marks = ()
            if packing.codes_per_word(levels, fmt.word_bits) < 1:
                # Say so instead of silently dropping it: the rejection is tested in test_rejects_levels_too_wide.
                marks = pytest.mark.skip(reason=f"{levels} levels do not fit a {fmt.word_bits}-bit word")
            for shape in SHAPES:
                case_id = f"L{levels}-{fmt.value}-{'x'.join(map(str, shape))}"
                yield pytest.param(levels, fmt, shape, marks=marks, id=case_id)


def _random_case(levels: int, fmt: PackingFormat, shape: tuple[int, ...], seed: int):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, levels, size=shape)
    # Extreme codes present in every case so both ends of the grid are exercised.
    codes.reshape(-1)[0] = levels - 1
    codes.reshape(-1)[-1] = 0
    scale_fp16 = rng.normal(0.0, 0.05, size=shape[0]).astype(np.float16)
    qmin = -(levels // 2)
    return packing.pack_codes(codes, levels, fmt), scale_fp16, qmin


@pytest.mark.parametrize(("levels", "fmt", "shape"), list(_cases()))
def test_host_matches_reference_bit_identically(kernel_library, levels, fmt, shape) -> None:
    packed, scale_fp16, qmin = _random_case(levels, fmt, shape, seed=levels * 31 + len(shape))
    k = packing.codes_per_word(levels, fmt.word_bits)
    decoded = unpack_dequantize_host(packed, scale_fp16, levels, qmin, fmt.word_bits, k, shape)
    expected = reference(packed, scale_fp16, levels, qmin, fmt, shape)
    assert decoded.dtype == np.float32 and decoded.shape == shape
    np.testing.assert_array_equal(decoded.view(np.uint32), expected.view(np.uint32))


def test_special_scales_widen_exactly(kernel_library) -> None:
    # Subnormal, largest, negative zero, infinity: the hand-written half->float widening must match numpy's.
    scale_bits = np.array([0x0001, 0x03FF, 0x7BFF, 0x8000, 0x7C00, 0xFC00, 0x3C00, 0xBC00], dtype=np.uint16)
    scale_fp16 = scale_bits.view(np.float16)
    levels, fmt, shape = 5, PackingFormat.INT32_WORDS, (8, 9)
    codes = np.tile(np.arange(9) % levels, (8, 1))
    packed = packing.pack_codes(codes, levels, fmt)
    k = packing.codes_per_word(levels, 32)
    with np.errstate(invalid="ignore"):
        expected = reference(packed, scale_fp16, levels, -2, fmt, shape)
    decoded = unpack_dequantize_host(packed, scale_fp16, levels, -2, 32, k, shape)
    np.testing.assert_array_equal(decoded.view(np.uint32), expected.view(np.uint32))


def test_rejects_levels_too_wide(kernel_library) -> None:
    with pytest.raises(ValueError, match="codes_per_word"):
        unpack_dequantize_host(np.zeros(4, np.int8), np.ones(1, np.float16), 257, 0, 8, 1, (4,))
    # The C ABI validates on its own too (what the TensorRT plugin relies on).
    out = np.empty(4, np.float32)
    packed, scale = np.zeros(4, np.int8), np.ones(1, np.float16)
    with pytest.raises(KernelError, match="codes_per_word"):
        kernel_library.unpack_dequantize_host(packed.ctypes.data, 8, scale.ctypes.data, out.ctypes.data, 4, 1, 257,
                                              0, 1)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(word_bits=16), "word_bits"),
    (dict(codes_per_word=4), "codes_per_word"),
    (dict(shape=(4, 6)), "words cannot hold"),
    (dict(shape=()), "non-empty"),
    (dict(scale_fp16=np.ones(3, np.float32)), "float16"),
    (dict(packed=np.zeros(4, np.int32)), "int8"),
])
def test_argument_errors(kernel_library, kwargs, message) -> None:
    arguments = dict(packed=np.zeros(4, np.int8), scale_fp16=np.ones(4, np.float16), levels=3, qmin=-1,
                     word_bits=8, codes_per_word=5, shape=(4, 5))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        unpack_dequantize_host(**arguments)
