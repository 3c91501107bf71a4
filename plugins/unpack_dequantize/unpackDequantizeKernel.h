/*
 * lowbit::UnpackDequantize kernels: packed base-L codes + float16 per-channel scales -> dense float32 weight, or the
 * same values rounded to nearest even to float16 (the fp16 output of a network that runs in half precision).
 * v1 (docs/ops/UnpackDequantize_v1.md): codes in int8/int32 words; v2 (docs/ops/UnpackDequantize_v2.md): codes in a
 * bit stream of B-bit groups. No TensorRT types here, so the kernels are testable on their own (through the C ABI
 * below with ctypes, also on machines without a GPU through the host path).
 */
#ifndef LOWBIT_UNPACK_DEQUANTIZE_KERNEL_H
#define LOWBIT_UNPACK_DEQUANTIZE_KERNEL_H

#include "../common/lowbitErrors.h"
#include "unpackDequantizeDecode.h"

#include <cstdint>
#include <cuda_runtime_api.h>

namespace lowbit
{

//! The checks every entry point makes after its version's own (`status`, 0 when they passed): buffers present and
//! a grid cap of at least one block. Returns the first failing code, or 0.
inline int checkBuffers(int status, void const* packed, void const* scaleFp16, void const* out, int64_t maxBlocks)
{
    if (status != 0)
    {
        return status;
    }
    if (packed == nullptr || scaleFp16 == nullptr || out == nullptr)
    {
        return LOWBIT_ERR_NULL_POINTER;
    }
    return maxBlocks < 1 ? LOWBIT_ERR_BAD_MAX_BLOCKS : 0;
}

//! Launches the v1 decode on `stream`. Word is uint8_t (INT8 words) or uint32_t (INT32 words), read as unsigned; Out
//! is float (float32 output) or uint16_t (float16 output, its bits). Arguments must already be valid.
template <typename Word, typename Out>
cudaError_t launchUnpackDequantize(Word const* packed, uint16_t const* scaleFp16, Out* out, int64_t numel,
    int64_t channels, int32_t levels, int32_t qmin, int32_t codesPerWord, cudaStream_t stream);

//! Same semantics on host memory (reference and CPU fallback): every thread of the same grid (capped at maxBlocks
//! blocks), one after the other, with the kernel's loop arithmetic (64-bit where wideIndex forces it).
template <typename Word, typename Out>
void unpackDequantizeHost(Word const* packed, uint16_t const* scaleFp16, Out* out, int64_t numel, int64_t channels,
    int32_t levels, int32_t qmin, int32_t codesPerWord, int64_t maxBlocks = kDECODE_MAX_BLOCKS,
    bool wideIndex = false);

//! v2: decodes the bit stream on `stream` (Out as above). Arguments must already be valid.
template <typename Out>
cudaError_t launchUnpackDequantizeBitstream(uint8_t const* packed, int64_t numBytes, uint16_t const* scaleFp16,
    Out* out, int64_t numel, int64_t channels, int32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits,
    cudaStream_t stream);

//! v2 on host memory (reference and CPU fallback), over the same grid capped at maxBlocks blocks.
template <typename Out>
void unpackDequantizeBitstreamHost(uint8_t const* packed, int64_t numBytes, uint16_t const* scaleFp16, Out* out,
    int64_t numel, int64_t channels, int32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits,
    int64_t maxBlocks = kDECODE_MAX_BLOCKS, bool wideIndex = false);

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

//! float16 output (IEEE binary16 bits): each value is the float32 output rounded to nearest, ties to even.
int lowbit_unpack_dequantize_launch_fp16(void const* packed, int word_bits, uint16_t const* scale_fp16, uint16_t* out,
    int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word, cudaStream_t stream);
int lowbit_unpack_dequantize_host_fp16(void const* packed, int word_bits, uint16_t const* scale_fp16, uint16_t* out,
    int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word);
int lowbit_unpack_dequantize_bitstream_launch_fp16(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    uint16_t* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits,
    cudaStream_t stream);
int lowbit_unpack_dequantize_bitstream_host_fp16(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    uint16_t* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits);

//! The host paths over a grid capped at `max_blocks` blocks (>= 1) instead of the launch default, float32
//! (`out_fp16` 0) or float16 output, and with 64-bit loop arithmetic where `wide_index` is non-zero (the kernels use
//! it only for weights of about 2^31 elements): lets tests run the kernels' grid-stride loops (several iterations per
//! thread, channel tracking across strides) and both index widths on small weights.
int lowbit_unpack_dequantize_host_grid(void const* packed, int word_bits, uint16_t const* scale_fp16, void* out,
    int out_fp16, int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word, int64_t max_blocks,
    int wide_index);
int lowbit_unpack_dequantize_bitstream_host_grid(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    void* out, int out_fp16, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits,
    int64_t max_blocks, int wide_index);

//! lowbit::bitstreamGroup for bindings (lets tests check the C++ twin of packing.bitstream_group).
int lowbit_bitstream_group(int levels, int* group_size, int* group_bits);

}

#endif // LOWBIT_UNPACK_DEQUANTIZE_KERNEL_H
