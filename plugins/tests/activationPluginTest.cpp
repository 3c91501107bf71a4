/*
 * QuantizeDequantizeActivation v1 cases of the C++ plugin runtime test (main and usage: pluginRuntimeTest.cpp): the
 * creator, fields round trip, refusals and declared types on the CPU; on the GPU, plugins made by the creator from
 * PluginFields run configurePlugin / onShapeChange / enqueue on cudaMalloc'd buffers (with and without a zero point,
 * one and many steps, an out-of-range step index, FLOAT and HALF output) and are compared bit for bit with the kernel
 * library's host path.
 */
#include "common/lowbitFormat.h"
#include "pluginTestSupport.h"
#include "quantize_dequantize_activation/quantizeDequantizeActivationKernel.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace lowbit_test
{
namespace
{
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;

//! The creator's fields qmin, qmax (INT32, as the ONNX parser passes them); PluginField points into this object.
struct GridFields
{
    GridFields(int32_t qmin_, int32_t qmax_)
        : qmin(qmin_)
        , qmax(qmax_)
    {
        list[0] = PluginField("qmin", &qmin, PluginFieldType::kINT32, 1);
        list[1] = PluginField("qmax", &qmax, PluginFieldType::kINT32, 1);
        collection.nbFields = 2;
        collection.fields = list;
    }
    GridFields(GridFields const&) = delete;
    GridFields& operator=(GridFields const&) = delete;

    int32_t qmin;
    int32_t qmax;
    PluginField list[2];
    PluginFieldCollection collection{};
};

struct ActivationCase
{
    int32_t qmin;
    int32_t qmax;
    bool zeroPoint;
    int64_t steps;
    std::vector<int64_t> shape; //!< x: [B, ...]
    bool half;                  //!< HALF output (the float32 value rounded to nearest even)
};

void gpuCase(nvinfer1::IPluginCreatorV3One* creator, ActivationCase const& test, cudaStream_t stream,
    std::mt19937& random)
{
    std::string const label = "activation [" + std::to_string(test.qmin) + ", " + std::to_string(test.qmax) + "] T="
        + std::to_string(test.steps) + (test.zeroPoint ? " zero point" : "") + " rank "
        + std::to_string(test.shape.size()) + (test.half ? " HALF output" : "");
    int64_t const batch = test.shape[0];
    int64_t numel = 1;
    for (int64_t extent : test.shape)
    {
        numel *= extent;
    }
    std::normal_distribution<float> normal(0.0F, 3.0F);
    std::vector<float> x(static_cast<size_t>(numel));
    for (auto& value : x)
    {
        value = normal(random);
    }
    std::vector<float> scale(static_cast<size_t>(test.steps));
    std::vector<float> zeroPoint(static_cast<size_t>(test.steps));
    for (int64_t t = 0; t < test.steps; ++t)
    {
        scale[t] = 0.01F + static_cast<float>(random() % 1000) / 2000.0F;
        zeroPoint[t] = static_cast<float>(test.qmin + static_cast<int32_t>(random() % (test.qmax - test.qmin + 1)));
    }
    std::vector<int64_t> stepIndex(static_cast<size_t>(batch));
    for (auto& step : stepIndex)
    {
        step = static_cast<int64_t>(random() % static_cast<uint32_t>(test.steps));
    }
    stepIndex.back() = test.steps; // out of range: the kernel writes NaN for that sample, host and device alike
    int64_t const perSample = numel / batch;
    float const* zero = test.zeroPoint ? zeroPoint.data() : nullptr;
    size_t const outBytes = static_cast<size_t>(numel) * (test.half ? sizeof(uint16_t) : sizeof(float));
    std::vector<uint8_t> host(outBytes);
    int const hostStatus = test.half
        ? lowbit_quantize_dequantize_activation_host_fp16(x.data(), scale.data(), stepIndex.data(), zero,
            reinterpret_cast<uint16_t*>(host.data()), batch, perSample, test.steps, test.qmin, test.qmax)
        : lowbit_quantize_dequantize_activation_host(x.data(), scale.data(), stepIndex.data(), zero,
            reinterpret_cast<float*>(host.data()), batch, perSample, test.steps, test.qmin, test.qmax);
    check(hostStatus == 0, label + ": host path");

    GridFields fields(test.qmin, test.qmax);
    std::unique_ptr<nvinfer1::IPluginV3> built(
        creator->createPlugin("test", &fields.collection, nvinfer1::TensorRTPhase::kBUILD));
    check(built != nullptr, label + ": create");
    if (!built)
    {
        return;
    }
    NoResources resources;
    std::unique_ptr<nvinfer1::IPluginV3> plugin(
        capability<nvinfer1::IPluginV3OneRuntime>(built.get(), nvinfer1::PluginCapabilityType::kRUNTIME)
            ->attachToContext(&resources));
    check(plugin != nullptr, label + ": attachToContext");
    if (!plugin)
    {
        return;
    }
    auto* build = capability<nvinfer1::IPluginV3OneBuild>(plugin.get(), nvinfer1::PluginCapabilityType::kBUILD);
    auto* runtime = capability<nvinfer1::IPluginV3OneRuntime>(plugin.get(), nvinfer1::PluginCapabilityType::kRUNTIME);
    int32_t const nbInputs = test.zeroPoint ? 4 : 3;
    nvinfer1::DynamicPluginTensorDesc in[4]{};
    nvinfer1::DynamicPluginTensorDesc out[1]{};
    in[0].desc.dims.nbDims = static_cast<int32_t>(test.shape.size());
    for (size_t axis = 0; axis < test.shape.size(); ++axis)
    {
        in[0].desc.dims.d[axis] = test.shape[axis];
    }
    in[1].desc.dims = dims1(test.steps);
    in[2].desc.dims = dims1(batch);
    in[3].desc.dims = dims1(test.steps);
    in[2].desc.type = nvinfer1::DataType::kINT64;
    out[0].desc.dims = in[0].desc.dims;
    out[0].desc.type = test.half ? nvinfer1::DataType::kHALF : nvinfer1::DataType::kFLOAT;
    for (auto* desc : {&in[0], &in[1], &in[2], &in[3], &out[0]})
    {
        desc->desc.format = nvinfer1::TensorFormat::kLINEAR;
        desc->min = desc->opt = desc->max = desc->desc.dims;
    }
    check(build->configurePlugin(in, nbInputs, out, 1) == 0, label + ": configurePlugin");
    nvinfer1::PluginTensorDesc inDesc[4] = {in[0].desc, in[1].desc, in[2].desc, in[3].desc};
    nvinfer1::PluginTensorDesc outDesc[1] = {out[0].desc};
    check(runtime->onShapeChange(inDesc, nbInputs, outDesc, 1) == 0, label + ": onShapeChange");

    size_t const bytes = static_cast<size_t>(numel) * sizeof(float);
    DeviceBuffer deviceX(bytes);
    DeviceBuffer deviceScale(scale.size() * sizeof(float));
    DeviceBuffer deviceStep(stepIndex.size() * sizeof(int64_t));
    DeviceBuffer deviceZero(zeroPoint.size() * sizeof(float));
    DeviceBuffer deviceOut(outBytes);
    bool const allocated = deviceX.ok && deviceScale.ok && deviceStep.ok && deviceZero.ok && deviceOut.ok;
    check(allocated, label + ": cudaMalloc");
    std::vector<uint8_t> device(outBytes, 0);
    if (allocated)
    {
        cudaMemcpy(deviceX.data, x.data(), bytes, cudaMemcpyHostToDevice);
        cudaMemcpy(deviceScale.data, scale.data(), scale.size() * sizeof(float), cudaMemcpyHostToDevice);
        cudaMemcpy(deviceStep.data, stepIndex.data(), stepIndex.size() * sizeof(int64_t), cudaMemcpyHostToDevice);
        cudaMemcpy(deviceZero.data, zeroPoint.data(), zeroPoint.size() * sizeof(float), cudaMemcpyHostToDevice);
        cudaMemset(deviceOut.data, 0xAB, outBytes); // unwritten outputs show
        void const* inputs[4] = {deviceX.data, deviceScale.data, deviceStep.data, deviceZero.data};
        void* outputs[1] = {deviceOut.data};
        check(runtime->enqueue(inDesc, outDesc, inputs, outputs, nullptr, stream) == 0, label + ": enqueue");
        check(cudaStreamSynchronize(stream) == cudaSuccess, label + ": synchronize");
        cudaMemcpy(device.data(), deviceOut.data, outBytes, cudaMemcpyDeviceToHost);
    }
    size_t const elementBytes = test.half ? sizeof(uint16_t) : sizeof(float);
    int64_t mismatches = 0;
    for (size_t i = 0; i < outBytes; i += elementBytes)
    {
        mismatches += std::memcmp(&device[i], &host[i], elementBytes) != 0;
    }
    check(mismatches == 0, label + ": " + std::to_string(mismatches) + " outputs differ from the host reference");
}
} // namespace

void activationCpuChecks(nvinfer1::IPluginCreatorV3One* creator, CountingLogger& logger)
{
    check(std::strcmp(creator->getPluginNamespace(), "lowbit") == 0, "activation creator namespace");
    check(creator->getFieldNames()->nbFields == 2, "activation: two field names (qmin, qmax)");
    GridFields valid(-128, 127);
    std::unique_ptr<nvinfer1::IPluginV3> plugin(
        creator->createPlugin("test", &valid.collection, nvinfer1::TensorRTPhase::kBUILD));
    check(plugin != nullptr, "activation: valid fields create a plugin");
    if (plugin)
    {
        auto* runtime
            = capability<nvinfer1::IPluginV3OneRuntime>(plugin.get(), nvinfer1::PluginCapabilityType::kRUNTIME);
        PluginFieldCollection const* serialized = runtime->getFieldsToSerialize();
        check(serialized != nullptr && serialized->nbFields == 2, "activation: two serialized fields");
        std::unique_ptr<nvinfer1::IPluginV3> restored(
            creator->createPlugin("restored", serialized, nvinfer1::TensorRTPhase::kRUNTIME));
        check(restored != nullptr, "activation: serialized fields create the plugin again");
        auto* build = capability<nvinfer1::IPluginV3OneBuild>(plugin.get(), nvinfer1::PluginCapabilityType::kBUILD);
        nvinfer1::DataType const types[3]
            = {nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kINT64};
        nvinfer1::DataType declared{};
        check(build->getOutputDataTypes(&declared, 1, types, 3) == 0 && declared == nvinfer1::DataType::kFLOAT,
            "activation: FLOAT output declared");
        nvinfer1::DataType const halfX[3]
            = {nvinfer1::DataType::kHALF, nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kINT64};
        int const errorsBefore = logger.errors;
        check(build->getOutputDataTypes(&declared, 1, halfX, 3) != 0 && logger.errors == errorsBefore + 1,
            "activation: a HALF x is refused with an error logged");
        nvinfer1::DynamicPluginTensorDesc inOut[4]{};
        for (auto type : {nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kHALF, nvinfer1::DataType::kINT8})
        {
            inOut[3].desc.type = type;
            inOut[3].desc.format = nvinfer1::TensorFormat::kLINEAR;
            check(build->supportsFormatCombination(3, inOut, 3, 1) == (type != nvinfer1::DataType::kINT8),
                "activation: FLOAT and HALF output offered, nothing else");
        }
    }
    GridFields inverted(5, 5);
    int const errorsBefore = logger.errors;
    check(creator->createPlugin("bad", &inverted.collection, nvinfer1::TensorRTPhase::kBUILD) == nullptr
            && logger.errors == errorsBefore + 1,
        "activation: qmin == qmax refused with an error logged");
}

void activationGpuChecks(nvinfer1::IPluginCreatorV3One* creator, cudaStream_t stream)
{
    std::mt19937 random(4321);
    std::vector<ActivationCase> const cases{{-8, 7, false, 20, {2, 4, 8, 8}, false},
        {-128, 127, false, 1, {3, 16}, false}, {0, 255, true, 20, {2, 6, 10}, false},
        {0, 255, true, 1, {2, 2, 3, 4, 4}, false}, {-32768, 32767, true, 7, {4, 320, 9}, false},
        {-8, 7, false, 20, {2, 4, 8, 8}, true}, {0, 255, true, 20, {2, 6, 10}, true}};
    for (auto const& test : cases)
    {
        gpuCase(creator, test, stream, random);
    }
    std::printf("GPU: %zu QuantizeDequantizeActivation enqueue cases compared bit for bit\n", cases.size());
}

} // namespace lowbit_test
