// lowbit::UnpackDequantize v1 (docs/ops/UnpackDequantize_v1.md): the word-format decode, device and host, float32 or
// float16 output. The per-thread decode is unpackWordsThread in unpackDequantizeDecode.h, shared by both paths.
#include "unpackDequantizeKernel.h"

#include "../common/lowbitFormat.h"

namespace lowbit
{
namespace
{
// Thread t of a block decodes digit t % k of word t / k (see unpackDequantizeDecode.h): neighbouring threads store
// neighbouring outputs (coalesced), and the k threads of a word read it once from L1.
template <typename Index, typename Word, typename Out>
__global__ void __launch_bounds__(kDECODE_THREADS) unpackDequantizeKernel(WordDecodePlan const plan,
    Word const* __restrict__ packed, uint16_t const* __restrict__ scaleFp16, Out* __restrict__ out)
{
    unpackWordsThread<Index>(
        plan, packed, scaleFp16, out, static_cast<int64_t>(blockIdx.x), static_cast<int32_t>(threadIdx.x));
}

int validate(int wordBits, int64_t numel, int64_t channels, int levels, int codesPerWord)
{
    if (wordBits != kINT8_WORDS_WORD_BITS && wordBits != kINT32_WORDS_WORD_BITS)
    {
        return LOWBIT_ERR_BAD_WORD_BITS;
    }
    if (levels < kMIN_LEVELS || levels > kMAX_LEVELS)
    {
        return LOWBIT_ERR_BAD_LEVELS;
    }
    if (codesPerWord < 1 || codesPerWord != lowbit::codesPerWord(levels, wordBits))
    {
        return LOWBIT_ERR_BAD_CODES_PER_WORD;
    }
    if (numel < 1 || channels < 1 || numel % channels != 0)
    {
        return LOWBIT_ERR_BAD_SHAPE;
    }
    return 0;
}

//! Validates, then runs the device launch (stream given) or the host path, for either word width.
template <typename Out>
int dispatch(void const* packed, int wordBits, uint16_t const* scaleFp16, Out* out, int64_t numel, int64_t channels,
    int levels, int qmin, int codesPerWord, bool onDevice, cudaStream_t stream, int64_t maxBlocks,
    bool wideIndex = false)
{
    int const status
        = checkBuffers(validate(wordBits, numel, channels, levels, codesPerWord), packed, scaleFp16, out, maxBlocks);
    if (status != 0)
    {
        return status;
    }
    bool const bytes = wordBits == kINT8_WORDS_WORD_BITS;
    if (onDevice)
    {
        cudaError_t const error = bytes
            ? launchUnpackDequantize(static_cast<uint8_t const*>(packed), scaleFp16, out, numel, channels, levels, qmin,
                codesPerWord, stream)
            : launchUnpackDequantize(static_cast<uint32_t const*>(packed), scaleFp16, out, numel, channels, levels,
                qmin, codesPerWord, stream);
        return static_cast<int>(error);
    }
    if (bytes)
    {
        unpackDequantizeHost(static_cast<uint8_t const*>(packed), scaleFp16, out, numel, channels, levels, qmin,
            codesPerWord, maxBlocks, wideIndex);
    }
    else
    {
        unpackDequantizeHost(static_cast<uint32_t const*>(packed), scaleFp16, out, numel, channels, levels, qmin,
            codesPerWord, maxBlocks, wideIndex);
    }
    return 0;
}
} // namespace

template <typename Word, typename Out>
cudaError_t launchUnpackDequantize(Word const* packed, uint16_t const* scaleFp16, Out* out, int64_t numel,
    int64_t channels, int32_t levels, int32_t qmin, int32_t codesPerWord, cudaStream_t stream)
{
    WordDecodePlan const plan = makeWordPlan(numel, channels, levels, qmin, codesPerWord, kDECODE_MAX_BLOCKS);
    dim3 const blocks(static_cast<unsigned>(plan.grid.blocks));
    dim3 const threads(static_cast<unsigned>(plan.grid.blockThreads));
    withIndexType(plan.grid, false, [&](auto index) {
        unpackDequantizeKernel<decltype(index), Word, Out>
            <<<blocks, threads, 0, stream>>>(plan, packed, scaleFp16, out);
        return 0;
    });
    return cudaGetLastError();
}

template <typename Word, typename Out>
void unpackDequantizeHost(Word const* packed, uint16_t const* scaleFp16, Out* out, int64_t numel, int64_t channels,
    int32_t levels, int32_t qmin, int32_t codesPerWord, int64_t maxBlocks, bool wideIndex)
{
    WordDecodePlan const plan = makeWordPlan(numel, channels, levels, qmin, codesPerWord, maxBlocks);
    withIndexType(plan.grid, wideIndex, [&](auto index) {
        for (int64_t block = 0; block < plan.grid.blocks; ++block)
        {
            for (int32_t thread = 0; thread < plan.grid.blockThreads; ++thread)
            {
                unpackWordsThread<decltype(index)>(plan, packed, scaleFp16, out, block, thread);
            }
        }
        return 0;
    });
}

template cudaError_t launchUnpackDequantize<uint8_t, float>(
    uint8_t const*, uint16_t const*, float*, int64_t, int64_t, int32_t, int32_t, int32_t, cudaStream_t);
template cudaError_t launchUnpackDequantize<uint32_t, float>(
    uint32_t const*, uint16_t const*, float*, int64_t, int64_t, int32_t, int32_t, int32_t, cudaStream_t);
template cudaError_t launchUnpackDequantize<uint8_t, uint16_t>(
    uint8_t const*, uint16_t const*, uint16_t*, int64_t, int64_t, int32_t, int32_t, int32_t, cudaStream_t);
template cudaError_t launchUnpackDequantize<uint32_t, uint16_t>(
    uint32_t const*, uint16_t const*, uint16_t*, int64_t, int64_t, int32_t, int32_t, int32_t, cudaStream_t);
template void unpackDequantizeHost<uint8_t, float>(
    uint8_t const*, uint16_t const*, float*, int64_t, int64_t, int32_t, int32_t, int32_t, int64_t, bool);
template void unpackDequantizeHost<uint32_t, float>(
    uint32_t const*, uint16_t const*, float*, int64_t, int64_t, int32_t, int32_t, int32_t, int64_t, bool);
template void unpackDequantizeHost<uint8_t, uint16_t>(
    uint8_t const*, uint16_t const*, uint16_t*, int64_t, int64_t, int32_t, int32_t, int32_t, int64_t, bool);
template void unpackDequantizeHost<uint32_t, uint16_t>(
    uint32_t const*, uint16_t const*, uint16_t*, int64_t, int64_t, int32_t, int32_t, int32_t, int64_t, bool);

} // namespace lowbit

extern "C"
{
int lowbit_format_constants(LowbitFormatConstants* out)
{
    if (out == nullptr)
    {
        return LOWBIT_ERR_NULL_POINTER;
    }
    *out = LowbitFormatConstants{lowbit::kINT8_WORDS_FORMAT_ID, lowbit::kINT8_WORDS_WORD_BITS,
        lowbit::kINT32_WORDS_FORMAT_ID, lowbit::kINT32_WORDS_WORD_BITS, lowbit::kMIN_LEVELS, lowbit::kMAX_LEVELS,
        lowbit::kUNPACK_DEQUANTIZE_NAME, lowbit::kPLUGIN_NAMESPACE, lowbit::kUNPACK_DEQUANTIZE_VERSION,
        lowbit::kBITSTREAM_FORMAT_ID, lowbit::kBITSTREAM_WORD_BITS, lowbit::kMAX_GROUP_BITS,
        lowbit::kUNPACK_DEQUANTIZE_BITSTREAM_VERSION};
    return 0;
}

int lowbit_unpack_dequantize_launch(void const* packed, int word_bits, uint16_t const* scale_fp16, float* out,
    int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word, cudaStream_t stream)
{
    return lowbit::dispatch(packed, word_bits, scale_fp16, out, numel, channels, levels, qmin, codes_per_word, true,
        stream, lowbit::kDECODE_MAX_BLOCKS);
}

int lowbit_unpack_dequantize_launch_fp16(void const* packed, int word_bits, uint16_t const* scale_fp16, uint16_t* out,
    int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word, cudaStream_t stream)
{
    return lowbit::dispatch(packed, word_bits, scale_fp16, out, numel, channels, levels, qmin, codes_per_word, true,
        stream, lowbit::kDECODE_MAX_BLOCKS);
}

int lowbit_unpack_dequantize_host(void const* packed, int word_bits, uint16_t const* scale_fp16, float* out,
    int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word)
{
    return lowbit::dispatch(packed, word_bits, scale_fp16, out, numel, channels, levels, qmin, codes_per_word, false,
        nullptr, lowbit::kDECODE_MAX_BLOCKS);
}

int lowbit_unpack_dequantize_host_fp16(void const* packed, int word_bits, uint16_t const* scale_fp16, uint16_t* out,
    int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word)
{
    return lowbit::dispatch(packed, word_bits, scale_fp16, out, numel, channels, levels, qmin, codes_per_word, false,
        nullptr, lowbit::kDECODE_MAX_BLOCKS);
}

int lowbit_unpack_dequantize_host_grid(void const* packed, int word_bits, uint16_t const* scale_fp16, void* out,
    int out_fp16, int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word, int64_t max_blocks,
    int wide_index)
{
    return out_fp16 != 0
        ? lowbit::dispatch(packed, word_bits, scale_fp16, static_cast<uint16_t*>(out), numel, channels, levels, qmin,
            codes_per_word, false, nullptr, max_blocks, wide_index != 0)
        : lowbit::dispatch(packed, word_bits, scale_fp16, static_cast<float*>(out), numel, channels, levels, qmin,
            codes_per_word, false, nullptr, max_blocks, wide_index != 0);
}

char const* lowbit_error_string(int code)
{
    switch (code)
    {
    case 0: return "success";
    case LOWBIT_ERR_BAD_WORD_BITS: return "word_bits must be 8 or 32";
    case LOWBIT_ERR_BAD_LEVELS: return "levels out of range [2, 65536]";
    case LOWBIT_ERR_BAD_CODES_PER_WORD: return "codes_per_word is not the largest k with levels^k <= 2^word_bits";
    case LOWBIT_ERR_BAD_SHAPE: return "numel and channels must be positive and channels must divide numel";
    case LOWBIT_ERR_NULL_POINTER: return "null pointer argument";
    case LOWBIT_ERR_BAD_GROUP: return "group_size/group_bits differ from the bit-stream group of these levels";
    case LOWBIT_ERR_BAD_STREAM_BYTES: return "num_bytes is not ceil(ceil(numel / group_size) * group_bits / 8)";
    case LOWBIT_ERR_BAD_GRID: return "the grid needs qmin < qmax and qmax - qmin + 1 <= 65536";
    case LOWBIT_ERR_BAD_STEPS: return "the step table (scale, zero_point) needs at least one entry";
    case LOWBIT_ERR_BAD_ACTIVATION_SHAPE: return "batch and per_sample must be >= 0 with batch * per_sample in int64";
    case LOWBIT_ERR_BAD_MAX_BLOCKS: return "max_blocks must be at least 1";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown lowbit error";
    }
}
}
