#include "quantizeDequantizeActivationKernel.h"

#include "../common/lowbitFormat.h"

namespace lowbit
{
namespace
{
constexpr int kTHREADS_PER_BLOCK = 256;
// Grid-stride loop beyond this many blocks: keeps launches valid for huge activations without a 64-bit grid.
constexpr int64_t kMAX_BLOCKS = 65535;

// Out: float (float32 output) or uint16_t (float16 bits: the float32 value rounded to nearest even).
template <typename Out>
__global__ void quantizeDequantizeActivationKernel(float const* __restrict__ x, float const* __restrict__ scale,
    int64_t const* __restrict__ stepIndex, float const* __restrict__ zeroPoint, Out* __restrict__ out, int64_t numel,
    int64_t perSample, int64_t steps, float qmin, float qmax)
{
    int64_t const stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < numel; index += stride)
    {
        float const value
            = quantizeDequantizeElement(x, scale, stepIndex, zeroPoint, index, perSample, steps, qmin, qmax);
        storeOutput(out + index, value);
    }
}

int validate(int64_t batch, int64_t perSample, int64_t steps, int qmin, int qmax)
{
    if (qmin >= qmax || static_cast<int64_t>(qmax) - qmin + 1 > kMAX_ACTIVATION_GRID_LEVELS)
    {
        return LOWBIT_ERR_BAD_GRID;
    }
    if (steps < 1)
    {
        return LOWBIT_ERR_BAD_STEPS;
    }
    // batch * perSample must not overflow: every extent of a TensorRT tensor fits int64 together with the others.
    if (batch < 0 || perSample < 0 || (perSample > 0 && batch > INT64_MAX / perSample))
    {
        return LOWBIT_ERR_BAD_ACTIVATION_SHAPE;
    }
    return 0;
}

int validatePointers(float const* x, float const* scale, int64_t const* stepIndex, void const* out, int64_t numel)
{
    // Nothing is read or written for an empty activation (a batch of 0), so its pointers may be null.
    if (numel > 0 && (x == nullptr || scale == nullptr || stepIndex == nullptr || out == nullptr))
    {
        return LOWBIT_ERR_NULL_POINTER;
    }
    return 0;
}
} // namespace

template <typename Out>
cudaError_t launchQuantizeDequantizeActivation(float const* x, float const* scale, int64_t const* stepIndex,
    float const* zeroPoint, Out* out, int64_t batch, int64_t perSample, int64_t steps, int32_t qmin, int32_t qmax,
    cudaStream_t stream)
{
    int64_t const numel = batch * perSample;
    if (numel == 0)
    {
        return cudaSuccess;
    }
    int64_t blocks = (numel + kTHREADS_PER_BLOCK - 1) / kTHREADS_PER_BLOCK;
    blocks = blocks < kMAX_BLOCKS ? blocks : kMAX_BLOCKS;
    quantizeDequantizeActivationKernel<Out><<<static_cast<unsigned>(blocks), kTHREADS_PER_BLOCK, 0, stream>>>(x, scale,
        stepIndex, zeroPoint, out, numel, perSample, steps, static_cast<float>(qmin), static_cast<float>(qmax));
    return cudaGetLastError();
}

template <typename Out>
void quantizeDequantizeActivationHost(float const* x, float const* scale, int64_t const* stepIndex,
    float const* zeroPoint, Out* out, int64_t batch, int64_t perSample, int64_t steps, int32_t qmin, int32_t qmax)
{
    int64_t const numel = batch * perSample;
    for (int64_t index = 0; index < numel; ++index)
    {
        storeOutput(out + index, quantizeDequantizeElement(x, scale, stepIndex, zeroPoint, index, perSample, steps,
                                     static_cast<float>(qmin), static_cast<float>(qmax)));
    }
}


template <typename Out>
int dispatchActivation(float const* x, float const* scale, int64_t const* stepIndex, float const* zeroPoint, Out* out,
    int64_t batch, int64_t perSample, int64_t steps, int qmin, int qmax, bool onDevice, cudaStream_t stream)
{
    int status = validate(batch, perSample, steps, qmin, qmax);
    if (status == 0)
    {
        status = validatePointers(x, scale, stepIndex, out, batch * perSample);
    }
    if (status != 0)
    {
        return status;
    }
    if (onDevice)
    {
        return static_cast<int>(launchQuantizeDequantizeActivation(
            x, scale, stepIndex, zeroPoint, out, batch, perSample, steps, qmin, qmax, stream));
    }
    quantizeDequantizeActivationHost(x, scale, stepIndex, zeroPoint, out, batch, perSample, steps, qmin, qmax);
    return 0;
}
} // namespace lowbit

extern "C"
{
int lowbit_quantize_dequantize_activation_launch(float const* x, float const* scale, int64_t const* step_index,
    float const* zero_point, float* out, int64_t batch, int64_t per_sample, int64_t steps, int qmin, int qmax,
    cudaStream_t stream)
{
    return lowbit::dispatchActivation(
        x, scale, step_index, zero_point, out, batch, per_sample, steps, qmin, qmax, true, stream);
}

int lowbit_quantize_dequantize_activation_launch_fp16(float const* x, float const* scale, int64_t const* step_index,
    float const* zero_point, uint16_t* out, int64_t batch, int64_t per_sample, int64_t steps, int qmin, int qmax,
    cudaStream_t stream)
{
    return lowbit::dispatchActivation(
        x, scale, step_index, zero_point, out, batch, per_sample, steps, qmin, qmax, true, stream);
}

int lowbit_quantize_dequantize_activation_host(float const* x, float const* scale, int64_t const* step_index,
    float const* zero_point, float* out, int64_t batch, int64_t per_sample, int64_t steps, int qmin, int qmax)
{
    return lowbit::dispatchActivation(
        x, scale, step_index, zero_point, out, batch, per_sample, steps, qmin, qmax, false, nullptr);
}

int lowbit_quantize_dequantize_activation_host_fp16(float const* x, float const* scale, int64_t const* step_index,
    float const* zero_point, uint16_t* out, int64_t batch, int64_t per_sample, int64_t steps, int qmin, int qmax)
{
    return lowbit::dispatchActivation(
        x, scale, step_index, zero_point, out, batch, per_sample, steps, qmin, qmax, false, nullptr);
}
}
