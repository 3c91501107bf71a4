/*
 * float16 <-> float32 for the low-bit kernels, host and device alike: the exact widening of a float16 scale, and the
 * float16 output of a kernel (its float32 value rounded to nearest, ties to even). No TensorRT types.
 */
#ifndef LOWBIT_HALF_PRECISION_H
#define LOWBIT_HALF_PRECISION_H

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_fp16.h>
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
    float value;
    memcpy(&value, &out, sizeof(value));
    return value;
}

//! float32 -> IEEE binary16 bits, rounded to nearest, ties to even (overflow to infinity, gradual underflow), as
//! numpy's astype(float16); a NaN keeps its sign and top payload bits and stays a NaN. The host path's fp16 output.
inline uint16_t floatToHalfBits(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    uint16_t const sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    uint32_t const exponent = (bits >> 23) & 0xFFu;
    uint32_t const mantissa = bits & 0x7FFFFFu;
    if (exponent == 0xFFu)
    {
        uint16_t const nan = static_cast<uint16_t>(0x7C00u | (mantissa >> 13));
        return static_cast<uint16_t>(sign | (mantissa == 0 ? 0x7C00u : (nan == 0x7C00u ? 0x7C01u : nan)));
    }
    if (exponent >= 143u) // |value| >= 2^16: beyond the largest half even before rounding
    {
        return static_cast<uint16_t>(sign | 0x7C00u);
    }
    uint32_t significand;
    uint32_t shift;
    uint32_t base;
    if (exponent <= 112u) // |value| < 2^-14: a half subnormal (or zero), in units of 2^-24
    {
        if (exponent < 102u) // < 2^-25: rounds to zero
        {
            return sign;
        }
        significand = 0x800000u | mantissa;
        shift = 126u - exponent; // 14 .. 24
        base = 0;
    }
    else
    {
        significand = mantissa;
        shift = 13u;
        base = (exponent - 112u) << 10;
    }
    uint32_t const kept = significand >> shift;
    uint32_t const rest = significand & ((1u << shift) - 1u);
    uint32_t const halfway = 1u << (shift - 1u);
    // A carry out of the significand lands in the exponent (up to infinity), which is the right encoding.
    uint32_t const rounded = base + kept + ((rest > halfway || (rest == halfway && (kept & 1u) != 0)) ? 1u : 0u);
    return static_cast<uint16_t>(sign | rounded);
}

//! Stores one output: float32 as is, or float16 (as its bits) rounded to nearest even from the float32 value. The
//! device uses the hardware conversion (cvt.rn.f16.f32, IEEE round-to-nearest-even: the same value as the host's
//! floatToHalfBits for every non-NaN input).
LOWBIT_HOST_DEVICE inline void storeOutput(float* out, float value)
{
    *out = value;
}

LOWBIT_HOST_DEVICE inline void storeOutput(uint16_t* out, float value)
{
#ifdef __CUDA_ARCH__
    *out = __half_as_ushort(__float2half_rn(value));
#else
    *out = floatToHalfBits(value);
#endif
}

} // namespace lowbit

#endif // LOWBIT_HALF_PRECISION_H
