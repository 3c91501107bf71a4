/*
 * Return codes of the kernel library's C ABI (liblowbit_kernels.so), shared by every op: 0 success, > 0 a
 * cudaError_t, < 0 an argument error. lowbit_error_string names each one.
 */
#ifndef LOWBIT_ERRORS_H
#define LOWBIT_ERRORS_H

extern "C"
{
// lowbit::UnpackDequantize (v1, v2)
#define LOWBIT_ERR_BAD_WORD_BITS (-1)
#define LOWBIT_ERR_BAD_LEVELS (-2)
#define LOWBIT_ERR_BAD_CODES_PER_WORD (-3)
#define LOWBIT_ERR_BAD_SHAPE (-4)
#define LOWBIT_ERR_NULL_POINTER (-5)
#define LOWBIT_ERR_BAD_GROUP (-6)
#define LOWBIT_ERR_BAD_STREAM_BYTES (-7)
// lowbit::QuantizeDequantizeActivation (v1)
#define LOWBIT_ERR_BAD_GRID (-8)
#define LOWBIT_ERR_BAD_STEPS (-9)
#define LOWBIT_ERR_BAD_ACTIVATION_SHAPE (-10)
// Test hooks (lowbit_unpack_dequantize*_host_grid)
#define LOWBIT_ERR_BAD_MAX_BLOCKS (-11)

//! A static string describing `code` (never null).
char const* lowbit_error_string(int code);
}

#endif // LOWBIT_ERRORS_H
