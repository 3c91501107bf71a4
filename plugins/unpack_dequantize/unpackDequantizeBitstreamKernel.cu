// lowbit::UnpackDequantize v2 (docs/ops/UnpackDequantize_v2.md): the bit-stream decode, device and host, float32 or
// float16 output. The per-thread decode is unpackBitstreamThread in unpackDequantizeDecode.h, shared by both paths.
#include "unpackDequantizeKernel.h"

#include "../common/lowbitFormat.h"

namespace lowbit
{
namespace
{
// Thread t of a block decodes digit t % g of group t / g: neighbouring threads store neighbouring outputs
// (coalesced) and read the same few stream words (served by L1).
template <typename Index, typename Out>
__global__ void __launch_bounds__(kDECODE_THREADS) unpackDequantizeBitstreamKernel(BitstreamDecodePlan const plan,
    uint8_t const* __restrict__ packed, uint16_t const* __restrict__ scaleFp16, Out* __restrict__ out)
{
    unpackBitstreamThread<Index>(
        plan, packed, scaleFp16, out, static_cast<int64_t>(blockIdx.x), static_cast<int32_t>(threadIdx.x));
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

template <typename Out>
cudaError_t launchUnpackDequantizeBitstream(uint8_t const* packed, int64_t numBytes, uint16_t const* scaleFp16,
    Out* out, int64_t numel, int64_t channels, int32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits,
    cudaStream_t stream)
{
    BitstreamDecodePlan const plan
        = makeBitstreamPlan(numBytes, numel, channels, levels, qmin, groupSize, groupBits, kDECODE_MAX_BLOCKS);
    dim3 const blocks(static_cast<unsigned>(plan.grid.blocks));
    dim3 const threads(static_cast<unsigned>(plan.grid.blockThreads));
    withIndexType(plan.grid, false, [&](auto index) {
        unpackDequantizeBitstreamKernel<decltype(index), Out><<<blocks, threads, 0, stream>>>(
            plan, packed, scaleFp16, out);
        return 0;
    });
    return cudaGetLastError();
}

template <typename Out>
void unpackDequantizeBitstreamHost(uint8_t const* packed, int64_t numBytes, uint16_t const* scaleFp16, Out* out,
    int64_t numel, int64_t channels, int32_t levels, int32_t qmin, int32_t groupSize, int32_t groupBits,
    int64_t maxBlocks, bool wideIndex)
{
    BitstreamDecodePlan const plan
        = makeBitstreamPlan(numBytes, numel, channels, levels, qmin, groupSize, groupBits, maxBlocks);
    withIndexType(plan.grid, wideIndex, [&](auto index) {
        for (int64_t block = 0; block < plan.grid.blocks; ++block)
        {
            for (int32_t thread = 0; thread < plan.grid.blockThreads; ++thread)
            {
                unpackBitstreamThread<decltype(index)>(plan, packed, scaleFp16, out, block, thread);
            }
        }
        return 0;
    });
}

template cudaError_t launchUnpackDequantizeBitstream<float>(uint8_t const*, int64_t, uint16_t const*, float*, int64_t,
    int64_t, int32_t, int32_t, int32_t, int32_t, cudaStream_t);
template cudaError_t launchUnpackDequantizeBitstream<uint16_t>(uint8_t const*, int64_t, uint16_t const*, uint16_t*,
    int64_t, int64_t, int32_t, int32_t, int32_t, int32_t, cudaStream_t);
template void unpackDequantizeBitstreamHost<float>(uint8_t const*, int64_t, uint16_t const*, float*, int64_t,
    int64_t, int32_t, int32_t, int32_t, int32_t, int64_t, bool);
template void unpackDequantizeBitstreamHost<uint16_t>(uint8_t const*, int64_t, uint16_t const*, uint16_t*, int64_t,
    int64_t, int32_t, int32_t, int32_t, int32_t, int64_t, bool);

namespace
{
//! Validates, then runs the device launch (stream given) or the host path.
template <typename Out>
int dispatchBitstream(void const* packed, int64_t numBytes, uint16_t const* scaleFp16, Out* out, int64_t numel,
    int64_t channels, int levels, int qmin, int groupSize, int groupBits, bool onDevice, cudaStream_t stream,
    int64_t maxBlocks, bool wideIndex = false)
{
    int const status = checkBuffers(
        validateBitstream(numBytes, numel, channels, levels, groupSize, groupBits), packed, scaleFp16, out, maxBlocks);
    if (status != 0)
    {
        return status;
    }
    auto const* stream8 = static_cast<uint8_t const*>(packed);
    if (onDevice)
    {
        return static_cast<int>(launchUnpackDequantizeBitstream(
            stream8, numBytes, scaleFp16, out, numel, channels, levels, qmin, groupSize, groupBits, stream));
    }
    unpackDequantizeBitstreamHost(
        stream8, numBytes, scaleFp16, out, numel, channels, levels, qmin, groupSize, groupBits, maxBlocks, wideIndex);
    return 0;
}
} // namespace

} // namespace lowbit

extern "C"
{
int lowbit_unpack_dequantize_bitstream_launch(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    float* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits,
    cudaStream_t stream)
{
    return lowbit::dispatchBitstream(packed, num_bytes, scale_fp16, out, numel, channels, levels, qmin, group_size,
        group_bits, true, stream, lowbit::kDECODE_MAX_BLOCKS);
}

int lowbit_unpack_dequantize_bitstream_launch_fp16(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    uint16_t* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits,
    cudaStream_t stream)
{
    return lowbit::dispatchBitstream(packed, num_bytes, scale_fp16, out, numel, channels, levels, qmin, group_size,
        group_bits, true, stream, lowbit::kDECODE_MAX_BLOCKS);
}

int lowbit_unpack_dequantize_bitstream_host(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    float* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits)
{
    return lowbit::dispatchBitstream(packed, num_bytes, scale_fp16, out, numel, channels, levels, qmin, group_size,
        group_bits, false, nullptr, lowbit::kDECODE_MAX_BLOCKS);
}

int lowbit_unpack_dequantize_bitstream_host_fp16(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    uint16_t* out, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits)
{
    return lowbit::dispatchBitstream(packed, num_bytes, scale_fp16, out, numel, channels, levels, qmin, group_size,
        group_bits, false, nullptr, lowbit::kDECODE_MAX_BLOCKS);
}

int lowbit_unpack_dequantize_bitstream_host_grid(void const* packed, int64_t num_bytes, uint16_t const* scale_fp16,
    void* out, int out_fp16, int64_t numel, int64_t channels, int levels, int qmin, int group_size, int group_bits,
    int64_t max_blocks, int wide_index)
{
    return out_fp16 != 0
        ? lowbit::dispatchBitstream(packed, num_bytes, scale_fp16, static_cast<uint16_t*>(out), numel, channels,
            levels, qmin, group_size, group_bits, false, nullptr, max_blocks, wide_index != 0)
        : lowbit::dispatchBitstream(packed, num_bytes, scale_fp16, static_cast<float*>(out), numel, channels, levels,
            qmin, group_size, group_bits, false, nullptr, max_blocks, wide_index != 0);
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
