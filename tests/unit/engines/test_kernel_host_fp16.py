"""float16 output of the kernel library's host paths (v1 word formats, v2 bit stream): for every format and level
count the fp16 output is the fp32 output rounded to nearest even, i.e. equal byte for byte to numpy's
``astype(float16)`` of the fp32 output, and the fp32 output still equals the op's numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit_deploy.engines.kernels import unpack_dequantize_bitstream_host, unpack_dequantize_host
from lowbit_deploy.quant import packing
from lowbit_deploy.quant.packing import PackingFormat

FORMATS = (PackingFormat.INT8_WORDS, PackingFormat.INT32_WORDS, PackingFormat.BITSTREAM)
LEVELS = [*range(2, 18), 31, 255, 256, 257, 1000, 65_535, 65_536]
SHAPE = (13, 3, 3, 7)


def decode(packed: np.ndarray, scale_fp16: np.ndarray, levels: int, qmin: int, fmt: PackingFormat,
           shape: tuple[int, ...], out_dtype) -> np.ndarray:
    if fmt is PackingFormat.BITSTREAM:
        size, bits = packing.bitstream_group(levels)
        return unpack_dequantize_bitstream_host(packed, scale_fp16, levels, qmin, size, bits, shape,
                                                out_dtype=out_dtype)
    k = packing.codes_per_word(levels, fmt.word_bits)
    return unpack_dequantize_host(packed, scale_fp16, levels, qmin, fmt.word_bits, k, shape, out_dtype=out_dtype)


def reference(codes: np.ndarray, qmin: int, scale_fp16: np.ndarray) -> np.ndarray:
    shape = codes.shape
    q = (codes.reshape(shape[0], -1) + qmin).astype(np.float32)
    return (q * scale_fp16.astype(np.float32)[:, None]).reshape(shape)


def _cases():
    for levels in LEVELS:
        for fmt in FORMATS:
            fits = fmt is PackingFormat.BITSTREAM or packing.codes_per_word(levels, fmt.word_bits) >= 1
            # Said, not silently dropped: such levels are refused (test_kernel_host.py::test_rejects_levels_too_wide).
            marks = () if fits else pytest.mark.skip(reason=f"{levels} levels do not fit a {fmt.word_bits}-bit word")
            yield pytest.param(levels, fmt, marks=marks, id=f"L{levels}-{fmt.value}")


@pytest.mark.parametrize(("levels", "fmt"), list(_cases()))
def test_fp16_output_is_the_fp32_output_rounded_to_nearest_even(kernel_library, levels, fmt) -> None:
    rng = np.random.default_rng(levels)
    codes = rng.integers(0, levels, size=SHAPE)
    codes.reshape(-1)[0], codes.reshape(-1)[-1] = levels - 1, 0
    # Scales from tiny to large so products land on half subnormals, rounding ties and (for wide grids) overflow.
    scale_fp16 = (rng.normal(0.0, 1.0, SHAPE[0]) * np.exp2(rng.integers(-20, 6, SHAPE[0]))).astype(np.float16)
    qmin = -(levels // 2)
    packed = packing.pack_codes(codes, levels, fmt)
    fp32 = decode(packed, scale_fp16, levels, qmin, fmt, SHAPE, np.float32)
    fp16 = decode(packed, scale_fp16, levels, qmin, fmt, SHAPE, np.float16)
    assert fp16.dtype == np.float16 and fp16.shape == SHAPE
    np.testing.assert_array_equal(fp32.view(np.uint32), reference(codes, qmin, scale_fp16).view(np.uint32))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(fp16.view(np.uint16), fp32.astype(np.float16).view(np.uint16))


# Half bit patterns: smallest subnormal, largest subnormal, smallest normal, 1 + 2^-10 (odd products round at a
# tie), largest finite, -0, +-inf, a quiet NaN.
SPECIAL_SCALES = np.array([0x0001, 0x03FF, 0x0400, 0x3C01, 0x3C03, 0x7BFF, 0x8000, 0x7C00, 0xFC00, 0x7E00],
                          dtype=np.uint16).view(np.float16)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_fp16_rounding_of_special_values_matches_numpy(kernel_library, fmt) -> None:
    levels, qmin = 9, -4
    shape = (SPECIAL_SCALES.size, 2 * levels)
    codes = np.tile(np.arange(2 * levels) % levels, (shape[0], 1))
    packed = packing.pack_codes(codes, levels, fmt)
    fp32 = decode(packed, SPECIAL_SCALES, levels, qmin, fmt, shape, np.float32)
    fp16 = decode(packed, SPECIAL_SCALES, levels, qmin, fmt, shape, np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = fp32.astype(np.float16)
        np.testing.assert_array_equal(fp32.view(np.uint32), reference(codes, qmin, SPECIAL_SCALES).view(np.uint32))
    np.testing.assert_array_equal(fp16.view(np.uint16), expected.view(np.uint16))
    assert np.isinf(fp16[5]).any() and np.isnan(fp16[9]).all()  # 65504 * 4 overflows; NaN stays NaN


def test_rejects_other_output_dtypes(kernel_library) -> None:
    packed = packing.pack_codes(np.zeros((2, 5), np.int64), 3, PackingFormat.INT8_WORDS)
    with pytest.raises(ValueError, match="float32 or float16"):
        unpack_dequantize_host(packed, np.ones(2, np.float16), 3, -1, 8, 5, (2, 5), out_dtype=np.float64)
