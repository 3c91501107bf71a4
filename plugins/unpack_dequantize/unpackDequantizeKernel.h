/*
 * lowbit::UnpackDequantize kernels: packed base-L codes + float16 per-channel scales -> dense float32 weight.
 * v1 (docs/ops/UnpackDequantize_v1.md): codes in int8/int32 words; v2 (docs/ops/UnpackDequantize_v2.md): codes in a
 * bit stream of B-bit groups. No TensorRT types here, so the kernels are testable on their own (through the C ABI
 * below with ctypes, also on machines without a GPU through the host path).
 */
#ifndef LOWBIT_UNPACK_DEQUANTIZE_KERNEL_H
#define LOWBIT_UNPACK_DEQUANTIZE_KERNEL_H

#include "../common/lowbitErrors.h"

#include <cstdint>
#include <cuda_runtime_api.h>

#ifdef __CUDACC__
#define LOWBIT_HOST_DEVICE __host__ __device__
#else
#define LOWBIT_HOST_DEVICE
#endif

namespace lowbit
{

//! Exact widening of IEEE binary16 bits to float32 (every half value is representable in float32). Done by hand
//! rather than through cuda_fp16 so that host and device share one definition and the host build needs no CUDA math.
LOWBIT_HOST_DEVICE inline float halfBitsToFloat(uint16_t bits)
{
    uint32_t const sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    uint32_t exponent = (bits >> 10) & 0x1Fu;
    uint32_t mantissa = bits & 0x3FFu;
    uint32_t out;
    if (exponent == 0x1Fu)
    {
        out = sign | 0x7F800000u | (mantissa << 13); // inf / nan, payload kept
    }
    else if (exponent != 0)
    {
        out = sign | ((exponent + 112u) << 23) | (mantissa << 13); // rebias 15 -> 127
    }
    else if (mantissa == 0)
    {
        out = sign; // signed zero
    }
    else
    {
        // Subnormal half: normalise; the value is a normal float32.
        exponent = 113u;
        while ((mantissa & 0x400u) == 0)
        {
            mantissa <<= 1;
            --exponent;
        }
        out = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
    }
    union
    {
        uint32_t u;
        float f;
    } pun{out};
    return pun.f;
}

//! Decodes the codes of one storage word (digits least significant first) into float32 weights.
//! One thread (device) or one loop iteration (host) per word; both run this exact function, so they cannot drift.
//! `firstIndex` is the flat weight index of digit 0; digits at indices >= numel are padding and skipped.
LOWBIT_HOST_DEVICE inline void decodeWord(uint32_t wordUnsigned, int64_t firstIndex, int64_t numel,
    int64_t perChannel, uint32_t levels, int32_t qmin, int32_t codesPerWord, uint16_t const* scaleFp16, float* out)
{
    for (int32_t digit = 0; digit < codesPerWord; ++digit)
    {
        int64_t const index = firstIndex + digit;
        if (index >= numel)
        {
            return;
        }
        int32_t const code = static_cast<int32_t>(wordUnsigned % levels);
        wordUnsigned /= levels;
        // A single float32 multiply of exactly representable operands: bit-identical to the torch reference.
        out[index] = static_cast<float>(code + qmin) * halfBitsToFloat(scaleFp16[index / perChannel]);
    }
}

//! Value of group `group` of a v2 bit stream: stream bits [group*B, (group+1)*B), little-endian (stream bit s is bit
//! s % 8 of byte s / 8). Read byte by byte because a group starts at any byte (no alignment for a wide load), and only
//! the bytes the group spans: the stream has no slack after its last byte (the numBytes bound is a second guard).
//! B <= kMAX_GROUP_BITS (56) keeps offset + B <= 63, so the at most 8 bytes fit one uint64_t.
LOWBIT_HOST_DEVICE inline uint64_t readBitstreamGroup(
    uint8_t const* stream, int64_t numBytes, int64_t group, int32_t groupBits)
{
    int64_t const bitStart = group * groupBits;
    int64_t const firstByte = bitStart >> 3;
    int32_t const offset = static_cast<int32_t>(bitStart & 7);
    int32_t const spanBytes = (offset + groupBits + 7) >> 3;
    uint64_t window = 0;
    for (int32_t byte = 0; byte < spanBytes && firstByte + byte < numBytes; ++byte)
    {
        window |= static_cast<uint64_t>(stream[firstByte + byte]) << (8 * byte);
    }
    return (window >> offset) & ((uint64_t{1} << groupBits) - 1);
}

//! Decodes flat weight `index` of a v2 bit stream: digit (index % g) of group (index / g), least significant first.
//! One thread (device) or one loop iteration (host) per output element; both run this exact function.
LOWBIT_HOST_DEVICE inline float decodeBitstreamElement(uint8_t const* stream, int64_t numBytes, int64_t index,
    int64_t perChannel, uint32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits,
    uint16_t const* scaleFp16)
{
    int64_t const group = index / groupSize;
    int32_t const digit = static_cast<int32_t>(index - group * groupSize);
    uint64_t place = 1; // levels^digit <= levels^(g-1) < 2^B: no overflow
    for (int32_t d = 0; d < digit; ++d)
    {
        place *= levels;
    }
    uint64_t const value = readBitstreamGroup(stream, numBytes, group, groupBits);
    int32_t const code = static_cast<int32_t>((value / place) % levels);
    // A single float32 multiply of exactly representable operands: bit-identical to the torch reference.
    return static_cast<float>(code + qmin) * halfBitsToFloat(scaleFp16[index / perChannel]);
}

//! Launches the decode on `stream`. Word is uint8_t (INT8 words) or uint32_t (INT32 words), read as unsigned.
template <typename Word>
cudaError_t launchUnpackDequantize(Word const* packed, uint16_t const* scaleFp16, float* out, int64_t numel,
    int64_t channels, int32_t levels, int32_t qmin, int32_t codesPerWord, cudaStream_t stream);

//! Same semantics on host memory (reference and CPU fallback).
template <typename Word>
void unpackDequantizeHost(Word const* packed, uint16_t const* scaleFp16, float* out, int64_t numel, int64_t channels,
    int32_t levels, int32_t qmin, int32_t codesPerWord);

//! v2: decodes the bit stream on `stream`, one thread per output element (coalesced float32 stores).
cudaError_t launchUnpackDequantizeBitstream(uint8_t const* packed, int64_t numBytes, uint16_t const* scaleFp16,
    float* out, int64_t numel, int64_t channels, int32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits,
    cudaStream_t stream);

//! v2 on host memory (reference and CPU fallback).
void unpackDequantizeBitstreamHost(uint8_t const* packed, int64_t numBytes, uint16_t const* scaleFp16, float* out,
    int64_t numel, int64_t channels, int32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits);

} // namespace lowbit

extern "C"
{
//! Mirror of the constants in lowbitFormat.h, for bindings that cannot parse C++ (ctypes).
typedef struct LowbitFormatConstants
{
    int32_t int8_words_format_id;
    int32_t int8_words_word_bits;
    int32_t int32_words_format_id;
    int32_t int32_words_word_bits;
    int32_t min_levels;
    int32_t max_levels;
    char const* op_name;
    char const* plugin_namespace;
    char const* op_version;
    // Appended for op v2 (bit stream); older fields keep their offsets.
    int32_t bitstream_format_id;
    int32_t bitstream_word_bits;
    int32_t max_group_bits;
    char const* bitstream_op_version;
} LowbitFormatConstants;

int lowbit_format_constants(LowbitFormatConstants* out);

//! Device pointers; `stream` is a cudaStream_t (0 = legacy default stream). Asynchronous.
int lowbit_unpack_dequantize_launch(void const* packed, int word_bits, uint16_t const* scale_fp16, float* out,
    int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word, cudaStream_t stream);

//! Host pointers; synchronous.
int lowbit_unpack_dequantize_host(void const* packed, int word_bits, uint16_t const* scale_fp16, float* out,
    int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word);

//! v2 (bit stream, docs/ops/UnpackDequantize_v2.md). `num_bytes` is the stream length, which must equal
//! ceil(ceil(numel / group_size) * group_bits / 8); group_size/group_bits must equal lowbit::bitstreamGroup(levels).
//! Device pointers; asynchronous on `stream`.
int lowbit_unpack_dequantize_bitstream_launch(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    float* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits,
    cudaStream_t stream);

//! v2, host pointers; synchronous.
int lowbit_unpack_dequantize_bitstream_host(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    float* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits);

//! lowbit::bitstreamGroup for bindings (lets tests check the C++ twin of packing.bitstream_group).
int lowbit_bitstream_group(int levels, int* group_size, int* group_bits);

}

#endif // LOWBIT_UNPACK_DEQUANTIZE_KERNEL_H
