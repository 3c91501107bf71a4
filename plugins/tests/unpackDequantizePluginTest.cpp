/*
 * Runtime path of the C++ UnpackDequantize plugin, tested without any TensorRT runtime:
 *
 *   lowbit_plugin_test_trt<major> <path to liblowbit_plugins_trt<major>.so>
 *
 * Loads the library with dlopen like TensorRT's loadLibrary, takes the creators from getCreators(), and
 *   1. (CPU) creates plugins from PluginFields, checks names/versions, the serialized fields round trip, and that
 *      malformed fields and wrong input lengths are refused with an error logged (the process survives);
 *   2. (GPU) for v1 (INT8 and INT32 words) and v2 (bit stream) over level counts and shapes: packs random codes,
 *      calls configurePlugin / onShapeChange / enqueue on cudaMalloc'd buffers and compares the output bit for bit
 *      with the kernel library's host path and with the op's formula float32(code + qmin) * float32(scale).
 *
 * Exit status: 0 all passed, 1 a check failed, 77 the CPU part passed and no CUDA device exists (GPU part skipped).
 */
#include "common/lowbitFormat.h"
#include "unpack_dequantize/unpackDequantizeKernel.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

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

constexpr int kSKIPPED = 77;
int gFailures = 0;

void check(bool condition, std::string const& what)
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

//! Fields of one plugin; PluginField points into these vectors.
struct Fields
{
    Fields(int version_, std::vector<std::pair<std::string, std::vector<int32_t>>> scalars_, std::vector<int64_t> shape_)
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

template <typename Capability>
Capability* capability(nvinfer1::IPluginV3* plugin, nvinfer1::PluginCapabilityType type)
{
    return static_cast<Capability*>(plugin->getCapabilityInterface(type));
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

nvinfer1::Dims dims1(int64_t length)
{
    nvinfer1::Dims dims{};
    dims.nbDims = 1;
    dims.d[0] = length;
    return dims;
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

uint16_t randomHalf(std::mt19937& random)
{
    // Normal halves of magnitude 2^-10 .. 2^-1, both signs, plus now and then a subnormal.
    uint16_t const sign = static_cast<uint16_t>((random() & 1u) << 15);
    uint16_t const exponent = random() % 16 == 0 ? 0 : static_cast<uint16_t>(5 + random() % 10);
    return static_cast<uint16_t>(sign | (exponent << 10) | (random() & 0x3FFu));
}

void gpuCase(Library& library, Fields fields, cudaStream_t stream, std::mt19937& random)
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
    int64_t const packedLength = int32Words ? static_cast<int64_t>(packed.size() / 4) : static_cast<int64_t>(packed.size());
    std::string const label = "v" + std::to_string(fields.version) + " levels=" + std::to_string(levels) + " numel="
        + std::to_string(numel) + (int32Words ? " int32 words" : "");

    std::vector<float> host(static_cast<size_t>(numel));
    int const hostStatus = fields.version == 1
        ? lowbit_unpack_dequantize_host(packed.data(), fields.scalars[2].second[0], scales.data(), host.data(), numel,
            channels, levels, qmin, fields.scalars[3].second[0])
        : lowbit_unpack_dequantize_bitstream_host(packed.data(), packedLength, scales.data(), host.data(), numel,
            channels, levels, qmin, fields.scalars[2].second[0], fields.scalars[3].second[0]);
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
    out[0].desc.type = nvinfer1::DataType::kFLOAT;
    for (auto* desc : {&in[0], &in[1], &out[0]})
    {
        desc->desc.format = nvinfer1::TensorFormat::kLINEAR;
        desc->min = desc->opt = desc->max = desc->desc.dims;
    }
    check(build->configurePlugin(in, 2, out, 1) == 0, label + ": configurePlugin");
    nvinfer1::PluginTensorDesc inDesc[2] = {in[0].desc, in[1].desc};
    nvinfer1::PluginTensorDesc outDesc[1] = {out[0].desc};
    check(runtime->onShapeChange(inDesc, 2, outDesc, 1) == 0, label + ": onShapeChange");

    void* devicePacked = nullptr;
    void* deviceScales = nullptr;
    void* deviceOut = nullptr;
    bool allocated = cudaMalloc(&devicePacked, packed.size()) == cudaSuccess
        && cudaMalloc(&deviceScales, scales.size() * sizeof(uint16_t)) == cudaSuccess
        && cudaMalloc(&deviceOut, host.size() * sizeof(float)) == cudaSuccess;
    check(allocated, label + ": cudaMalloc");
    std::vector<float> device(host.size(), -1.0F);
    if (allocated)
    {
        cudaMemcpy(devicePacked, packed.data(), packed.size(), cudaMemcpyHostToDevice);
        cudaMemcpy(deviceScales, scales.data(), scales.size() * sizeof(uint16_t), cudaMemcpyHostToDevice);
        cudaMemset(deviceOut, 0xFF, host.size() * sizeof(float)); // NaN pattern: unwritten outputs show
        void const* inputs[2] = {devicePacked, deviceScales};
        void* outputs[1] = {deviceOut};
        check(runtime->enqueue(inDesc, outDesc, inputs, outputs, nullptr, stream) == 0, label + ": enqueue");
        check(cudaStreamSynchronize(stream) == cudaSuccess, label + ": synchronize");
        cudaMemcpy(device.data(), deviceOut, host.size() * sizeof(float), cudaMemcpyDeviceToHost);
    }
    cudaFree(devicePacked);
    cudaFree(deviceScales);
    cudaFree(deviceOut);

    int64_t const perChannel = numel / channels;
    int64_t mismatches = 0;
    for (int64_t i = 0; i < numel; ++i)
    {
        float const expected
            = static_cast<float>(codes[i] + qmin) * lowbit::halfBitsToFloat(scales[static_cast<size_t>(i / perChannel)]);
        mismatches += std::memcmp(&device[i], &host[i], sizeof(float)) != 0
            || std::memcmp(&host[i], &expected, sizeof(float)) != 0;
    }
    check(mismatches == 0, label + ": " + std::to_string(mismatches) + " outputs differ from the host reference");
}

void gpuChecks(Library& library)
{
    std::mt19937 random(1234);
    cudaStream_t stream;
    check(cudaStreamCreate(&stream) == cudaSuccess, "cudaStreamCreate");
    std::vector<std::vector<int64_t>> const shapes{{1}, {3, 5}, {7, 3, 3, 3}, {320, 320, 3, 3}, {1280, 641}};
    int cases = 0;
    for (int32_t levels : {2, 3, 4, 5, 7, 9, 15, 16, 17, 256, 65536})
    {
        for (auto const& shape : shapes)
        {
            for (int32_t wordBits : {8, 32})
            {
                if (lowbit::codesPerWord(levels, wordBits) >= 1)
                {
                    gpuCase(library, wordsFields(levels, wordBits, shape), stream, random);
                    ++cases;
                }
            }
            gpuCase(library, bitstreamFields(levels, shape), stream, random);
            ++cases;
        }
    }
    cudaStreamDestroy(stream);
    std::printf("GPU: %d enqueue cases compared bit for bit\n", cases);
}
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
    Library library;
    for (int32_t i = 0; i < count; ++i)
    {
        auto* creator = static_cast<nvinfer1::IPluginCreatorV3One*>(creators[i]);
        int const version = std::atoi(creator->getPluginVersion());
        if (std::strcmp(creator->getPluginName(), lowbit::kUNPACK_DEQUANTIZE_NAME) == 0 && (version == 1 || version == 2))
        {
            library.creators[version] = creator;
        }
    }
    // UnpackDequantize v1 and v2, and QuantizeDequantizeActivation v1 (tested through TensorRT-RTX from Python).
    if (count != 3 || library.creators[1] == nullptr || library.creators[2] == nullptr)
    {
        std::printf("FAIL: expected the UnpackDequantize v1 and v2 creators among 3, got %d creators\n", count);
        return 1;
    }
    cpuChecks(library, logger);
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
        gpuChecks(library);
    }
    std::printf("%s (%d failures)\n", gFailures == 0 ? "PASSED" : "FAILED", gFailures);
    return gFailures == 0 ? 0 : 1;
}
