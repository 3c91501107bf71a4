/*
 * The decode of lowbit::UnpackDequantize v1 (word formats) and v2 (bit stream), shared by the CUDA kernels and the
 * host path: one function per GPU thread (unpackWordsThread, unpackBitstreamThread) that the kernel runs once per
 * thread and the host path runs for every thread of the same grid, so both write the same values by construction.
 *
 * Memory layout of the work: thread t of a block always decodes digit t % u of unit t / u (u = codes per word, or
 * codes per bit-stream group), and a block covers whole units, so consecutive threads write consecutive outputs
 * (coalesced stores), each thread keeps its digit for the whole grid-stride loop, and the per-element work is a
 * handful of integer multiplies: no division by levels or by the channel length inside the loop.
 *
 * Digits without division (Lemire's "fastmod", generalised to one digit): with D = L^(d+1) and M = ceil(2^W / D),
 * the low W bits of M * n are (n mod D) / D in 0.W fixed point (exact for n < 2^(W/2), D <= 2^(W/2)), and multiplying
 * that fraction by L keeps the integer part digit d = floor(n / L^d) mod L. W = 64 for 32-bit words, W = 128 for
 * bit-stream groups (< 2^56). Exact for every n, also for values a corrupt stream may hold (n >= L^g).
 */
#ifndef LOWBIT_UNPACK_DEQUANTIZE_DECODE_H
#define LOWBIT_UNPACK_DEQUANTIZE_DECODE_H

#include "../common/halfPrecision.h"

#include <cstdint>
#include <cstring>
#include <utility>

namespace lowbit
{

//! Threads per block before rounding down to whole words/groups (blockThreads = unit * (kDECODE_THREADS / unit)).
constexpr int32_t kDECODE_THREADS = 256;
//! Default grid cap: about four waves of 256-thread blocks on the largest GPUs; threads loop beyond it.
constexpr int64_t kDECODE_MAX_BLOCKS = 4096;
//! Largest digit count of one unit: 32 codes per 32-bit word, and a bit-stream group has at most 56 one-bit codes.
constexpr int32_t kMAX_WORD_DIGITS = 32;
constexpr int32_t kMAX_GROUP_DIGITS = 56;

//! High 64 bits of the 128-bit product a * b.
LOWBIT_HOST_DEVICE inline uint64_t mulHigh64(uint64_t a, uint64_t b)
{
#ifdef __CUDA_ARCH__
    return __umul64hi(a, b);
#else
    return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

//! Digit d of a 32-bit word: floor(word / L^d) mod L, with magic = ceil(2^64 / L^(d+1)).
LOWBIT_HOST_DEVICE inline uint32_t wordDigit(uint32_t word, uint64_t magic, uint32_t levels)
{
    uint64_t const fraction = magic * word; // (word mod L^(d+1)) / L^(d+1), 0.64 fixed point
    return static_cast<uint32_t>(mulHigh64(fraction, levels));
}

//! Digit d of a bit-stream group value < 2^56: floor(value / L^d) mod L, with magic = ceil(2^128 / L^(d+1)).
LOWBIT_HOST_DEVICE inline uint32_t groupDigit(uint64_t value, uint64_t magicLow, uint64_t magicHigh, uint32_t levels)
{
    // fraction = magic * value mod 2^128 = (high, low), 0.128 fixed point; the digit is floor(fraction * L / 2^128).
    uint64_t const low = magicLow * value;
    uint64_t const high = magicHigh * value + mulHigh64(magicLow, value);
    uint64_t const carryIn = mulHigh64(low, levels);
    uint64_t const middle = high * levels;
    uint64_t const sum = middle + carryIn;
    return static_cast<uint32_t>(mulHigh64(high, levels) + (sum < middle ? 1u : 0u));
}

//! Grid of one decode launch and the loop strides derived from it (element stride = blocks * blockThreads, split
//! into whole channels plus a remainder so a thread follows its channel without dividing).
struct DecodeGrid
{
    int64_t numel;
    int64_t perChannel;
    int32_t unit;         //!< codes per word (v1) or per group (v2): one block covers whole units
    int32_t blockThreads; //!< unit * (kDECODE_THREADS / unit)
    int64_t blocks;
    int64_t strideChannels;
    int64_t strideWithin;
    bool narrowIndex; //!< numel + stride <= INT32_MAX: every loop quantity fits int32_t
};

inline DecodeGrid makeDecodeGrid(int64_t numel, int64_t channels, int32_t unit, int64_t maxBlocks)
{
    DecodeGrid grid{};
    grid.numel = numel;
    grid.perChannel = numel / channels;
    grid.unit = unit;
    grid.blockThreads = unit * (kDECODE_THREADS / unit > 0 ? kDECODE_THREADS / unit : 1);
    int64_t const needed = (numel + grid.blockThreads - 1) / grid.blockThreads;
    grid.blocks = needed < maxBlocks ? needed : (maxBlocks > 0 ? maxBlocks : 1);
    int64_t const stride = grid.blocks * grid.blockThreads;
    grid.strideChannels = stride / grid.perChannel;
    grid.strideWithin = stride - grid.strideChannels * grid.perChannel;
    grid.narrowIndex = numel + stride <= INT32_MAX;
    return grid;
}

//! log2(levels) when levels is a power of two, else 0 (shift-and-mask digits instead of the multiply).
inline int32_t powerOfTwoBits(uint32_t levels)
{
    int32_t bits = 0;
    while ((uint32_t{1} << bits) < levels && bits < 31)
    {
        ++bits;
    }
    return (uint32_t{1} << bits) == levels ? bits : 0;
}

//! Everything a v1 thread needs, computed once per launch on the host and passed to the kernel by value.
struct WordDecodePlan
{
    DecodeGrid grid;
    uint32_t levels;
    int32_t qmin;
    int32_t levelBits;                        //!< log2(levels) for powers of two, else 0
    uint64_t remainderMagic[kMAX_WORD_DIGITS]; //!< ceil(2^64 / L^(d+1)) per digit d < codes per word
};

//! Arguments must already be valid (codesPerWord = lowbit::codesPerWord(levels, wordBits) >= 1).
inline WordDecodePlan makeWordPlan(
    int64_t numel, int64_t channels, int32_t levels, int32_t qmin, int32_t codesPerWord, int64_t maxBlocks)
{
    WordDecodePlan plan{};
    plan.grid = makeDecodeGrid(numel, channels, codesPerWord, maxBlocks);
    plan.levels = static_cast<uint32_t>(levels);
    plan.qmin = qmin;
    plan.levelBits = powerOfTwoBits(plan.levels);
    uint64_t power = 1;
    for (int32_t digit = 0; digit < codesPerWord && digit < kMAX_WORD_DIGITS; ++digit)
    {
        power *= plan.levels; // L^(d+1) <= 2^32
        plan.remainderMagic[digit] = UINT64_MAX / power + 1;
    }
    return plan;
}

//! Everything a v2 thread needs (see WordDecodePlan).
struct BitstreamDecodePlan
{
    DecodeGrid grid;
    int64_t numBytes;
    uint32_t levels;
    int32_t qmin;
    int32_t groupBits;
    int32_t levelBits;
    uint64_t remainderMagicLow[kMAX_GROUP_DIGITS]; //!< ceil(2^128 / L^(d+1)) per digit d < group size, low half
    uint64_t remainderMagicHigh[kMAX_GROUP_DIGITS];
};

//! Arguments must already be valid ({groupSize, groupBits} = lowbit::bitstreamGroup(levels), numBytes consistent).
inline BitstreamDecodePlan makeBitstreamPlan(int64_t numBytes, int64_t numel, int64_t channels, int32_t levels,
    int32_t qmin, int32_t groupSize, int32_t groupBits, int64_t maxBlocks)
{
    BitstreamDecodePlan plan{};
    plan.grid = makeDecodeGrid(numel, channels, groupSize, maxBlocks);
    plan.numBytes = numBytes;
    plan.levels = static_cast<uint32_t>(levels);
    plan.qmin = qmin;
    plan.groupBits = groupBits;
    plan.levelBits = powerOfTwoBits(plan.levels);
    unsigned __int128 power = 1;
    for (int32_t digit = 0; digit < groupSize && digit < kMAX_GROUP_DIGITS; ++digit)
    {
        power *= plan.levels; // L^(d+1) <= 2^56
        unsigned __int128 const magic = ~static_cast<unsigned __int128>(0) / power + 1;
        plan.remainderMagicLow[digit] = static_cast<uint64_t>(magic);
        plan.remainderMagicHigh[digit] = static_cast<uint64_t>(magic >> 64);
    }
    return plan;
}

//! 32 bits at byte offset `byte` of a 4-byte-aligned stream (little-endian, like the stream's bit order).
LOWBIT_HOST_DEVICE inline uint32_t loadAligned32(uint8_t const* stream, int64_t byte)
{
#ifdef __CUDA_ARCH__
    return *reinterpret_cast<uint32_t const*>(stream + byte);
#else
    uint32_t word;
    memcpy(&word, stream + byte, sizeof(word)); // host: little-endian targets (x86-64, AArch64)
    return word;
#endif
}

//! Value of group `group` of a v2 bit stream: stream bits [group*B, (group+1)*B), little-endian (stream bit s is bit
//! s % 8 of byte s / 8). Three aligned 32-bit loads where the stream is 4-byte aligned and they stay inside it (the
//! group plus its offset in the first word spans at most 31 + 56 = 87 bits); else byte by byte, only the bytes the
//! group spans (the stream has no slack after its last byte). B <= 56.
LOWBIT_HOST_DEVICE inline uint64_t readBitstreamGroup(
    uint8_t const* stream, int64_t numBytes, int64_t group, int32_t groupBits)
{
    int64_t const bitStart = group * groupBits;
    uint64_t const mask = (uint64_t{1} << groupBits) - 1;
    int64_t const alignedByte = (bitStart >> 3) & ~int64_t{3};
    if ((reinterpret_cast<uintptr_t>(stream) & 3u) == 0 && alignedByte + 12 <= numBytes)
    {
        int32_t const offset = static_cast<int32_t>(bitStart - alignedByte * 8); // < 32
        uint64_t const low = loadAligned32(stream, alignedByte)
            | (static_cast<uint64_t>(loadAligned32(stream, alignedByte + 4)) << 32);
        uint64_t value = low >> offset;
        if (offset + groupBits > 64)
        {
            value |= static_cast<uint64_t>(loadAligned32(stream, alignedByte + 8)) << (64 - offset);
        }
        return value & mask;
    }
    int64_t const firstByte = bitStart >> 3;
    int32_t const offset = static_cast<int32_t>(bitStart & 7);
    int32_t const spanBytes = (offset + groupBits + 7) >> 3;
    uint64_t window = 0;
    for (int32_t byte = 0; byte < spanBytes && firstByte + byte < numBytes; ++byte)
    {
        window |= static_cast<uint64_t>(stream[firstByte + byte]) << (8 * byte);
    }
    return (window >> offset) & mask;
}

//! A thread's grid-stride loop: its current element, that element's word/group, channel and offset in the channel,
//! and the strides, in Index arithmetic (int32_t where DecodeGrid::narrowIndex allows, else int64_t). The digit is
//! fixed for the whole loop; the channel follows by adding the stride (strideWithin < perChannel: at most one
//! carry), instead of dividing each element index by the channel length.
template <typename Index>
struct ThreadLoop
{
    LOWBIT_HOST_DEVICE ThreadLoop(DecodeGrid const& grid, int64_t block, int32_t thread)
    {
        int32_t const unitInBlock = thread / grid.unit;
        digit = thread - unitInBlock * grid.unit;
        unitIndex = static_cast<Index>(block * (grid.blockThreads / grid.unit) + unitInBlock);
        index = static_cast<Index>(block * grid.blockThreads + thread); // == unitIndex * unit + digit
        numel = static_cast<Index>(grid.numel);
        perChannel = static_cast<Index>(grid.perChannel);
        channel = index / perChannel;
        within = index - channel * perChannel;
        strideElements = static_cast<Index>(grid.blocks * grid.blockThreads);
        strideUnits = static_cast<Index>(grid.blocks * (grid.blockThreads / grid.unit));
        strideChannels = static_cast<Index>(grid.strideChannels);
        strideWithin = static_cast<Index>(grid.strideWithin);
    }

    LOWBIT_HOST_DEVICE bool active() const
    {
        return index < numel;
    }

    LOWBIT_HOST_DEVICE void next()
    {
        index += strideElements;
        unitIndex += strideUnits;
        channel += strideChannels;
        within += strideWithin;
        if (within >= perChannel)
        {
            within -= perChannel;
            ++channel;
        }
    }

    int32_t digit;
    Index unitIndex;
    Index index;
    Index channel;
    Index within;
    Index numel;
    Index perChannel;
    Index strideElements;
    Index strideUnits;
    Index strideChannels;
    Index strideWithin;
};

//! A float16 scale as float32 (exact). The device uses the hardware conversion, one instruction instead of
//! halfBitsToFloat's branches: the same value for every non-NaN scale (a NaN scale gives NaN outputs either way).
LOWBIT_HOST_DEVICE inline float scaleToFloat(uint16_t bits)
{
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(bits));
#else
    return halfBitsToFloat(bits);
#endif
}

//! One thread of the v1 decode (Word: uint8_t or uint32_t, read as unsigned; Out: float or uint16_t half bits).
template <typename Index, typename Word, typename Out>
LOWBIT_HOST_DEVICE inline void unpackWordsThread(WordDecodePlan const& plan, Word const* packed,
    uint16_t const* scaleFp16, Out* out, int64_t block, int32_t thread)
{
    ThreadLoop<Index> loop(plan.grid, block, thread);
    uint64_t const magic = plan.remainderMagic[loop.digit];
    int32_t const shift = loop.digit * plan.levelBits;
    for (; loop.active(); loop.next())
    {
        uint32_t const word = static_cast<uint32_t>(packed[loop.unitIndex]);
        uint32_t const code
            = plan.levelBits != 0 ? (word >> shift) & (plan.levels - 1u) : wordDigit(word, magic, plan.levels);
        // A single float32 multiply of exactly representable operands: bit-identical to the torch reference.
        float const value
            = static_cast<float>(static_cast<int32_t>(code) + plan.qmin) * scaleToFloat(scaleFp16[loop.channel]);
        storeOutput(out + loop.index, value);
    }
}

//! One thread of the v2 decode (Out: float or uint16_t half bits).
template <typename Index, typename Out>
LOWBIT_HOST_DEVICE inline void unpackBitstreamThread(BitstreamDecodePlan const& plan, uint8_t const* packed,
    uint16_t const* scaleFp16, Out* out, int64_t block, int32_t thread)
{
    ThreadLoop<Index> loop(plan.grid, block, thread);
    uint64_t const magicLow = plan.remainderMagicLow[loop.digit];
    uint64_t const magicHigh = plan.remainderMagicHigh[loop.digit];
    for (; loop.active(); loop.next())
    {
        uint64_t const group = readBitstreamGroup(packed, plan.numBytes, loop.unitIndex, plan.groupBits);
        // Powers of two use one code per group (g = 1), so the digit is the group value itself.
        uint32_t const code = plan.levelBits != 0 ? static_cast<uint32_t>(group) & (plan.levels - 1u)
                                                  : groupDigit(group, magicLow, magicHigh, plan.levels);
        float const value
            = static_cast<float>(static_cast<int32_t>(code) + plan.qmin) * scaleToFloat(scaleFp16[loop.channel]);
        storeOutput(out + loop.index, value);
    }
}

//! Runs `body(Index{})` with Index = int32_t when the grid allows 32-bit loop arithmetic and `wide` is false, else
//! int64_t: kernels and host paths pick their instantiation the same way.
template <typename Body>
inline auto withIndexType(DecodeGrid const& grid, bool wide, Body&& body)
{
    return grid.narrowIndex && !wide ? body(int32_t{}) : body(int64_t{});
}

} // namespace lowbit

#endif // LOWBIT_UNPACK_DEQUANTIZE_DECODE_H
