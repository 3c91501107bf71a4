"""PackingFormat.BITSTREAM (op v2): the group choice, the exact bit layout, round trips and density."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_deploy.quant import packing
from lowbit_deploy.quant.packing import (
    MAX_GROUP_BITS,
    PackedLayout,
    PackingFormat,
    bitstream_group,
    pack_bitstream,
    pack_codes,
    unpack_bitstream,
    unpack_codes,
)

BITSTREAM = PackingFormat.BITSTREAM
SPEC = Path(__file__).resolve().parents[3] / "docs" / "ops" / "UnpackDequantize_v2.md"
# (L, g, B) for L = 2..17: the table of docs/ops/UnpackDequantize_v2.md.
GROUP_TABLE = [(2, 1, 1), (3, 29, 46), (4, 1, 2), (5, 3, 7), (6, 17, 44), (7, 16, 45), (8, 1, 3), (9, 17, 54),
               (10, 3, 10), (11, 13, 45), (12, 5, 18), (13, 7, 26), (14, 11, 42), (15, 11, 43), (16, 1, 4),
               (17, 11, 45)]


def naive_bitstream(codes: np.ndarray, levels: int) -> np.ndarray:
    """The layout as the spec words it, with Python integers: group i = sum c[g*i + j] * L**j, written at stream bit
    i*B of one little-endian integer, zero-padded to whole bytes."""
    size, bits = bitstream_group(levels)
    flat = [int(c) for c in codes.reshape(-1)]
    flat += [0] * (-len(flat) % size)
    stream = 0
    for group in range(len(flat) // size):
        value = sum(code * levels**j for j, code in enumerate(flat[group * size:(group + 1) * size]))
        assert value < 2**bits
        stream |= value << (group * bits)
    num_bytes = -(-(len(flat) // size) * bits // 8)
    return np.frombuffer(stream.to_bytes(num_bytes, "little"), dtype=np.int8)


@pytest.mark.parametrize(("levels", "size", "bits"), GROUP_TABLE)
def test_group_table(levels, size, bits):
    assert bitstream_group(levels) == (size, bits)


def test_spec_table_matches_the_code():
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \|", SPEC.read_text(), re.M)
    assert [int(r[0]) for r in rows] == list(range(2, 18))
    for levels, size, bits, per_weight, log2_levels, overhead in rows:
        levels, size, bits = int(levels), int(size), int(bits)
        assert bitstream_group(levels) == (size, bits)
        assert float(per_weight) == pytest.approx(bits / size, abs=5e-5)
        assert float(log2_levels) == pytest.approx(math.log2(levels), abs=5e-5)
        assert float(overhead) == pytest.approx((bits / size / math.log2(levels) - 1) * 100, abs=5e-3)


def _brute_force_group(levels: int) -> tuple[int, int]:
    candidates = []
    for size in range(1, MAX_GROUP_BITS + 1):
        bits = math.ceil(size * math.log2(levels) - 1e-12)
        while levels**size > 2**bits:  # guard against float error: B is the exact minimum
            bits += 1
        while bits > 0 and levels**size <= 2 ** (bits - 1):
            bits -= 1
        if bits <= MAX_GROUP_BITS:
            candidates.append((bits / size, size, bits))
    _, size, bits = min(candidates)  # fewest bits per code, then the smallest group
    return size, bits


@pytest.mark.parametrize("levels", [*range(2, 65), 100, 127, 255, 256, 257, 1000, 4097, 40_000, 65_535, 65_536])
def test_group_is_the_densest_within_the_cap(levels):
    size, bits = bitstream_group(levels)
    assert (size, bits) == _brute_force_group(levels)
    assert levels**size <= 2**bits < 2 * levels**size  # B is the smallest bit count that holds L**g values
    assert bits <= MAX_GROUP_BITS and bits + 7 <= 63  # a group plus its bit offset fits one 64-bit load


@pytest.mark.parametrize("bits", range(1, 17))
def test_powers_of_two_store_plain_bits(bits):
    assert bitstream_group(2**bits) == (1, bits)


@pytest.mark.parametrize("levels", [3, 5, 9, 17])
def test_bits_per_weight_within_one_percent_of_log2_levels(levels):
    layout = PackedLayout(levels, BITSTREAM, 29_491_200)  # an SD1.5 1280x2560x3x3 weight
    assert layout.bits_per_weight <= 1.01 * math.log2(levels)
    assert layout.nbytes * 8 / layout.numel <= 1.01 * math.log2(levels)  # padding included


@pytest.mark.parametrize("levels", range(2, 18))
def test_layout_fields(levels):
    size, bits = bitstream_group(levels)
    layout = PackedLayout(levels, BITSTREAM, 1000)
    assert (layout.group_size, layout.group_bits) == (size, bits)
    assert layout.num_groups == -(-1000 // size)
    assert layout.num_words == layout.nbytes == -(-layout.num_groups * bits // 8)
    assert layout.bits_per_weight == bits / size
    with pytest.raises(ValueError, match="no words"):
        layout.codes_per_word


def _edge_shapes(levels: int) -> list[tuple[int, ...]]:
    size = bitstream_group(levels)[0]
    counts = sorted({1, max(size - 1, 1), size, size + 1, 2 * size + 1, 8 * size + 3})
    return [(count,) for count in counts] + [(3, 5, 7), (1, 1)]


@pytest.mark.parametrize("levels", range(2, 18))
def test_layout_matches_the_spec_bit_for_bit(levels):
    rng = np.random.default_rng(levels)
    for shape in _edge_shapes(levels):
        codes = rng.integers(0, levels, size=shape)
        codes.reshape(-1)[-1] = levels - 1  # the top digit of the last group is used
        stream = pack_bitstream(codes, levels)
        np.testing.assert_array_equal(stream, naive_bitstream(codes, levels))
        np.testing.assert_array_equal(unpack_bitstream(stream, levels, codes.size), codes.reshape(-1))


@pytest.mark.parametrize("levels", range(2, 18))
@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_round_trip_odd_shapes(levels, shape, seed):
    codes = np.random.default_rng(seed).integers(0, levels, size=shape)
    stream = pack_codes(codes, levels, BITSTREAM)
    layout = PackedLayout(levels, BITSTREAM, codes.size)
    assert stream.dtype == np.int8 and stream.shape == (layout.num_words,)
    np.testing.assert_array_equal(unpack_codes(stream, levels, BITSTREAM, codes.size), codes.reshape(-1))


@pytest.mark.parametrize("levels", [255, 256, 257, 1000, 65_535, 65_536])
def test_extreme_codes_round_trip_for_wide_grids(levels):
    codes = np.array([levels - 1, 0] * 9 + [levels - 1])
    stream = pack_codes(codes, levels, BITSTREAM)
    np.testing.assert_array_equal(stream, naive_bitstream(codes, levels))
    np.testing.assert_array_equal(unpack_codes(stream, levels, BITSTREAM, codes.size), codes)


@pytest.mark.parametrize(("levels", "size", "bits"), GROUP_TABLE)
def test_largest_group_values_round_trip(levels, size, bits):
    # All codes L-1: every group holds L**g - 1, the largest value its B bits must carry.
    codes = np.full(4 * size + 1, levels - 1)
    stream = pack_bitstream(codes, levels)
    np.testing.assert_array_equal(stream, naive_bitstream(codes, levels))
    np.testing.assert_array_equal(unpack_bitstream(stream, levels, codes.size), codes)


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pack_bitstream(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pack_bitstream(np.array([-1]), 3)


@pytest.mark.slow
def test_sd_sized_weight_packs_in_seconds():
    """1280x2560x3x3 (29.5 M codes) of a 16-level grid (g = 1: one group per code, the most groups): a Python loop
    over groups would take minutes."""
    codes = np.random.default_rng(0).integers(0, 16, size=(1280, 2560, 3, 3), dtype=np.int64)
    start = time.perf_counter()
    stream = pack_codes(codes, 16, BITSTREAM)
    elapsed = time.perf_counter() - start
    assert stream.size == codes.size // 2
    assert elapsed < 30, f"packing took {elapsed:.1f} s"
    assert packing.unpack_codes(stream[:8], 16, BITSTREAM, 16).tolist() == codes.reshape(-1)[:16].tolist()
