/*
 * lowbit::QuantizeDequantizeActivation v1 (docs/ops/QuantizeDequantizeActivation_v1.md): fake-quantizes a float32
 * activation onto an integer grid [qmin, qmax] with a step size (and optional zero point) chosen per sample by the
 * denoising step index. No TensorRT types here, so the kernel is testable on its own (through the C ABI below with
 * ctypes, also on machines without a GPU through the host path).
 */
#ifndef LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_KERNEL_H
#define LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_KERNEL_H

#include "../common/halfPrecision.h"
#include "../common/lowbitErrors.h"
#include "../common/lowbitFormat.h"

#include <cmath>
#include <cstdint>
#include <cuda_runtime_api.h>

#ifdef __CUDACC__
#define LOWBIT_QDQ_HOST_DEVICE __host__ __device__
#else
#define LOWBIT_QDQ_HOST_DEVICE
#endif

namespace lowbit
{

//! The quiet NaN written for a sample whose step index is outside [0, T) (the kernel cannot raise).
LOWBIT_QDQ_HOST_DEVICE inline float activationIndexErrorValue()
{
    union
    {
        uint32_t u;
        float f;
    } pun{0x7FC00000u};
    return pun.f;
}

// One correctly rounded float32 operation each, on host and device alike. On the device the _rn intrinsics also keep
// nvcc from contracting the subtract and multiply into an FMA (one rounding instead of two: not the reference).
LOWBIT_QDQ_HOST_DEVICE inline float qdqDivide(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

LOWBIT_QDQ_HOST_DEVICE inline float qdqAdd(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

LOWBIT_QDQ_HOST_DEVICE inline float qdqSubtract(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

LOWBIT_QDQ_HOST_DEVICE inline float qdqMultiply(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

//! Output element `index` (flat, row-major): sample b = index / perSample, i = stepIndex[b],
//! y = (clamp(rint(x / scale[i]) + z[i], qmin, qmax) - z[i]) * scale[i], z = 0 without a zero point.
//! One thread (device) or one loop iteration (host) per element; both run this exact function, so they cannot drift.
LOWBIT_QDQ_HOST_DEVICE inline float quantizeDequantizeElement(float const* x, float const* scale,
    int64_t const* stepIndex, float const* zeroPoint, int64_t index, int64_t perSample, int64_t steps, float qmin,
    float qmax)
{
    int64_t const step = stepIndex[index / perSample];
    if (step < 0 || step >= steps)
    {
        return activationIndexErrorValue();
    }
    float const s = scale[step];
    // Added even when it is 0: -0 + 0 = +0, as the reference (which adds a zero array) computes.
    float const z = zeroPoint != nullptr ? zeroPoint[step] : 0.0F;
    // rintf rounds half to even in the default rounding mode (torch.round, np.round).
    float q = qdqAdd(rintf(qdqDivide(x[index], s)), z);
    // min(max(q, qmin), qmax) with NaN propagating like torch/numpy (fmaxf/fminf would turn a NaN into a bound).
    q = q < qmin ? qmin : q;
    q = q > qmax ? qmax : q;
    return qdqMultiply(qdqSubtract(q, z), s);
}

//! Launches the op on `stream`, one thread per output element (grid-stride). `zeroPoint` may be null.
//! Out: float (float32 output) or uint16_t (float16 bits, the float32 value rounded to nearest even).
template <typename Out>
cudaError_t launchQuantizeDequantizeActivation(float const* x, float const* scale, int64_t const* stepIndex,
    float const* zeroPoint, Out* out, int64_t batch, int64_t perSample, int64_t steps, int32_t qmin, int32_t qmax,
    cudaStream_t stream);

//! Same semantics on host memory (reference and CPU fallback).
template <typename Out>
void quantizeDequantizeActivationHost(float const* x, float const* scale, int64_t const* stepIndex,
    float const* zeroPoint, Out* out, int64_t batch, int64_t perSample, int64_t steps, int32_t qmin, int32_t qmax);

} // namespace lowbit

extern "C"
{
//! Device pointers; `zero_point` may be null (symmetric grid); `stream` is a cudaStream_t (0 = legacy default
//! stream). Asynchronous. x and out hold batch * per_sample float32, step_index batch int64, scale and zero_point
//! `steps` float32. A step index outside [0, steps) makes that sample's output NaN.
int lowbit_quantize_dequantize_activation_launch(float const* x, float const* scale, int64_t const* step_index,
    float const* zero_point, float* out, int64_t batch, int64_t per_sample, int64_t steps, int qmin, int qmax,
    cudaStream_t stream);

//! Host pointers; synchronous.
int lowbit_quantize_dequantize_activation_host(float const* x, float const* scale, int64_t const* step_index,
    float const* zero_point, float* out, int64_t batch, int64_t per_sample, int64_t steps, int qmin, int qmax);

//! float16 output (IEEE binary16 bits): each value is the float32 output rounded to nearest, ties to even.
int lowbit_quantize_dequantize_activation_launch_fp16(float const* x, float const* scale, int64_t const* step_index,
    float const* zero_point, uint16_t* out, int64_t batch, int64_t per_sample, int64_t steps, int qmin, int qmax,
    cudaStream_t stream);
int lowbit_quantize_dequantize_activation_host_fp16(float const* x, float const* scale, int64_t const* step_index,
    float const* zero_point, uint16_t* out, int64_t batch, int64_t per_sample, int64_t steps, int qmin, int qmax);
}

#endif // LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_KERNEL_H
