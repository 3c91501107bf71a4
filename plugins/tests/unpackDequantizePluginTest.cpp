/*
 * UnpackDequantize v1/v2 cases of the C++ plugin runtime test (main and usage: pluginRuntimeTest.cpp): creators,
 * fields round trip, refusals and offered formats on the CPU; enqueue on cudaMalloc'd buffers, FLOAT and HALF output,
 * compared bit for bit with the kernel library's host path and the op's formula on the GPU.
 */
#include "common/lowbitFormat.h"
#include "pluginTestSupport.h"
#include "unpack_dequantize/unpackDequantizeKernel.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace
{
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;

using namespace lowbit_test;

//! Fields of one plugin; PluginField points into these vectors.
struct Fields
{
    Fields(
        int version_, std::vector<std::pair<std::string, std::vector<int32_t>>> scalars_, std::vector<int64_t> shape_)
        : version(version_)
        , scalars(std::move(scalars_))
        , shape(std::move(shape_))
    {
    }

    int version;
    std::vector<std::pair<std::string, std::vector<int32_t>>> scalars;
    std::vector<int64_t> shape;
    std::vector<PluginField> list;
    PluginFieldCollection collection{};

    PluginFieldCollection const* build()
    {
        list.clear();
        for (auto& entry : scalars)
        {
            list.emplace_back(entry.first.c_str(), entry.second.data(), PluginFieldType::kINT32,
                static_cast<int32_t>(entry.second.size()));
        }
        list.emplace_back("shape", shape.data(), PluginFieldType::kINT64, static_cast<int32_t>(shape.size()));
        collection.nbFields = static_cast<int32_t>(list.size());
        collection.fields = list.data();
        return &collection;
    }
};

Fields wordsFields(int32_t levels, int32_t wordBits, std::vector<int64_t> shape)
{
    return Fields{1,
        {{"levels", {levels}}, {"qmin", {-(levels / 2)}}, {"word_bits", {wordBits}},
            {"codes_per_word", {lowbit::codesPerWord(levels, wordBits)}}},
        std::move(shape)};
}

Fields bitstreamFields(int32_t levels, std::vector<int64_t> shape)
{
    lowbit::BitstreamGroup const group = lowbit::bitstreamGroup(levels);
    return Fields{2,
        {{"levels", {levels}}, {"qmin", {-(levels / 2)}}, {"group_size", {group.size}}, {"group_bits", {group.bits}}},
        std::move(shape)};
}

struct Library
{
    nvinfer1::IPluginCreatorV3One* creators[3]{}; // by op version
};

nvinfer1::IPluginV3* create(Library& library, Fields& fields, nvinfer1::TensorRTPhase phase)
{
    return library.creators[fields.version]->createPlugin("test", fields.build(), phase);
}

//! Packs codes as op v1 words (base-L digits, least significant first) or the op v2 bit stream; returns bytes.
std::vector<uint8_t> pack(std::vector<int32_t> const& codes, Fields const& fields)
{
    int32_t const levels = fields.scalars[0].second[0];
    int32_t const perUnit = fields.scalars[3].second[0]; // codes_per_word (v1) or group_bits (v2)
    std::vector<uint8_t> bytes;
    if (fields.version == 1)
    {
        int32_t const wordBytes = fields.scalars[2].second[0] / 8;
        for (size_t first = 0; first < codes.size(); first += perUnit)
        {
            uint64_t value = 0;
            uint64_t place = 1;
            for (int32_t digit = 0; digit < perUnit && first + digit < codes.size(); ++digit, place *= levels)
            {
                value += static_cast<uint64_t>(codes[first + digit]) * place;
            }
            for (int32_t b = 0; b < wordBytes; ++b)
            {
                bytes.push_back(static_cast<uint8_t>(value >> (8 * b))); // little-endian words
            }
        }
        return bytes;
    }
    int32_t const groupSize = fields.scalars[2].second[0];
    int32_t const groupBits = perUnit;
    size_t const groups = (codes.size() + groupSize - 1) / groupSize;
    bytes.assign((groups * groupBits + 7) / 8, 0);
    for (size_t group = 0; group < groups; ++group)
    {
        uint64_t value = 0;
        uint64_t place = 1;
        for (int32_t digit = 0; digit < groupSize; ++digit, place *= levels)
        {
            size_t const index = group * groupSize + digit;
            value += index < codes.size() ? static_cast<uint64_t>(codes[index]) * place : 0;
        }
        for (int32_t bit = 0; bit < groupBits; ++bit)
        {
            uint64_t const position = group * groupBits + bit;
            bytes[position / 8] |= static_cast<uint8_t>(((value >> bit) & 1u) << (position % 8));
        }
    }
    return bytes;
}

void cpuChecks(Library& library, CountingLogger& logger)
{
    for (int version : {1, 2})
    {
        auto* creator = library.creators[version];
        check(std::strcmp(creator->getPluginName(), "UnpackDequantize") == 0, "creator name");
        check(std::strcmp(creator->getPluginNamespace(), "lowbit") == 0, "creator namespace");
        check(std::atoi(creator->getPluginVersion()) == version, "creator version");
        check(creator->getFieldNames()->nbFields == 5, "five field names");
    }
    for (Fields fields : {wordsFields(3, 8, {4, 2, 3, 3}), wordsFields(17, 32, {5, 7}), bitstreamFields(5, {3, 11})})
    {
        std::unique_ptr<nvinfer1::IPluginV3> plugin(create(library, fields, nvinfer1::TensorRTPhase::kBUILD));
        check(plugin != nullptr, "valid fields create a plugin");
        if (!plugin)
        {
            continue;
        }
        auto* core = capability<nvinfer1::IPluginV3OneCore>(plugin.get(), nvinfer1::PluginCapabilityType::kCORE);
        check(std::atoi(core->getPluginVersion()) == fields.version, "plugin version");
        auto* runtime
            = capability<nvinfer1::IPluginV3OneRuntime>(plugin.get(), nvinfer1::PluginCapabilityType::kRUNTIME);
        PluginFieldCollection const* serialized = runtime->getFieldsToSerialize();
        check(serialized != nullptr && serialized->nbFields == 5, "five serialized fields");
        std::unique_ptr<nvinfer1::IPluginV3> restored(
            library.creators[fields.version]->createPlugin("restored", serialized, nvinfer1::TensorRTPhase::kRUNTIME));
        check(restored != nullptr, "serialized fields create the plugin again (runtime phase)");
        // Wrong packed length: refused at configure time (an out-of-bounds read otherwise).
        auto* build = capability<nvinfer1::IPluginV3OneBuild>(plugin.get(), nvinfer1::PluginCapabilityType::kBUILD);
        nvinfer1::DynamicPluginTensorDesc in[2]{};
        nvinfer1::DynamicPluginTensorDesc out[1]{};
        in[0].desc.dims = dims1(4);
        in[1].desc.dims = dims1(fields.shape[0]);
        int const errorsBefore = logger.errors;
        check(build->configurePlugin(in, 2, out, 1) != 0, "configurePlugin refuses a short packed input");
        check(logger.errors == errorsBefore + 1, "the refusal is logged through the logger finder");
        // Output FLOAT (declared) or HALF, LINEAR; nothing else.
        nvinfer1::DataType declared{};
        nvinfer1::DataType const inputTypes[2] = {fields.version == 1 && fields.scalars[2].second[0] == 32
                ? nvinfer1::DataType::kINT32
                : nvinfer1::DataType::kINT8,
            nvinfer1::DataType::kHALF};
        check(build->getOutputDataTypes(&declared, 1, inputTypes, 2) == 0 && declared == nvinfer1::DataType::kFLOAT,
            "getOutputDataTypes declares FLOAT");
        nvinfer1::DynamicPluginTensorDesc inOut[3]{};
        for (auto type : {nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kHALF, nvinfer1::DataType::kINT8})
        {
            inOut[2].desc.type = type;
            inOut[2].desc.format = nvinfer1::TensorFormat::kLINEAR;
            bool const wanted = type != nvinfer1::DataType::kINT8;
            check(build->supportsFormatCombination(2, inOut, 2, 1) == wanted, "output type offered");
        }
        inOut[2].desc.format = nvinfer1::TensorFormat::kCHW2;
        check(!build->supportsFormatCombination(2, inOut, 2, 1), "a non-LINEAR output refused");
    }
    Fields bad = wordsFields(3, 8, {4, 2});
    bad.scalars[3].second = {4}; // ternary bytes hold 5 codes
    int const errorsBefore = logger.errors;
    check(create(library, bad, nvinfer1::TensorRTPhase::kBUILD) == nullptr, "inconsistent codes_per_word refused");
    check(logger.errors == errorsBefore + 1 && logger.last.find("codes_per_word") != std::string::npos,
        "the refusal names the field: " + logger.last);
    check(library.creators[1]->createPlugin("null", nullptr, nvinfer1::TensorRTPhase::kBUILD) == nullptr,
        "a null field collection is refused");
}

//! The op's value of output i, as float32 bits or (half) as float16 bits rounded to nearest even.
uint32_t expectedBits(float value, bool half)
{
    uint32_t bits = 0;
    if (half)
    {
        bits = lowbit::floatToHalfBits(value);
    }
    else
    {
        std::memcpy(&bits, &value, sizeof(bits));
    }
    return bits;
}

void gpuCase(Library& library, Fields fields, bool half, cudaStream_t stream, std::mt19937& random)
{
    int32_t const levels = fields.scalars[0].second[0];
    int32_t const qmin = fields.scalars[1].second[0];
    int64_t numel = 1;
    for (int64_t extent : fields.shape)
    {
        numel *= extent;
    }
    int64_t const channels = fields.shape[0];
    std::vector<int32_t> codes(static_cast<size_t>(numel));
    for (auto& code : codes)
    {
        code = static_cast<int32_t>(random() % static_cast<uint32_t>(levels));
    }
    codes.back() = levels - 1; // the last code's top digit sits next to the end of the packed data
    std::vector<uint16_t> scales(static_cast<size_t>(channels));
    for (auto& scale : scales)
    {
        scale = randomHalf(random);
    }
    std::vector<uint8_t> const packed = pack(codes, fields);
    bool const int32Words = fields.version == 1 && fields.scalars[2].second[0] == 32;
    int64_t const packedLength = static_cast<int64_t>(int32Words ? packed.size() / 4 : packed.size());
    std::string const label = "v" + std::to_string(fields.version) + " levels=" + std::to_string(levels) + " numel="
        + std::to_string(numel) + (int32Words ? " int32 words" : "") + (half ? " HALF output" : "");

    size_t const elementBytes = half ? sizeof(uint16_t) : sizeof(float);
    size_t const outBytes = static_cast<size_t>(numel) * elementBytes;
    std::vector<uint8_t> host(outBytes);
    int const wordBits = fields.scalars[2].second[0];
    int const last = fields.scalars[3].second[0]; // codes_per_word (v1) or group_bits (v2)
    int hostStatus = 0;
    if (fields.version == 1)
    {
        hostStatus = half ? lowbit_unpack_dequantize_host_fp16(packed.data(), wordBits, scales.data(),
                         reinterpret_cast<uint16_t*>(host.data()), numel, channels, levels, qmin, last)
                          : lowbit_unpack_dequantize_host(packed.data(), wordBits, scales.data(),
                              reinterpret_cast<float*>(host.data()), numel, channels, levels, qmin, last);
    }
    else
    {
        hostStatus = half ? lowbit_unpack_dequantize_bitstream_host_fp16(packed.data(), packedLength, scales.data(),
                         reinterpret_cast<uint16_t*>(host.data()), numel, channels, levels, qmin, wordBits, last)
                          : lowbit_unpack_dequantize_bitstream_host(packed.data(), packedLength, scales.data(),
                              reinterpret_cast<float*>(host.data()), numel, channels, levels, qmin, wordBits, last);
    }
    check(hostStatus == 0, label + ": host path");

    std::unique_ptr<nvinfer1::IPluginV3> built(create(library, fields, nvinfer1::TensorRTPhase::kBUILD));
    check(built != nullptr, label + ": create");
    if (!built)
    {
        return;
    }
    NoResources resources;
    auto* runtimeOfBuilt
        = capability<nvinfer1::IPluginV3OneRuntime>(built.get(), nvinfer1::PluginCapabilityType::kRUNTIME);
    std::unique_ptr<nvinfer1::IPluginV3> plugin(runtimeOfBuilt->attachToContext(&resources));
    check(plugin != nullptr, label + ": attachToContext");
    if (!plugin)
    {
        return;
    }
    auto* build = capability<nvinfer1::IPluginV3OneBuild>(plugin.get(), nvinfer1::PluginCapabilityType::kBUILD);
    auto* runtime = capability<nvinfer1::IPluginV3OneRuntime>(plugin.get(), nvinfer1::PluginCapabilityType::kRUNTIME);

    nvinfer1::DynamicPluginTensorDesc in[2]{};
    nvinfer1::DynamicPluginTensorDesc out[1]{};
    in[0].desc.dims = dims1(packedLength);
    in[0].desc.type = int32Words ? nvinfer1::DataType::kINT32 : nvinfer1::DataType::kINT8;
    in[1].desc.dims = dims1(channels);
    in[1].desc.type = nvinfer1::DataType::kHALF;
    out[0].desc.dims.nbDims = static_cast<int32_t>(fields.shape.size());
    for (size_t axis = 0; axis < fields.shape.size(); ++axis)
    {
        out[0].desc.dims.d[axis] = fields.shape[axis];
    }
    out[0].desc.type = half ? nvinfer1::DataType::kHALF : nvinfer1::DataType::kFLOAT;
    for (auto* desc : {&in[0], &in[1], &out[0]})
    {
        desc->desc.format = nvinfer1::TensorFormat::kLINEAR;
        desc->min = desc->opt = desc->max = desc->desc.dims;
    }
    check(build->configurePlugin(in, 2, out, 1) == 0, label + ": configurePlugin");
    nvinfer1::PluginTensorDesc inDesc[2] = {in[0].desc, in[1].desc};
    nvinfer1::PluginTensorDesc outDesc[1] = {out[0].desc};
    check(runtime->onShapeChange(inDesc, 2, outDesc, 1) == 0, label + ": onShapeChange");

    DeviceBuffer devicePacked(packed.size());
    DeviceBuffer deviceScales(scales.size() * sizeof(uint16_t));
    DeviceBuffer deviceOut(outBytes);
    bool const allocated = devicePacked.ok && deviceScales.ok && deviceOut.ok;
    check(allocated, label + ": cudaMalloc");
    std::vector<uint8_t> device(outBytes, 0);
    if (allocated)
    {
        cudaMemcpy(devicePacked.data, packed.data(), packed.size(), cudaMemcpyHostToDevice);
        cudaMemcpy(deviceScales.data, scales.data(), scales.size() * sizeof(uint16_t), cudaMemcpyHostToDevice);
        cudaMemset(deviceOut.data, 0xFF, outBytes); // NaN pattern: unwritten outputs show
        void const* inputs[2] = {devicePacked.data, deviceScales.data};
        void* outputs[1] = {deviceOut.data};
        check(runtime->enqueue(inDesc, outDesc, inputs, outputs, nullptr, stream) == 0, label + ": enqueue");
        check(cudaStreamSynchronize(stream) == cudaSuccess, label + ": synchronize");
        cudaMemcpy(device.data(), deviceOut.data, outBytes, cudaMemcpyDeviceToHost);
    }

    int64_t const perChannel = numel / channels;
    int64_t mismatches = 0;
    for (int64_t i = 0; i < numel; ++i)
    {
        float const scale = lowbit::halfBitsToFloat(scales[static_cast<size_t>(i / perChannel)]);
        float const value = static_cast<float>(codes[i] + qmin) * scale;
        uint32_t const expected = expectedBits(value, half);
        uint32_t deviceBits = 0;
        uint32_t hostBits = 0;
        std::memcpy(&deviceBits, device.data() + i * elementBytes, elementBytes);
        std::memcpy(&hostBits, host.data() + i * elementBytes, elementBytes);
        mismatches += deviceBits != hostBits || hostBits != expected;
    }
    check(mismatches == 0, label + ": " + std::to_string(mismatches) + " outputs differ from the host reference");
}

void gpuChecks(Library& library, cudaStream_t stream)
{
    std::mt19937 random(1234);
    std::vector<std::vector<int64_t>> const shapes{{1}, {3, 5}, {7, 3, 3, 3}, {320, 320, 3, 3}, {1280, 641}};
    int cases = 0;
    for (int32_t levels : {2, 3, 4, 5, 7, 9, 15, 16, 17, 256, 65536})
    {
        for (auto const& shape : shapes)
        {
            for (bool half : {false, true})
            {
                for (int32_t wordBits : {8, 32})
                {
                    if (lowbit::codesPerWord(levels, wordBits) >= 1)
                    {
                        gpuCase(library, wordsFields(levels, wordBits, shape), half, stream, random);
                        ++cases;
                    }
                }
                gpuCase(library, bitstreamFields(levels, shape), half, stream, random);
                ++cases;
            }
        }
    }
    std::printf("GPU: %d UnpackDequantize enqueue cases compared bit for bit (FLOAT and HALF output)\n", cases);
}
} // namespace

namespace lowbit_test
{
void unpackDequantizeCpuChecks(
    nvinfer1::IPluginCreatorV3One* words, nvinfer1::IPluginCreatorV3One* bitstream, CountingLogger& logger)
{
    Library library;
    library.creators[1] = words;
    library.creators[2] = bitstream;
    cpuChecks(library, logger);
}

void unpackDequantizeGpuChecks(
    nvinfer1::IPluginCreatorV3One* words, nvinfer1::IPluginCreatorV3One* bitstream, cudaStream_t stream)
{
    Library library;
    library.creators[1] = words;
    library.creators[2] = bitstream;
    gpuChecks(library, stream);
}
} // namespace lowbit_test
