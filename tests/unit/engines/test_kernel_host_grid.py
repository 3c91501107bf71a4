"""The kernels' thread layout, run on the host: the host path executes the CUDA kernels' per-thread function for
every thread of the same grid, so capping the grid at a few blocks makes each thread loop several times (the
grid-stride loop, channel tracking across strides, the last partial block) on small weights. Every cap gives the
reference bit for bit, with the 32-bit loop arithmetic of ordinary weights and the 64-bit one of weights near 2^31
elements; the bit stream is also read unaligned (the byte-wise reader) and aligned (32-bit loads)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lowbit_deploy.engines.kernels import KernelError, unpack_dequantize_bitstream_host, unpack_dequantize_host
from lowbit_deploy.quant import packing
from lowbit_deploy.quant.packing import PackingFormat

FORMATS = (PackingFormat.INT8_WORDS, PackingFormat.INT32_WORDS, PackingFormat.BITSTREAM)
LEVELS = [2, 3, 4, 5, 7, 16, 17, 256, 257, 65_536]
# Channel lengths below, at and above a block (224..256 threads), and a single channel.
SHAPES = [(41, 7), (5, 256), (3, 1000), (1, 2999)]


def _case(levels: int, fmt: PackingFormat, shape: tuple[int, ...]):
    rng = np.random.default_rng(levels + shape[0])
    codes = rng.integers(0, levels, size=shape)
    codes.reshape(-1)[-1] = levels - 1
    scale_fp16 = rng.normal(0.0, 0.05, shape[0]).astype(np.float16)
    qmin = -(levels // 2)
    expected = ((codes.reshape(shape[0], -1) + qmin).astype(np.float32)
                * scale_fp16.astype(np.float32)[:, None]).reshape(shape)
    return packing.pack_codes(codes, levels, fmt), scale_fp16, qmin, expected


def _decode(packed, scale_fp16, levels, qmin, fmt, shape, **kwargs):
    if fmt is PackingFormat.BITSTREAM:
        size, bits = packing.bitstream_group(levels)
        return unpack_dequantize_bitstream_host(packed, scale_fp16, levels, qmin, size, bits, shape, **kwargs)
    k = packing.codes_per_word(levels, fmt.word_bits)
    return unpack_dequantize_host(packed, scale_fp16, levels, qmin, fmt.word_bits, k, shape, **kwargs)


def _cases():
    for levels in LEVELS:
        for fmt in FORMATS:
            if fmt is PackingFormat.BITSTREAM or packing.codes_per_word(levels, fmt.word_bits) >= 1:
                yield pytest.param(levels, fmt, id=f"L{levels}-{fmt.value}")


@pytest.mark.parametrize("wide_index", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("levels", "fmt"), list(_cases()))
def test_every_grid_cap_decodes_every_element_once(kernel_library, levels, fmt, shape, wide_index) -> None:
    packed, scale_fp16, qmin, expected = _case(levels, fmt, shape)
    for max_blocks in (1, 2, 3, 7, None):
        for out_dtype in (np.float32, np.float16):
            decoded = _decode(packed, scale_fp16, levels, qmin, fmt, shape, out_dtype=out_dtype,
                              max_blocks=max_blocks, wide_index=wide_index)
            want = expected.astype(out_dtype)
            np.testing.assert_array_equal(decoded.view(f"u{want.itemsize}"), want.view(f"u{want.itemsize}"),
                                          err_msg=f"max_blocks={max_blocks} {np.dtype(out_dtype).name}")


@pytest.mark.parametrize("levels", [3, 5, 7, 17, 1000, 65_535])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_bitstream_reads_alike_at_any_alignment(kernel_library, levels, offset) -> None:
    shape = (6, 331)
    packed, scale_fp16, qmin, expected = _case(levels, PackingFormat.BITSTREAM, shape)
    buffer = np.zeros(packed.size + 8, np.int8)
    start = (-buffer.ctypes.data) % 4 + offset  # 4-byte aligned plus `offset`
    buffer[start:start + packed.size] = packed
    view = buffer[start:start + packed.size]
    assert view.ctypes.data % 4 == offset
    decoded = _decode(view, scale_fp16, levels, qmin, PackingFormat.BITSTREAM, shape)
    np.testing.assert_array_equal(decoded.view(np.uint32), expected.view(np.uint32))


def test_grid_cap_must_be_positive(kernel_library) -> None:
    packed, scale_fp16, qmin, _ = _case(3, PackingFormat.INT8_WORDS, (2, 5))
    with pytest.raises(ValueError, match="max_blocks"):
        _decode(packed, scale_fp16, 3, qmin, PackingFormat.INT8_WORDS, (2, 5), max_blocks=0)
    out = np.empty(10, np.float32)
    with pytest.raises(KernelError, match="max_blocks must be at least 1"):  # the C ABI checks on its own
        kernel_library.unpack_dequantize_host_grid(packed.ctypes.data, 8, scale_fp16.ctypes.data, out.ctypes.data,
                                                   False, 10, 2, 3, qmin, 5, 0, False)


def test_python_grid_cap_is_the_headers() -> None:
    from lowbit_deploy.engines.kernels import DECODE_MAX_BLOCKS, PLUGINS_DIR

    header = (PLUGINS_DIR / "unpack_dequantize" / "unpackDequantizeDecode.h").read_text()
    assert re.search(r"kDECODE_MAX_BLOCKS = (\d+);", header).group(1) == str(DECODE_MAX_BLOCKS)
