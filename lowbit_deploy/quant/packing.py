"""Packed storage of integer weight codes: the one source of truth for every packing format.

A weight tensor quantized onto a grid with ``L`` levels (``q in [qmin, qmin + L - 1]``) is stored as *codes*
``c = q - qmin`` in ``[0, L)``. Codes are read in row-major order of the weight (output channel first) and grouped
``g`` at a time; a group is one base-``L`` integer, least significant digit first::

    group_value = c[g*i + 0] * L**0 + c[g*i + 1] * L**1 + ... + c[g*i + g-1] * L**(g-1)

The last group is padded with code 0. Two ways of storing the groups exist (:class:`PackingFormat`):

* word formats (op version 1): one group per storage word, ``g = floor(log_L 2**word_bits)``;
* the bit stream (op version 2): groups of ``B`` bits concatenated into a little-endian bit stream, with ``g`` chosen
  per ``L`` by :func:`bitstream_group` so the stored bits per weight come within 1% of ``log2(L)`` for L = 3..17.

Storage is always a *signed* integer array holding the unsigned bit pattern (TensorRT keeps INT8 and INT32
initializers as they are but widens UINT8 to INT32, see shared/docs/TENSORRT.md), so a reader reinterprets it as
unsigned before extracting digits. Decoding digit ``j`` of a group: ``c = (group_value // L**j) % L``.

The C++/CUDA constants in ``plugins/common/lowbitFormat.h`` mirror :class:`PackingFormat` and
:func:`bitstream_group`; unit tests keep them equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Callable

import numpy as np


class PackingFormat(str, Enum):
    """How the base-``L`` code groups are stored.

    ``INT8_WORDS``  -- ``k = floor(log_L(2**8))`` codes per byte, stored as ONNX/TensorRT INT8 (bit pattern of the
    unsigned byte). Ternary (L=3): 5 codes/byte = 1.6 bit/weight; L=4: 4 codes/byte = 2 bit/weight.
    ``INT32_WORDS`` -- ``k = floor(log_L(2**32))`` codes per 32-bit word, stored as INT32 (bit pattern of the
    unsigned word). L=5: 13 codes/word = 2.46 bit/weight; L=17: 7 codes/word = 4.57 bit/weight.
    ``BITSTREAM``   -- op version 2. ``(g, B) = bitstream_group(L)``: ``g`` codes form one base-``L`` group value
    (first code = least significant digit) written in ``B = ceil(g * log2 L)`` bits, the smallest ``B`` with
    ``L**g <= 2**B``. Group ``i`` occupies bits ``[i*B, (i+1)*B)`` of a little-endian bit stream: stream bit ``s``
    is bit ``s % 8`` (value ``2**(s % 8)``) of byte ``s // 8``, and the group value's bit ``t`` is stream bit
    ``i*B + t``. The stream is ``ceil(ceil(numel/g) * B / 8)`` bytes, stored as INT8 holding the unsigned byte
    pattern; the last group is padded with code 0 and the last byte with 0 bits. ``g`` is the smallest group size
    minimising ``B/g`` subject to ``B <= MAX_GROUP_BITS`` (56), so a group plus its bit offset inside its first
    byte (at most 7) spans at most 63 bits: one unaligned little-endian 64-bit load of 8 bytes holds it, and that
    load with bit 63 cleared is a non-negative int64 (what the ONNX reference computes in). ``L = 2**b`` gives
    ``g = 1, B = b``. L=3: g=29, B=46, 1.586 bit/weight; L=5: g=3, B=7, 2.333; L=9: g=17, B=54, 3.176;
    L=17: g=11, B=45, 4.091 (each within 0.5% of log2 L; the full table is in docs/ops/UnpackDequantize_v2.md).
    """

    INT8_WORDS = "int8_words"
    INT32_WORDS = "int32_words"
    BITSTREAM = "bitstream"

    @property
    def word_bits(self) -> int:
        """Bits of one storage element (the word; a byte of the stream for BITSTREAM)."""
        return _WORD_BITS[self]

    @property
    def numpy_dtype(self) -> type[np.signedinteger]:
        return _NUMPY_DTYPES[self]

    @property
    def format_id(self) -> int:
        """Stable integer id, also used by the C++/CUDA side (``lowbit::PackingFormatId``)."""
        return _FORMAT_IDS[self]


_WORD_BITS = {PackingFormat.INT8_WORDS: 8, PackingFormat.INT32_WORDS: 32, PackingFormat.BITSTREAM: 8}
_NUMPY_DTYPES = {PackingFormat.INT8_WORDS: np.int8, PackingFormat.INT32_WORDS: np.int32,
                 PackingFormat.BITSTREAM: np.int8}
_FORMAT_IDS = {PackingFormat.INT8_WORDS: 0, PackingFormat.INT32_WORDS: 1, PackingFormat.BITSTREAM: 2}
_UNSIGNED_DTYPES = {8: np.uint8, 32: np.uint32}
# Word formats: one group per word. BITSTREAM: groups straddle bytes.
WORD_FORMATS = (PackingFormat.INT8_WORDS, PackingFormat.INT32_WORDS)

MIN_LEVELS = 2
MAX_LEVELS = 2**16
# A group plus its bit offset (< 8) must fit one 64-bit load with bit 63 unused: 56 + 7 = 63.
MAX_GROUP_BITS = 56
_STREAM_WINDOW_BYTES = 8


def codes_per_word(levels: int, word_bits: int) -> int:
    """Largest ``k`` with ``levels**k <= 2**word_bits`` (exact integer arithmetic, no logarithms)."""
    _check_levels(levels)
    capacity = 2**word_bits
    count, power = 0, 1
    while power * levels <= capacity:
        power *= levels
        count += 1
    return count


@lru_cache(maxsize=None)
def bitstream_group(levels: int) -> tuple[int, int]:
    """``(g, B)`` of :attr:`PackingFormat.BITSTREAM`: the smallest ``g`` minimising ``B/g`` where ``B`` is the
    smallest bit count with ``levels**g <= 2**B`` and ``B <= MAX_GROUP_BITS``. Exact integer arithmetic; the C++
    twin is ``lowbit::bitstreamGroup`` in plugins/common/lowbitFormat.h."""
    _check_levels(levels)
    best_size, best_bits = 0, 0
    size, power = 1, levels
    while power <= 2**MAX_GROUP_BITS:
        bits = (power - 1).bit_length()  # smallest B with power <= 2**B
        if best_size == 0 or bits * best_size < best_bits * size:  # strictly fewer bits per code
            best_size, best_bits = size, bits
        size, power = size + 1, power * levels
    return best_size, best_bits


def _word_group(word_bits: int) -> Callable[[int], tuple[int, int]]:
    return lambda levels: (codes_per_word(levels, word_bits), word_bits)


# (codes per group, bits per group) of each format.
_GROUPINGS: dict[PackingFormat, Callable[[int], tuple[int, int]]] = {
    PackingFormat.INT8_WORDS: _word_group(8),
    PackingFormat.INT32_WORDS: _word_group(32),
    PackingFormat.BITSTREAM: bitstream_group,
}
# Ties in bits per weight: the bit stream first (never less dense), then the smaller word (less padding).
_PREFERENCE = {PackingFormat.BITSTREAM: 0, PackingFormat.INT8_WORDS: 1, PackingFormat.INT32_WORDS: 2}


def bits_per_weight(levels: int, fmt: PackingFormat) -> float:
    """Stored bits per weight of ``fmt`` for large tensors (padding of the last group ignored); inf if none fit."""
    size, bits = _GROUPINGS[fmt](levels)
    return bits / size if size else float("inf")


def best_format(levels: int) -> PackingFormat:
    """The format with the fewest stored bits per weight: always BITSTREAM (op version 2), which is never less
    dense than a word format because ``g = k`` is one of the group sizes it considers."""
    return min(PackingFormat, key=lambda fmt: (bits_per_weight(levels, fmt), _PREFERENCE[fmt]))


@dataclass(frozen=True)
class PackedLayout:
    """Everything a reader needs to decode one packed tensor."""

    levels: int
    fmt: PackingFormat
    numel: int

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"{self.levels} levels do not fit one {self.fmt.word_bits}-bit word; use INT32_WORDS "
                             "or BITSTREAM")

    @property
    def group_size(self) -> int:
        """``g``: codes per group (per word for the word formats)."""
        return _GROUPINGS[self.fmt](self.levels)[0]

    @property
    def group_bits(self) -> int:
        """``B``: stored bits per group (the word width for the word formats)."""
        return _GROUPINGS[self.fmt](self.levels)[1]

    @property
    def codes_per_word(self) -> int:
        """``k`` of the word formats (op version 1); BITSTREAM has groups instead, see :attr:`group_size`."""
        if self.fmt not in WORD_FORMATS:
            raise ValueError(f"{self.fmt.name} has no words; use group_size and group_bits")
        return self.group_size

    @property
    def num_groups(self) -> int:
        return -(-self.numel // self.group_size)

    @property
    def num_words(self) -> int:
        """Length of the packed array: words, or bytes of the stream for BITSTREAM."""
        return -(-self.num_groups * self.group_bits // self.fmt.word_bits)

    @property
    def bits_per_weight(self) -> float:
        return self.group_bits / self.group_size

    @property
    def nbytes(self) -> int:
        return self.num_words * self.fmt.word_bits // 8


def _check_levels(levels: int) -> None:
    if not MIN_LEVELS <= levels <= MAX_LEVELS:
        raise ValueError(f"levels={levels} is out of range [{MIN_LEVELS}, {MAX_LEVELS}]")


def _digit_groups(codes: np.ndarray, layout: PackedLayout) -> np.ndarray:
    """``[num_groups]`` uint64 group values (Horner over the ``g`` digit columns, vectorised over groups)."""
    padded = np.zeros(layout.num_groups * layout.group_size, dtype=np.uint64)
    padded[: codes.size] = codes
    digits = padded.reshape(layout.num_groups, layout.group_size)
    values = np.zeros(layout.num_groups, dtype=np.uint64)
    for digit in reversed(range(layout.group_size)):
        values = values * np.uint64(layout.levels) + digits[:, digit]
    return values


def _split_digits(values: np.ndarray, layout: PackedLayout) -> np.ndarray:
    """Inverse of :func:`_digit_groups`: the first ``numel`` codes as int64."""
    values = values.astype(np.uint64)  # a copy: peeled in place below
    digits = np.empty((values.size, layout.group_size), dtype=np.int64)
    levels = np.uint64(layout.levels)
    for digit in range(layout.group_size):
        digits[:, digit] = values % levels
        values //= levels
    return digits.reshape(-1)[: layout.numel]


def _pack_words(codes: np.ndarray, layout: PackedLayout) -> np.ndarray:
    values = _digit_groups(codes, layout)
    return values.astype(_UNSIGNED_DTYPES[layout.fmt.word_bits]).view(layout.fmt.numpy_dtype)


def _unpack_words(words: np.ndarray, layout: PackedLayout) -> np.ndarray:
    return _split_digits(words.view(_UNSIGNED_DTYPES[layout.fmt.word_bits]), layout)


def _pack_bitstream(codes: np.ndarray, layout: PackedLayout) -> np.ndarray:
    group_bits = layout.group_bits
    bit_start = np.arange(layout.num_groups, dtype=np.uint64) * np.uint64(group_bits)
    first_byte = (bit_start >> np.uint64(3)).astype(np.int64)
    # value << offset stays below 2**63 (B <= 56, offset <= 7), so it lies in the 8 bytes from first_byte.
    shifted = _digit_groups(codes, layout) << (bit_start & np.uint64(7))
    touched_bytes = (group_bits + 7 + 7) // 8
    stream = np.zeros(layout.num_words + _STREAM_WINDOW_BYTES, dtype=np.float64)
    for byte in range(touched_bytes):
        byte_values = (shifted >> np.uint64(8 * byte)) & np.uint64(0xFF)
        # Groups own disjoint bits, so summing the parts that land in one byte is OR-ing them (sums stay <= 255;
        # float64 holds them exactly). bincount is the vectorised scatter-add.
        stream += np.bincount(first_byte + byte, weights=byte_values.astype(np.float64), minlength=stream.size)
    return stream[: layout.num_words].astype(np.uint8).view(np.int8)


def _unpack_bitstream(stream: np.ndarray, layout: PackedLayout) -> np.ndarray:
    padded = np.zeros(layout.num_words + _STREAM_WINDOW_BYTES, dtype=np.uint8)
    padded[: layout.num_words] = stream.view(np.uint8)
    bit_start = np.arange(layout.num_groups, dtype=np.int64) * layout.group_bits
    windows = np.lib.stride_tricks.sliding_window_view(padded, _STREAM_WINDOW_BYTES)[bit_start >> 3]
    loads = np.ascontiguousarray(windows).view("<u8").reshape(-1)  # little-endian 64-bit load per group
    mask = np.uint64((1 << layout.group_bits) - 1)
    values = (loads >> (bit_start & 7).astype(np.uint64)) & mask
    return _split_digits(values, layout)


_PACKERS: dict[PackingFormat, Callable[[np.ndarray, PackedLayout], np.ndarray]] = {
    PackingFormat.INT8_WORDS: _pack_words,
    PackingFormat.INT32_WORDS: _pack_words,
    PackingFormat.BITSTREAM: _pack_bitstream,
}
_UNPACKERS: dict[PackingFormat, Callable[[np.ndarray, PackedLayout], np.ndarray]] = {
    PackingFormat.INT8_WORDS: _unpack_words,
    PackingFormat.INT32_WORDS: _unpack_words,
    PackingFormat.BITSTREAM: _unpack_bitstream,
}


def pack_codes(codes: np.ndarray, levels: int, fmt: PackingFormat) -> np.ndarray:
    """Pack integer codes in ``[0, levels)`` (any shape, read row-major) into a 1-D array of ``fmt`` words (the
    INT8 byte stream for BITSTREAM)."""
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= levels):
        raise ValueError(f"codes must lie in [0, {levels}); got [{flat.min()}, {flat.max()}]")
    layout = PackedLayout(levels, fmt, flat.size)
    return _PACKERS[fmt](flat.astype(np.uint64), layout)


def unpack_codes(words: np.ndarray, levels: int, fmt: PackingFormat, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: a 1-D int64 array of ``numel`` codes in ``[0, levels)``."""
    layout = PackedLayout(levels, fmt, numel)
    words = np.asarray(words)
    if words.dtype != fmt.numpy_dtype or words.shape != (layout.num_words,):
        raise ValueError(
            f"expected {layout.num_words} words of {np.dtype(fmt.numpy_dtype).name} for {numel} codes, "
            f"got {words.shape} {words.dtype}"
        )
    return _UNPACKERS[fmt](words, layout)


def pack_bitstream(codes: np.ndarray, levels: int) -> np.ndarray:
    """:func:`pack_codes` for :attr:`PackingFormat.BITSTREAM`: the INT8 bit stream of op version 2."""
    return pack_codes(codes, levels, PackingFormat.BITSTREAM)


def unpack_bitstream(stream: np.ndarray, levels: int, numel: int) -> np.ndarray:
    """:func:`unpack_codes` for :attr:`PackingFormat.BITSTREAM`."""
    return unpack_codes(stream, levels, PackingFormat.BITSTREAM, numel)
