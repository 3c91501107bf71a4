/*
 * Runtime path of the C++ plugins (UnpackDequantize v1/v2, QuantizeDequantizeActivation v1), tested without any
 * TensorRT runtime:
 *
 *   lowbit_plugin_test_trt<major> <path to liblowbit_plugins_trt<major>.so>
 *
 * Loads the library with dlopen like TensorRT's loadLibrary, takes the creators from getCreators(), and
 *   1. (CPU) creates plugins from PluginFields, checks names/versions, the serialized fields round trip, and that
 *      malformed fields and wrong input lengths are refused with an error logged (the process survives);
 *   2. (GPU) for v1 (INT8 and INT32 words) and v2 (bit stream) over level counts and shapes, FLOAT and HALF output:
 *      packs random codes, calls configurePlugin / onShapeChange / enqueue on cudaMalloc'd buffers and compares the
 *      output bit for bit with the kernel library's host path and with the op's formula float32(code + qmin) *
 *      float32(scale) (rounded to nearest even for HALF);
 *   3. the same for QuantizeDequantizeActivation (activationPluginTest.cpp) against its host path.
 *
 * Exit status: 0 all passed, 1 a check failed, 77 the CPU part passed and no CUDA device exists (GPU part skipped).
 */
#include "common/lowbitFormat.h"
#include "pluginTestSupport.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

using namespace lowbit_test;

namespace
{
constexpr int kSKIPPED = 77;
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s <path to liblowbit_plugins_trt*.so>\n", argv[0]);
        return 2;
    }
    void* handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr)
    {
        std::printf("FAIL: dlopen: %s\n", dlerror());
        return 1;
    }
    using GetCreators = nvinfer1::IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(nvinfer1::ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"));
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        std::printf("FAIL: the library does not export getCreators and setLoggerFinder\n");
        return 1;
    }
    CountingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);
    int32_t count = 0;
    nvinfer1::IPluginCreatorInterface* const* creators = getCreators(count);
    nvinfer1::IPluginCreatorV3One* unpack[3]{}; // by op version
    nvinfer1::IPluginCreatorV3One* activation = nullptr;
    for (int32_t i = 0; i < count; ++i)
    {
        auto* creator = static_cast<nvinfer1::IPluginCreatorV3One*>(creators[i]);
        int const version = std::atoi(creator->getPluginVersion());
        bool const unpackCreator = std::strcmp(creator->getPluginName(), lowbit::kUNPACK_DEQUANTIZE_NAME) == 0;
        if (unpackCreator && (version == 1 || version == 2))
        {
            unpack[version] = creator;
        }
        if (std::strcmp(creator->getPluginName(), lowbit::kQUANTIZE_DEQUANTIZE_ACTIVATION_NAME) == 0 && version == 1)
        {
            activation = creator;
        }
    }
    // UnpackDequantize v1 and v2, and QuantizeDequantizeActivation v1.
    if (count != 3 || unpack[1] == nullptr || unpack[2] == nullptr || activation == nullptr)
    {
        std::printf("FAIL: expected UnpackDequantize v1, v2 and QuantizeDequantizeActivation v1, got %d creators\n",
            count);
        return 1;
    }
    unpackDequantizeCpuChecks(unpack[1], unpack[2], logger);
    activationCpuChecks(activation, logger);
    std::printf("CPU: creators, fields round trip and refusals checked (%d failures)\n", gFailures);
    int devices = 0;
    cudaError_t const status = cudaGetDeviceCount(&devices);
    if (gFailures == 0 && (status != cudaSuccess || devices == 0))
    {
        std::printf("SKIPPED GPU part: no CUDA device (cudaGetDeviceCount: %s)\n", cudaGetErrorString(status));
        return kSKIPPED;
    }
    if (gFailures == 0)
    {
        cudaStream_t stream = nullptr;
        check(cudaStreamCreate(&stream) == cudaSuccess, "cudaStreamCreate");
        unpackDequantizeGpuChecks(unpack[1], unpack[2], stream);
        activationGpuChecks(activation, stream);
        cudaStreamDestroy(stream);
    }
    std::printf("%s (%d failures)\n", gFailures == 0 ? "PASSED" : "FAILED", gFailures);
    return gFailures == 0 ? 0 : 1;
}
