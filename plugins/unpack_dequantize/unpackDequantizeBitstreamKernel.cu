// lowbit::UnpackDequantize v2 (docs/ops/UnpackDequantize_v2.md): the bit-stream decode, device and host. The decode
// itself is decodeBitstreamElement in unpackDequantizeKernel.h, shared by both paths.
#include "unpackDequantizeKernel.h"

#include "../common/lowbitFormat.h"

namespace lowbit
{
namespace
{
constexpr int kTHREADS_PER_BLOCK = 256;
// Grid-stride loop beyond this many blocks: keeps launches valid for huge weights without a 64-bit grid.
constexpr int64_t kMAX_BLOCKS = 65535;

// One thread per output element: neighbouring threads store neighbouring floats (coalesced) and read the same few
// stream bytes (served by L1), which beats one thread per group whose g stores per thread are strided by g.
__global__ void unpackDequantizeBitstreamKernel(uint8_t const* __restrict__ packed, int64_t numBytes,
    uint16_t const* __restrict__ scaleFp16, float* __restrict__ out, int64_t numel, int64_t perChannel,
    uint32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits)
{
    int64_t const stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < numel; index += stride)
    {
        out[index] = decodeBitstreamElement(
            packed, numBytes, index, perChannel, levels, qmin, groupSize, groupBits, scaleFp16);
    }
}

int validateBitstream(int64_t numBytes, int64_t numel, int64_t channels, int levels, int groupSize, int groupBits)
{
    if (levels < kMIN_LEVELS || levels > kMAX_LEVELS)
    {
        return LOWBIT_ERR_BAD_LEVELS;
    }
    BitstreamGroup const group = bitstreamGroup(levels);
    if (groupSize != group.size || groupBits != group.bits)
    {
        return LOWBIT_ERR_BAD_GROUP;
    }
    if (numel < 1 || channels < 1 || numel % channels != 0)
    {
        return LOWBIT_ERR_BAD_SHAPE;
    }
    int64_t const numGroups = (numel + groupSize - 1) / groupSize;
    if (numBytes != (numGroups * groupBits + 7) / 8)
    {
        return LOWBIT_ERR_BAD_STREAM_BYTES;
    }
    return 0;
}
} // namespace

cudaError_t launchUnpackDequantizeBitstream(uint8_t const* packed, int64_t numBytes, uint16_t const* scaleFp16,
    float* out, int64_t numel, int64_t channels, int32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits,
    cudaStream_t stream)
{
    int64_t blocks = (numel + kTHREADS_PER_BLOCK - 1) / kTHREADS_PER_BLOCK;
    blocks = blocks < kMAX_BLOCKS ? blocks : kMAX_BLOCKS;
    unpackDequantizeBitstreamKernel<<<static_cast<unsigned>(blocks), kTHREADS_PER_BLOCK, 0, stream>>>(packed,
        numBytes, scaleFp16, out, numel, numel / channels, static_cast<uint32_t>(levels), qmin, groupSize, groupBits);
    return cudaGetLastError();
}

void unpackDequantizeBitstreamHost(uint8_t const* packed, int64_t numBytes, uint16_t const* scaleFp16, float* out,
    int64_t numel, int64_t channels, int32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits)
{
    int64_t const perChannel = numel / channels;
    for (int64_t index = 0; index < numel; ++index)
    {
        out[index] = decodeBitstreamElement(packed, numBytes, index, perChannel, static_cast<uint32_t>(levels), qmin,
            groupSize, groupBits, scaleFp16);
    }
}

} // namespace lowbit

extern "C"
{
int lowbit_unpack_dequantize_bitstream_launch(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    float* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits,
    cudaStream_t stream)
{
    int const status = lowbit::validateBitstream(num_bytes, numel, channels, levels, group_size, group_bits);
    if (status != 0)
    {
        return status;
    }
    if (packed == nullptr || scale_fp16 == nullptr || out == nullptr)
    {
        return LOWBIT_ERR_NULL_POINTER;
    }
    return static_cast<int>(lowbit::launchUnpackDequantizeBitstream(static_cast<uint8_t const*>(packed), num_bytes,
        scale_fp16, out, numel, channels, levels, qmin, group_size, group_bits, stream));
}

int lowbit_unpack_dequantize_bitstream_host(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    float* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits)
{
    int const status = lowbit::validateBitstream(num_bytes, numel, channels, levels, group_size, group_bits);
    if (status != 0)
    {
        return status;
    }
    if (packed == nullptr || scale_fp16 == nullptr || out == nullptr)
    {
        return LOWBIT_ERR_NULL_POINTER;
    }
    lowbit::unpackDequantizeBitstreamHost(static_cast<uint8_t const*>(packed), num_bytes, scale_fp16, out, numel,
        channels, levels, qmin, group_size, group_bits);
    return 0;
}

int lowbit_bitstream_group(int levels, int* group_size, int* group_bits)
{
    if (group_size == nullptr || group_bits == nullptr)
    {
        return LOWBIT_ERR_NULL_POINTER;
    }
    lowbit::BitstreamGroup const group = lowbit::bitstreamGroup(levels);
    if (group.size == 0)
    {
        return LOWBIT_ERR_BAD_LEVELS;
    }
    *group_size = group.size;
    *group_bits = group.bits;
    return 0;
}
}
