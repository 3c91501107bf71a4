import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_deploy.quant.packing import (
    PackedLayout,
    PackingFormat,
    WORD_FORMATS,
    best_format,
    bits_per_weight,
    codes_per_word,
    pack_codes,
    unpack_codes,
)


def _fits(levels: int, fmt: PackingFormat) -> bool:
    return bits_per_weight(levels, fmt) != float("inf")


@settings(max_examples=60, deadline=None)
@given(levels=st.integers(2, 17), fmt=st.sampled_from(list(PackingFormat)),
       shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_round_trip_every_level_count_and_odd_shapes(levels, fmt, shape, seed):
    codes = np.random.default_rng(seed).integers(0, levels, size=shape)
    words = pack_codes(codes, levels, fmt)
    assert words.dtype == fmt.numpy_dtype
    assert words.shape == (PackedLayout(levels, fmt, codes.size).num_words,)
    np.testing.assert_array_equal(unpack_codes(words, levels, fmt, codes.size), codes.reshape(-1))


@pytest.mark.parametrize("levels", [2, 3, 4, 5, 9, 16, 17, 255, 256, 257, 65536])
@pytest.mark.parametrize("fmt", list(PackingFormat))
def test_extreme_codes_round_trip(levels, fmt):
    if not _fits(levels, fmt):
        with pytest.raises(ValueError, match="do not fit"):
            PackedLayout(levels, fmt, 1)
        return
    codes = np.array([0, levels - 1] * 11 + [levels - 1])
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, levels, fmt), levels, fmt, codes.size), codes)


@pytest.mark.parametrize(("levels", "word_bits", "expected"), [
    (2, 8, 8), (3, 8, 5), (4, 8, 4), (5, 8, 3), (9, 8, 2), (16, 8, 2), (17, 8, 1), (256, 8, 1), (257, 8, 0),
    (3, 32, 20), (5, 32, 13), (9, 32, 10), (17, 32, 7), (257, 32, 3), (65536, 32, 2),
])
def test_codes_per_word_is_the_largest_that_fits(levels, word_bits, expected):
    assert codes_per_word(levels, word_bits) == expected
    assert levels**expected <= 2**word_bits < levels ** (expected + 1)


@pytest.mark.parametrize(("levels", "fmt", "bits"), [
    (3, PackingFormat.INT8_WORDS, 1.6), (4, PackingFormat.INT8_WORDS, 2.0), (5, PackingFormat.INT32_WORDS, 32 / 13),
    (16, PackingFormat.INT8_WORDS, 4.0), (17, PackingFormat.INT32_WORDS, 32 / 7), (257, PackingFormat.INT32_WORDS, 32 / 3),
    (3, PackingFormat.BITSTREAM, 46 / 29), (5, PackingFormat.BITSTREAM, 7 / 3), (17, PackingFormat.BITSTREAM, 45 / 11),
])
def test_bits_per_weight_of_each_format(levels, fmt, bits):
    assert PackedLayout(levels, fmt, 1000).bits_per_weight == pytest.approx(bits)
    assert bits_per_weight(levels, fmt) == pytest.approx(bits)


def test_word_formats_keep_their_order_among_themselves():
    # v1 callers that choose between the word formats: the denser one, ties to the smaller word.
    densest_word = {levels: min(WORD_FORMATS, key=lambda f: (bits_per_weight(levels, f), f.word_bits))
                    for levels in (3, 4, 5, 16, 17, 257)}
    assert densest_word == {3: PackingFormat.INT8_WORDS, 4: PackingFormat.INT8_WORDS, 5: PackingFormat.INT32_WORDS,
                            16: PackingFormat.INT8_WORDS, 17: PackingFormat.INT32_WORDS,
                            257: PackingFormat.INT32_WORDS}


def test_best_format_is_the_bitstream_which_is_never_less_dense():
    for levels in range(2, 2**16 + 1):
        assert best_format(levels) is PackingFormat.BITSTREAM
        bitstream = bits_per_weight(levels, PackingFormat.BITSTREAM)
        assert all(bitstream <= bits_per_weight(levels, fmt) for fmt in WORD_FORMATS), levels


def test_ternary_is_really_packed():
    layout = PackedLayout(3, PackingFormat.INT8_WORDS, 1_000_000)
    assert layout.nbytes == 200_000  # 1.6 bit per weight, not one byte per code


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        pack_codes(np.array([0, 5]), 5, PackingFormat.INT8_WORDS)


def test_unpack_checks_word_count_and_dtype_of_the_bitstream():
    stream = pack_codes(np.arange(100) % 5, 5, PackingFormat.BITSTREAM)
    assert stream.dtype == np.int8 and stream.size == 30  # 34 groups of 7 bits = 238 bits
    with pytest.raises(ValueError, match="expected 30 words of int8"):
        unpack_codes(stream[:-1], 5, PackingFormat.BITSTREAM, 100)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(stream.view(np.uint8), 5, PackingFormat.BITSTREAM, 100)


def test_unpack_checks_word_count_and_dtype():
    words = pack_codes(np.arange(10) % 3, 3, PackingFormat.INT8_WORDS)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(words.astype(np.int32), 3, PackingFormat.INT8_WORDS, 10)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(words, 3, PackingFormat.INT8_WORDS, 20)
