/*
 * What the C++ plugin runtime tests share (unpackDequantizePluginTest.cpp, activationPluginTest.cpp): failure
 * counting, a logger that counts errors (handed over through setLoggerFinder), an execution-context stand-in, the
 * capability casts, device buffers that free themselves, and random float16 scales.
 */
#ifndef LOWBIT_PLUGIN_TEST_SUPPORT_H
#define LOWBIT_PLUGIN_TEST_SUPPORT_H

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <string>

namespace lowbit_test
{

inline int gFailures = 0;

inline void check(bool condition, std::string const& what)
{
    if (!condition)
    {
        ++gFailures;
        std::printf("FAIL: %s\n", what.c_str());
    }
}

class CountingLogger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, nvinfer1::AsciiChar const* message) noexcept override
    {
        if (severity <= Severity::kERROR)
        {
            ++errors;
            last = message;
        }
    }
    int errors{0};
    std::string last;
};

class Finder : public nvinfer1::ILoggerFinder
{
public:
    explicit Finder(nvinfer1::ILogger* logger)
        : mLogger(logger)
    {
    }
    nvinfer1::ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    nvinfer1::ILogger* mLogger;
};

class NoResources : public nvinfer1::IPluginResourceContext
{
public:
    nvinfer1::IGpuAllocator* getGpuAllocator() const noexcept override
    {
        return nullptr;
    }
    nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
};

template <typename Capability>
Capability* capability(nvinfer1::IPluginV3* plugin, nvinfer1::PluginCapabilityType type)
{
    return static_cast<Capability*>(plugin->getCapabilityInterface(type));
}

inline nvinfer1::Dims dims1(int64_t length)
{
    nvinfer1::Dims dims{};
    dims.nbDims = 1;
    dims.d[0] = length;
    return dims;
}

//! cudaMalloc'd bytes, freed on destruction; `ok` is false when the allocation failed.
class DeviceBuffer
{
public:
    explicit DeviceBuffer(size_t bytes)
    {
        ok = cudaMalloc(&data, bytes > 0 ? bytes : 1) == cudaSuccess;
    }
    ~DeviceBuffer()
    {
        cudaFree(data);
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;

    void* data{nullptr};
    bool ok{false};
};

inline uint16_t randomHalf(std::mt19937& random)
{
    // Normal halves of magnitude 2^-10 .. 2^-1, both signs, plus now and then a subnormal.
    uint16_t const sign = static_cast<uint16_t>((random() & 1u) << 15);
    uint16_t const exponent = random() % 16 == 0 ? 0 : static_cast<uint16_t>(5 + random() % 10);
    return static_cast<uint16_t>(sign | (exponent << 10) | (random() & 0x3FFu));
}

//! UnpackDequantize v1/v2 cases (unpackDequantizePluginTest.cpp).
void unpackDequantizeCpuChecks(
    nvinfer1::IPluginCreatorV3One* words, nvinfer1::IPluginCreatorV3One* bitstream, CountingLogger& logger);
void unpackDequantizeGpuChecks(
    nvinfer1::IPluginCreatorV3One* words, nvinfer1::IPluginCreatorV3One* bitstream, cudaStream_t stream);

//! QuantizeDequantizeActivation cases (activationPluginTest.cpp): creator checks on the CPU, enqueue on the GPU.
void activationCpuChecks(nvinfer1::IPluginCreatorV3One* creator, CountingLogger& logger);
void activationGpuChecks(nvinfer1::IPluginCreatorV3One* creator, cudaStream_t stream);

} // namespace lowbit_test

#endif // LOWBIT_PLUGIN_TEST_SUPPORT_H
