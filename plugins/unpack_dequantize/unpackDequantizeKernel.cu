#include "unpackDequantizeKernel.h"

#include "../common/lowbitFormat.h"

namespace lowbit
{
namespace
{
constexpr int kTHREADS_PER_BLOCK = 256;
// Grid-stride loop beyond this many blocks: keeps launches valid for huge weights without a 64-bit grid.
constexpr int64_t kMAX_BLOCKS = 65535;

template <typename Word>
__global__ void unpackDequantizeKernel(Word const* __restrict__ packed, uint16_t const* __restrict__ scaleFp16,
    float* __restrict__ out, int64_t numWords, int64_t numel, int64_t perChannel, uint32_t levels, int32_t qmin,
    int32_t codesPerWord)
{
    int64_t const stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t word = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; word < numWords; word += stride)
    {
        decodeWord(static_cast<uint32_t>(packed[word]), word * codesPerWord, numel, perChannel, levels, qmin,
            codesPerWord, scaleFp16, out);
    }
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
} // namespace

template <typename Word>
cudaError_t launchUnpackDequantize(Word const* packed, uint16_t const* scaleFp16, float* out, int64_t numel,
    int64_t channels, int32_t levels, int32_t qmin, int32_t codesPerWord, cudaStream_t stream)
{
    int64_t const numWords = (numel + codesPerWord - 1) / codesPerWord;
    int64_t blocks = (numWords + kTHREADS_PER_BLOCK - 1) / kTHREADS_PER_BLOCK;
    blocks = blocks < kMAX_BLOCKS ? blocks : kMAX_BLOCKS;
    unpackDequantizeKernel<Word><<<static_cast<unsigned>(blocks), kTHREADS_PER_BLOCK, 0, stream>>>(packed, scaleFp16,
        out, numWords, numel, numel / channels, static_cast<uint32_t>(levels), qmin, codesPerWord);
    return cudaGetLastError();
}

template <typename Word>
void unpackDequantizeHost(Word const* packed, uint16_t const* scaleFp16, float* out, int64_t numel, int64_t channels,
    int32_t levels, int32_t qmin, int32_t codesPerWord)
{
    int64_t const numWords = (numel + codesPerWord - 1) / codesPerWord;
    for (int64_t word = 0; word < numWords; ++word)
    {
        decodeWord(static_cast<uint32_t>(packed[word]), word * codesPerWord, numel, numel / channels,
            static_cast<uint32_t>(levels), qmin, codesPerWord, scaleFp16, out);
    }
}

template cudaError_t launchUnpackDequantize<uint8_t>(
    uint8_t const*, uint16_t const*, float*, int64_t, int64_t, int32_t, int32_t, int32_t, cudaStream_t);
template cudaError_t launchUnpackDequantize<uint32_t>(
    uint32_t const*, uint16_t const*, float*, int64_t, int64_t, int32_t, int32_t, int32_t, cudaStream_t);
template void unpackDequantizeHost<uint8_t>(
    uint8_t const*, uint16_t const*, float*, int64_t, int64_t, int32_t, int32_t, int32_t);
template void unpackDequantizeHost<uint32_t>(
    uint32_t const*, uint16_t const*, float*, int64_t, int64_t, int32_t, int32_t, int32_t);

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
    int const status = lowbit::validate(word_bits, numel, channels, levels, codes_per_word);
    if (status != 0)
    {
        return status;
    }
    if (packed == nullptr || scale_fp16 == nullptr || out == nullptr)
    {
        return LOWBIT_ERR_NULL_POINTER;
    }
    cudaError_t const error = word_bits == lowbit::kINT8_WORDS_WORD_BITS
        ? lowbit::launchUnpackDequantize(static_cast<uint8_t const*>(packed), scale_fp16, out, numel, channels,
            levels, qmin, codes_per_word, stream)
        : lowbit::launchUnpackDequantize(static_cast<uint32_t const*>(packed), scale_fp16, out, numel, channels,
            levels, qmin, codes_per_word, stream);
    return static_cast<int>(error);
}

int lowbit_unpack_dequantize_host(void const* packed, int word_bits, uint16_t const* scale_fp16, float* out,
    int64_t numel, int64_t channels, int levels, int qmin, int codes_per_word)
{
    int const status = lowbit::validate(word_bits, numel, channels, levels, codes_per_word);
    if (status != 0)
    {
        return status;
    }
    if (packed == nullptr || scale_fp16 == nullptr || out == nullptr)
    {
        return LOWBIT_ERR_NULL_POINTER;
    }
    if (word_bits == lowbit::kINT8_WORDS_WORD_BITS)
    {
        lowbit::unpackDequantizeHost(
            static_cast<uint8_t const*>(packed), scale_fp16, out, numel, channels, levels, qmin, codes_per_word);
    }
    else
    {
        lowbit::unpackDequantizeHost(
            static_cast<uint32_t const*>(packed), scale_fp16, out, numel, channels, levels, qmin, codes_per_word);
    }
    return 0;
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
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown lowbit error";
    }
}
}
