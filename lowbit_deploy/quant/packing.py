"""Packed storage of integer weight codes: the one source of truth for every packing format.

A weight tensor quantized onto a grid with ``L`` levels (``q in [qmin, qmin + L - 1]``) is stored as *codes*
``c = q - qmin`` in ``[0, L)``. Codes are written in row-major order of the weight (output channel first) and
grouped ``k`` at a time into one storage word, as the digits of a base-``L`` number, least significant first::

    word = c[k*i + 0] * L**0 + c[k*i + 1] * L**1 + ... + c[k*i + k-1] * L**(k-1)

``k`` is the largest count with ``L**k <= 2**word_bits``, so no word overflows. The last word is padded with code 0.
Words are stored as signed integers of the same width holding the same bit pattern (TensorRT keeps INT8 and INT32
initializers as they are but widens UINT8 to INT32, see shared/docs/TENSORRT.md), so a reader reinterprets them as
unsigned before extracting digits. Decoding digit ``j``: ``c = (word_unsigned // L**j) % L``.

The C++/CUDA constants in ``plugins/common/lowbitFormat.h`` mirror :class:`PackingFormat`; a unit test keeps them equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class PackingFormat(str, Enum):
    """Storage word of the base-``L`` packed codes.

    ``INT8_WORDS``  -- ``k = floor(log_L(2**8))`` codes per byte, stored as ONNX/TensorRT INT8 (bit pattern of the
    unsigned byte). Ternary (L=3): 5 codes/byte = 1.6 bit/weight; L=4: 4 codes/byte = 2 bit/weight.
    ``INT32_WORDS`` -- ``k = floor(log_L(2**32))`` codes per 32-bit word, stored as INT32 (bit pattern of the
    unsigned word). L=5: 13 codes/word = 2.46 bit/weight; L=17: 7 codes/word = 4.57 bit/weight.
    """

    INT8_WORDS = "int8_words"
    INT32_WORDS = "int32_words"

    @property
    def word_bits(self) -> int:
        return _WORD_BITS[self]

    @property
    def numpy_dtype(self) -> type[np.signedinteger]:
        return _NUMPY_DTYPES[self]

    @property
    def format_id(self) -> int:
        """Stable integer id, also used by the C++/CUDA side (``lowbit::PackingFormatId``)."""
        return _FORMAT_IDS[self]


_WORD_BITS = {PackingFormat.INT8_WORDS: 8, PackingFormat.INT32_WORDS: 32}
_NUMPY_DTYPES = {PackingFormat.INT8_WORDS: np.int8, PackingFormat.INT32_WORDS: np.int32}
_FORMAT_IDS = {PackingFormat.INT8_WORDS: 0, PackingFormat.INT32_WORDS: 1}

MIN_LEVELS = 2
MAX_LEVELS = 2**16


def codes_per_word(levels: int, word_bits: int) -> int:
    """Largest ``k`` with ``levels**k <= 2**word_bits`` (exact integer arithmetic, no logarithms)."""
    _check_levels(levels)
    capacity = 2**word_bits
    count, power = 0, 1
    while power * levels <= capacity:
        power *= levels
        count += 1
    return count


def best_format(levels: int) -> PackingFormat:
    """The format with the fewest stored bits per weight; ties go to the smaller word (less padding)."""
    return min(PackingFormat, key=lambda fmt: (fmt.word_bits / max(codes_per_word(levels, fmt.word_bits), 1e-9),
                                               fmt.word_bits))


@dataclass(frozen=True)
class PackedLayout:
    """Everything a reader needs to decode one packed tensor."""

    levels: int
    fmt: PackingFormat
    numel: int

    def __post_init__(self) -> None:
        if self.codes_per_word < 1:
            raise ValueError(f"{self.levels} levels do not fit one {self.fmt.word_bits}-bit word; use INT32_WORDS")

    @property
    def codes_per_word(self) -> int:
        return codes_per_word(self.levels, self.fmt.word_bits)

    @property
    def num_words(self) -> int:
        return -(-self.numel // self.codes_per_word)

    @property
    def bits_per_weight(self) -> float:
        return self.fmt.word_bits / self.codes_per_word

    @property
    def nbytes(self) -> int:
        return self.num_words * self.fmt.word_bits // 8


def _check_levels(levels: int) -> None:
    if not MIN_LEVELS <= levels <= MAX_LEVELS:
        raise ValueError(f"levels={levels} is out of range [{MIN_LEVELS}, {MAX_LEVELS}]")


def pack_codes(codes: np.ndarray, levels: int, fmt: PackingFormat) -> np.ndarray:
    """Pack integer codes in ``[0, levels)`` (any shape, read row-major) into a 1-D array of ``fmt`` words."""
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= levels):
        raise ValueError(f"codes must lie in [0, {levels}); got [{flat.min()}, {flat.max()}]")
    layout = PackedLayout(levels, fmt, flat.size)
    per_word = layout.codes_per_word
    padded = np.zeros(layout.num_words * per_word, dtype=np.uint64)
    padded[: flat.size] = flat
    digits = padded.reshape(layout.num_words, per_word)
    powers = np.array([levels**j for j in range(per_word)], dtype=np.uint64)
    words_unsigned = (digits * powers).sum(axis=1, dtype=np.uint64)
    unsigned_dtype = np.uint8 if fmt.word_bits == 8 else np.uint32
    return words_unsigned.astype(unsigned_dtype).view(fmt.numpy_dtype)


def unpack_codes(words: np.ndarray, levels: int, fmt: PackingFormat, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: a 1-D int64 array of ``numel`` codes in ``[0, levels)``."""
    layout = PackedLayout(levels, fmt, numel)
    words = np.asarray(words)
    if words.dtype != fmt.numpy_dtype or words.shape != (layout.num_words,):
        raise ValueError(
            f"expected {layout.num_words} words of {np.dtype(fmt.numpy_dtype).name} for {numel} codes, "
            f"got {words.shape} {words.dtype}"
        )
    unsigned_dtype = np.uint8 if fmt.word_bits == 8 else np.uint32
    words_unsigned = words.view(unsigned_dtype).astype(np.uint64)
    powers = np.array([levels**j for j in range(layout.codes_per_word)], dtype=np.uint64)
    digits = (words_unsigned[:, None] // powers[None, :]) % np.uint64(levels)
    return digits.reshape(-1)[:numel].astype(np.int64)
