/*
 * Packing-format constants shared by every low-bit kernel and plugin.
 *
 * Mirrors lowbit_deploy/quant/packing.py (PackingFormat, MIN_LEVELS, MAX_LEVELS) and the op contract in
 * docs/ops/UnpackDequantize_v1.md. tests/unit/build/test_format_constants.py parses this file and checks every
 * value against the Python source of truth, so keep one `constexpr` per line in the form `NAME = VALUE;`.
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
};

constexpr int32_t kINT8_WORDS_FORMAT_ID = 0;
constexpr int32_t kINT8_WORDS_WORD_BITS = 8;
constexpr int32_t kINT32_WORDS_FORMAT_ID = 1;
constexpr int32_t kINT32_WORDS_WORD_BITS = 32;

constexpr int32_t kMIN_LEVELS = 2;
constexpr int32_t kMAX_LEVELS = 65536;

// Op identity: the same name, namespace and version in the ONNX node, the plugin creator and the engine.
constexpr char const* kUNPACK_DEQUANTIZE_NAME = "UnpackDequantize";
constexpr char const* kPLUGIN_NAMESPACE = "lowbit";
constexpr char const* kUNPACK_DEQUANTIZE_VERSION = "1";

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

} // namespace lowbit

#endif // LOWBIT_FORMAT_H
