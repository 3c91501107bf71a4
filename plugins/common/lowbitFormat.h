/*
 * Packing-format constants shared by every low-bit kernel and plugin.
 *
 * Mirrors lowbit_deploy/quant/packing.py (PackingFormat, MIN_LEVELS, MAX_LEVELS, MAX_GROUP_BITS, bitstream_group)
 * and the op contracts in docs/ops/UnpackDequantize_v1.md (word formats), UnpackDequantize_v2.md (bit stream) and
 * QuantizeDequantizeActivation_v1.md. tests/unit/engines/test_format_constants.py and test_activation_plugin.py parse
 * this file and check every value against the Python source of truth, so keep one `constexpr` per line in the form
 * `NAME = VALUE;`.
 */
#ifndef LOWBIT_FORMAT_H
#define LOWBIT_FORMAT_H

#include <cstdint>

namespace lowbit
{

//! Stable ids of the storage words (PackingFormat.format_id).
enum class PackingFormatId : int32_t
{
    kINT8_WORDS = 0,  //!< codes packed as base-L digits into one signed byte (bit pattern of the unsigned byte)
    kINT32_WORDS = 1, //!< codes packed as base-L digits into one signed 32-bit word
    kBITSTREAM = 2,   //!< op v2: groups of g base-L digits in B bits, concatenated into a little-endian bit stream
};

constexpr int32_t kINT8_WORDS_FORMAT_ID = 0;
constexpr int32_t kINT8_WORDS_WORD_BITS = 8;
constexpr int32_t kINT32_WORDS_FORMAT_ID = 1;
constexpr int32_t kINT32_WORDS_WORD_BITS = 32;
constexpr int32_t kBITSTREAM_FORMAT_ID = 2;
constexpr int32_t kBITSTREAM_WORD_BITS = 8;
// A group plus its bit offset inside its first byte (< 8) fits one 64-bit load with bit 63 unused: 56 + 7 = 63.
constexpr int32_t kMAX_GROUP_BITS = 56;

constexpr int32_t kMIN_LEVELS = 2;
constexpr int32_t kMAX_LEVELS = 65536;

// Op identity: the same name, namespace and version in the ONNX node, the plugin creator and the engine.
constexpr char const* kUNPACK_DEQUANTIZE_NAME = "UnpackDequantize";
constexpr char const* kPLUGIN_NAMESPACE = "lowbit";
constexpr char const* kUNPACK_DEQUANTIZE_VERSION = "1";
constexpr char const* kUNPACK_DEQUANTIZE_BITSTREAM_VERSION = "2";
constexpr char const* kQUANTIZE_DEQUANTIZE_ACTIVATION_NAME = "QuantizeDequantizeActivation";
constexpr char const* kQUANTIZE_DEQUANTIZE_ACTIVATION_VERSION = "1";

// lowbit::QuantizeDequantizeActivation v1: the widest integer grid, qmax - qmin + 1 <= 65536.
constexpr int32_t kMAX_ACTIVATION_GRID_LEVELS = 65536;

//! Largest k with levels^k <= 2^wordBits (0 when levels is out of range); exact integer arithmetic like packing.py.
inline int32_t codesPerWord(int32_t levels, int32_t wordBits)
{
    if (levels < kMIN_LEVELS || levels > kMAX_LEVELS || wordBits < 1 || wordBits > 32)
    {
        return 0;
    }
    uint64_t const capacity = uint64_t{1} << wordBits;
    uint64_t power = 1;
    int32_t count = 0;
    while (power * static_cast<uint64_t>(levels) <= capacity)
    {
        power *= static_cast<uint64_t>(levels);
        ++count;
    }
    return count;
}

//! Group of the bit-stream format (op v2): `size` codes written in `bits` bits.
struct BitstreamGroup
{
    int32_t size;
    int32_t bits;
};

//! Twin of packing.bitstream_group: the smallest g minimising B/g, where B is the smallest bit count with
//! levels^g <= 2^B and B <= kMAX_GROUP_BITS ({0, 0} when levels is out of range). Exact integer arithmetic.
inline BitstreamGroup bitstreamGroup(int32_t levels)
{
    BitstreamGroup best{0, 0};
    if (levels < kMIN_LEVELS || levels > kMAX_LEVELS)
    {
        return best;
    }
    uint64_t const capacity = uint64_t{1} << kMAX_GROUP_BITS;
    uint64_t const base = static_cast<uint64_t>(levels);
    uint64_t power = base;
    for (int32_t size = 1;; ++size)
    {
        int32_t bits = 0; // smallest B with power <= 2^B, i.e. the bit length of power - 1
        for (uint64_t rest = power - 1; rest != 0; rest >>= 1)
        {
            ++bits;
        }
        if (best.size == 0 || static_cast<int64_t>(bits) * best.size < static_cast<int64_t>(best.bits) * size)
        {
            best = BitstreamGroup{size, bits};
        }
        if (power > capacity / base) // the next power would exceed 2^kMAX_GROUP_BITS (checked before overflowing)
        {
            return best;
        }
        power *= base;
    }
}

} // namespace lowbit

#endif // LOWBIT_FORMAT_H
