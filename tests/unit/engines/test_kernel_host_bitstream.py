"""The kernel library's v2 host path (unpackBitstreamThread, the same function the CUDA kernel runs) equals the
numpy reference of the bit stream exactly; the C ABI validates its arguments on its own."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit_deploy.engines.kernels import KernelError, unpack_dequantize_bitstream_host
from lowbit_deploy.quant import packing
from lowbit_deploy.quant.packing import PackedLayout, PackingFormat, bitstream_group

BITSTREAM = PackingFormat.BITSTREAM
LEVELS = [*range(2, 18), 255, 256, 257, 1000, 65_535, 65_536]
SHAPES = [(1,), (3, 5), (7, 3, 3, 3), (5, 11, 1, 1), (13, 17), (2, 59)]


def reference(packed: np.ndarray, scale_fp16: np.ndarray, levels: int, qmin: int,
              shape: tuple[int, ...]) -> np.ndarray:
    """docs/ops/UnpackDequantize_v2.md: float32(code + qmin) * float32(scale[channel]), one float32 multiply."""
    codes = packing.unpack_codes(packed, levels, BITSTREAM, int(np.prod(shape)))
    q = (codes + qmin).astype(np.float32).reshape(shape[0], -1)
    return (q * scale_fp16.astype(np.float32)[:, None]).reshape(shape)


def _random_case(levels: int, shape: tuple[int, ...], seed: int):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, levels, size=shape)
    codes.reshape(-1)[0] = levels - 1
    codes.reshape(-1)[-1] = levels - 1  # the last group's top used digit, next to the stream's end
    scale_fp16 = rng.normal(0.0, 0.05, size=shape[0]).astype(np.float16)
    return packing.pack_codes(codes, levels, BITSTREAM), scale_fp16, -(levels // 2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("levels", LEVELS)
def test_host_matches_reference_bit_identically(kernel_library, levels, shape) -> None:
    packed, scale_fp16, qmin = _random_case(levels, shape, seed=levels * 31 + len(shape))
    size, bits = bitstream_group(levels)
    decoded = unpack_dequantize_bitstream_host(packed, scale_fp16, levels, qmin, size, bits, shape)
    assert decoded.dtype == np.float32 and decoded.shape == shape
    np.testing.assert_array_equal(decoded.view(np.uint32), reference(packed, scale_fp16, levels, qmin, shape)
                                  .view(np.uint32))


@pytest.mark.parametrize("levels", range(2, 18))
def test_host_decodes_the_largest_group_values(kernel_library, levels) -> None:
    size, bits = bitstream_group(levels)
    shape = (2, 4 * size + 1)
    codes = np.full(shape, levels - 1)
    packed = packing.pack_codes(codes, levels, BITSTREAM)
    decoded = unpack_dequantize_bitstream_host(packed, np.ones(2, np.float16), levels, 0, size, bits, shape)
    np.testing.assert_array_equal(decoded, codes.astype(np.float32))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(group_size=28), r"bit-stream group \(g, B\) = \(29, 46\)"),
    (dict(group_bits=47), "bit-stream group"),
    (dict(shape=(4, 6)), "a 24-code bit stream of 3 levels is 6 bytes, got 18"),
    (dict(shape=()), "non-empty"),
    (dict(scale_fp16=np.ones(4, np.float32)), "float16"),
    (dict(packed=np.zeros(12, np.uint8)), "must be int8"),
    (dict(scale_fp16=np.ones(3, np.float16)), "expected 4 scales"),
])
def test_argument_errors(kernel_library, kwargs, message) -> None:
    # 60 ternary codes: 3 groups of 29 codes in 46 bits = 138 bits -> 18 bytes.
    arguments = dict(packed=np.zeros(18, np.int8), scale_fp16=np.ones(4, np.float16), levels=3, qmin=-1,
                     group_size=29, group_bits=46, shape=(4, 15))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        unpack_dequantize_bitstream_host(**arguments)


@pytest.mark.parametrize(("levels", "group_size", "group_bits", "num_bytes", "message"), [
    (3, 28, 46, 18, "group_size/group_bits differ"),
    (1, 1, 1, 18, "levels out of range"),
    (3, 29, 46, 17, "num_bytes is not"),
    (3, 29, 46, 19, "num_bytes is not"),
])
def test_c_abi_validates_on_its_own(kernel_library, levels, group_size, group_bits, num_bytes, message) -> None:
    # What the TensorRT plugin relies on: the library refuses inconsistent arguments without Python's checks.
    packed, scale, out = np.zeros(32, np.int8), np.ones(4, np.float16), np.empty(60, np.float32)
    with pytest.raises(KernelError, match=message):
        kernel_library.unpack_dequantize_bitstream_host(packed.ctypes.data, num_bytes, scale.ctypes.data,
                                                        out.ctypes.data, 60, 4, levels, -1, group_size, group_bits)
