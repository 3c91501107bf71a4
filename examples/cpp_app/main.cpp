/*
 * lowbit_cpp_app: embed a lowbit-deploy engine in a C++ program. Loads the plugin library, deserializes the engine,
 * runs one UNet call on the tensors of an input directory and writes the outputs (README.md in this folder).
 *
 *   lowbit_cpp_app ENGINE PLUGIN_LIBRARY INPUT_DIR OUTPUT_DIR
 *
 * Order of the steps: everything that can be checked without a GPU (arguments, input files, TensorRT runtime, plugin
 * library) comes before the GPU is touched, so a machine without one still validates a deployment up to execution.
 */
#include "tensorFiles.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

namespace cpp_app
{
namespace
{

using nvinfer1::DataType;

class Logger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, nvinfer1::AsciiChar const* message) noexcept override
    {
        // TensorRT's INFO stream is long (per-layer details); warnings and errors are what a user acts on.
        if (severity <= Severity::kWARNING)
        {
            char const* tag = severity <= Severity::kERROR ? "error" : "warning";
            std::fprintf(stderr, "[TensorRT %s] %s\n", tag, message);
        }
    }
};

struct DtypeName
{
    DataType type;
    char const* name;
};
constexpr DtypeName kDTYPES[] = {{DataType::kFLOAT, "float32"}, {DataType::kHALF, "float16"},
    {DataType::kBF16, "bfloat16"}, {DataType::kINT8, "int8"}, {DataType::kUINT8, "uint8"},
    {DataType::kINT32, "int32"}, {DataType::kINT64, "int64"}, {DataType::kBOOL, "bool"}};

std::string dtypeName(DataType type)
{
    for (DtypeName const& entry : kDTYPES)
    {
        if (entry.type == type)
        {
            return entry.name;
        }
    }
    throw AppError(kEXIT_RUN_FAILED, "the engine has an I/O tensor of TensorRT DataType "
            + std::to_string(static_cast<int>(type)) + ", which this app cannot read or write from files");
}

void checkCuda(cudaError_t status, std::string const& what)
{
    if (status != cudaSuccess)
    {
        throw AppError(kEXIT_RUN_FAILED, what + " failed: " + cudaGetErrorName(status) + " ("
                + cudaGetErrorString(status) + ")");
    }
}

struct CudaFree
{
    void operator()(void* pointer) const noexcept
    {
        cudaFree(pointer);
    }
};
using DeviceBuffer = std::unique_ptr<void, CudaFree>;

struct StreamDestroy
{
    void operator()(CUstream_st* stream) const noexcept
    {
        cudaStreamDestroy(stream);
    }
};
using Stream = std::unique_ptr<CUstream_st, StreamDestroy>;

std::vector<char> readEngine(std::string const& path)
{
    std::error_code error;
    if (!std::filesystem::is_regular_file(path, error))
    {
        throw AppError(kEXIT_BAD_INPUT, "no engine file at " + path
                + ": pass the engine `lowbit-deploy build RUN_DIR` wrote (RUN_DIR/model.engine)");
    }
    std::ifstream file(path, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (!file.good() && !file.eof())
    {
        throw AppError(kEXIT_BAD_INPUT, "cannot read the engine file " + path);
    }
    if (bytes.empty())
    {
        throw AppError(kEXIT_BAD_INPUT, "the engine file " + path + " is empty: build it again");
    }
    return bytes;
}

// lowbit plugin libraries carry "lowbit-plugin-build-info: tensorrt-headers=MAJOR.MINOR.PATCH" in their bytes
// (plugins/api/lowbitPlugins.cpp). A library compiled against another header family than this app's runtime loads
// but calls into the wrong vtable slots (shared/docs/TENSORRT.md), so it is refused here, before TensorRT sees it.
void checkLowbitHeaderFamily(std::string const& path)
{
    std::ifstream file(path, std::ios::binary);
    std::string const bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    std::string const marker = "lowbit-plugin-build-info: tensorrt-headers=";
    size_t const found = bytes.find(marker);
    if (found == std::string::npos)
    {
        return; // not a lowbit library: nothing to compare
    }
    int const major = std::atoi(bytes.c_str() + found + marker.size());
    if (major != NV_TENSORRT_MAJOR)
    {
        throw AppError(kEXIT_BAD_INPUT, path + " was compiled against TensorRT " + std::to_string(major)
                + ".x headers, but this app runs TensorRT " + std::to_string(NV_TENSORRT_MAJOR)
                + ".x / TensorRT-RTX 1.x: pass plugins/build/liblowbit_plugins_trt" + std::to_string(NV_TENSORRT_MAJOR)
                + ".so (built by `make plugins`)");
    }
}

// IPluginRegistry::loadLibrary (TensorRT's documented entry for plugin libraries) dlopen()s the file, hands it the
// logger finder and registers what getCreators() returns; a bare dlopen would register nothing, because the lowbit
// library deliberately does not register itself at load time. loadLibrary only answers "null" on failure, so the
// file is opened once beforehand to name the reason (missing file, missing dependency, not a plugin library).
void loadPluginLibrary(nvinfer1::IRuntime& runtime, std::string const& path)
{
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr)
    {
        char const* reason = dlerror();
        throw AppError(kEXIT_BAD_INPUT, "cannot load the plugin library " + path + ": "
                + (reason ? reason : "unknown reason")
                + ". Pass the library the engine was built with (plugins/build/liblowbit_plugins_trt"
                + std::to_string(NV_TENSORRT_MAJOR) + ".so, built by `make plugins`), or 'none' for an engine "
                + "without plugin layers");
    }
    bool const isPluginLibrary = dlsym(handle, "getCreators") != nullptr || dlsym(handle, "getPluginCreators") != nullptr;
    dlclose(handle);
    if (!isPluginLibrary)
    {
        throw AppError(kEXIT_BAD_INPUT, path + " exports neither getCreators nor getPluginCreators: it is not a "
                "TensorRT plugin library. Pass plugins/build/liblowbit_plugins_trt" + std::to_string(NV_TENSORRT_MAJOR)
                + ".so");
    }
    checkLowbitHeaderFamily(path);

    nvinfer1::IPluginRegistry& registry = runtime.getPluginRegistry();
    int32_t before = 0;
    registry.getAllCreators(&before);
    if (registry.loadLibrary(path.c_str()) == nullptr)
    {
        throw AppError(kEXIT_BAD_INPUT, "TensorRT refused the plugin library " + path
                + " (its messages above say why); was it built for this TensorRT family?");
    }
    int32_t after = 0;
    registry.getAllCreators(&after);
    std::printf("plugin library: %s (%d plugin creators registered)\n", path.c_str(), after - before);
}

// The first point that needs a GPU: a clear stop, not a TensorRT error deep inside deserialization.
void requireGpu()
{
    int count = 0;
    cudaError_t const status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0)
    {
        std::string const reason = status != cudaSuccess
            ? std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status)
            : std::string("no CUDA device found");
        throw AppError(kEXIT_NO_GPU, "no usable CUDA GPU (" + reason + "). Executing a TensorRT engine needs an "
                "NVIDIA GPU and driver, of the compute capability the engine was built for (RUN_DIR/report.json: "
                "build.compute_capabilities). Run this on such a machine; everything before execution (arguments, "
                "input files, TensorRT runtime, plugin library) was checked and is fine.");
    }
    cudaDeviceProp properties{};
    checkCuda(cudaGetDeviceProperties(&properties, 0), "cudaGetDeviceProperties");
    std::printf("GPU: %s (SM %d.%d)\n", properties.name, properties.major, properties.minor);
}

nvinfer1::Dims toDims(std::vector<int64_t> const& shape, std::string const& name)
{
    nvinfer1::Dims dims{};
    if (shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS))
    {
        throw AppError(kEXIT_BAD_INPUT, "input '" + name + "' has rank " + std::to_string(shape.size())
                + "; TensorRT allows at most " + std::to_string(nvinfer1::Dims::MAX_DIMS));
    }
    dims.nbDims = static_cast<int32_t>(shape.size());
    for (size_t axis = 0; axis < shape.size(); ++axis)
    {
        dims.d[axis] = shape[axis];
    }
    return dims;
}

std::vector<int64_t> toShape(nvinfer1::Dims const& dims)
{
    return std::vector<int64_t>(dims.d, dims.d + std::max(dims.nbDims, 0));
}

struct Binding
{
    HostTensor host;
    DeviceBuffer device;
    bool isInput;
};

// Matches the files to the engine's inputs one for one and sets every input shape (engine profile 0).
std::vector<Binding> bindInputs(nvinfer1::ICudaEngine const& engine, nvinfer1::IExecutionContext& context,
    std::vector<HostTensor> inputs)
{
    std::vector<Binding> bindings;
    std::string engineInputs;
    for (int32_t index = 0; index < engine.getNbIOTensors(); ++index)
    {
        char const* name = engine.getIOTensorName(index);
        if (engine.getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT)
        {
            engineInputs += (engineInputs.empty() ? "" : ", ") + std::string(name);
        }
    }
    for (HostTensor& tensor : inputs)
    {
        char const* name = tensor.name.c_str();
        if (engine.getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT)
        {
            throw AppError(kEXIT_BAD_INPUT, "the input directory has '" + tensor.name
                    + "', which is not an input of the engine (its inputs: " + engineInputs + ")");
        }
        std::string const expected = dtypeName(engine.getTensorDataType(name));
        if (tensor.dtype != expected)
        {
            throw AppError(kEXIT_BAD_INPUT, "input '" + tensor.name + "' is " + tensor.dtype + " in the file, but the "
                    "engine takes " + expected + ": write it as " + expected);
        }
        if (engine.getTensorLocation(name) != nvinfer1::TensorLocation::kDEVICE)
        {
            throw AppError(kEXIT_RUN_FAILED, "input '" + tensor.name + "' is a host (shape) tensor; this app feeds "
                    "device tensors only");
        }
        if (engine.getTensorVectorizedDim(name) != -1)
        {
            throw AppError(kEXIT_RUN_FAILED, "input '" + tensor.name + "' has a vectorized format ("
                    + engine.getTensorFormatDesc(name) + "); this app reads linear (C order) tensors only");
        }
        if (!context.setInputShape(name, toDims(tensor.shape, tensor.name)))
        {
            std::string const low = shapeText(toShape(engine.getProfileShape(name, 0, nvinfer1::OptProfileSelector::kMIN)));
            std::string const high = shapeText(toShape(engine.getProfileShape(name, 0, nvinfer1::OptProfileSelector::kMAX)));
            throw AppError(kEXIT_BAD_INPUT, "the engine refuses shape [" + shapeText(tensor.shape) + "] for input '"
                    + tensor.name + "': its profile allows [" + low + "] to [" + high
                    + "]; write inputs in that range or rebuild the engine with a wider profile");
        }
        bindings.push_back(Binding{std::move(tensor), nullptr, true});
    }
    if (!context.allInputDimensionsSpecified())
    {
        throw AppError(kEXIT_BAD_INPUT, "the input directory lacks some of the engine's inputs (" + engineInputs
                + "); write all of them (examples/cpp_app/make_inputs.py)");
    }
    return bindings;
}

void addOutputs(nvinfer1::ICudaEngine const& engine, nvinfer1::IExecutionContext const& context,
    std::vector<Binding>& bindings)
{
    for (int32_t index = 0; index < engine.getNbIOTensors(); ++index)
    {
        char const* name = engine.getIOTensorName(index);
        if (engine.getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT)
        {
            continue;
        }
        HostTensor output{name, dtypeName(engine.getTensorDataType(name)), toShape(context.getTensorShape(name)), {}};
        for (int64_t extent : output.shape)
        {
            if (extent < 0)
            {
                throw AppError(kEXIT_RUN_FAILED, "output '" + output.name + "' has a data-dependent shape ["
                        + shapeText(output.shape) + "]; this app supports outputs whose shape follows from the inputs");
            }
        }
        output.bytes.resize(static_cast<size_t>(elementCount(output.shape)) * dtypeSize(output.dtype));
        bindings.push_back(Binding{std::move(output), nullptr, false});
    }
}

void run(std::string const& enginePath, std::string const& pluginPath, std::string const& inputDir,
    std::string const& outputDir)
{
    std::vector<char> const engineBytes = readEngine(enginePath);
    std::vector<HostTensor> inputs = readTensorDirectory(inputDir);

    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
    if (!runtime)
    {
        throw AppError(kEXIT_RUN_FAILED, "createInferRuntime failed (messages above): the TensorRT library this app "
                "loaded does not accept " + std::to_string(NV_TENSORRT_MAJOR) + ".x headers; rebuild the app against "
                "that installation's headers (-DTensorRT_INCLUDE_DIR=...)");
    }
    int32_t const version = getInferLibVersion();
    std::printf("TensorRT library %d.%d.%d (app compiled against %d.%d headers)\n", version / 10000,
        version / 100 % 100, version % 100, NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR);
    if (pluginPath != "none")
    {
        loadPluginLibrary(*runtime, pluginPath);
    }

    requireGpu();
    std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(engineBytes.data(), engineBytes.size())};
    if (!engine)
    {
        throw AppError(kEXIT_RUN_FAILED, "TensorRT could not deserialize " + enginePath + " (messages above). Usual "
                "causes: the engine was built for another GPU compute capability or TensorRT version than this one "
                "(rebuild it: lowbit-deploy build RUN_DIR), or a plugin layer has no registered creator (pass the "
                "plugin library the engine was built with)");
    }
    std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};
    if (!context)
    {
        throw AppError(kEXIT_RUN_FAILED, "createExecutionContext failed (messages above; out of GPU memory?)");
    }

    std::vector<Binding> bindings = bindInputs(*engine, *context, std::move(inputs));
    addOutputs(*engine, *context, bindings);

    Stream stream;
    {
        cudaStream_t created = nullptr;
        checkCuda(cudaStreamCreate(&created), "cudaStreamCreate");
        stream.reset(created);
    }
    for (Binding& binding : bindings)
    {
        void* pointer = nullptr;
        // At least one byte: an empty tensor still needs a valid, distinct address.
        checkCuda(cudaMalloc(&pointer, std::max<size_t>(binding.host.bytes.size(), 1)),
            "cudaMalloc of " + std::to_string(binding.host.bytes.size()) + " bytes for '" + binding.host.name + "'");
        binding.device.reset(pointer);
        if (binding.isInput)
        {
            checkCuda(cudaMemcpyAsync(pointer, binding.host.bytes.data(), binding.host.bytes.size(),
                          cudaMemcpyHostToDevice, stream.get()),
                "copying input '" + binding.host.name + "' to the GPU");
        }
        if (!context->setTensorAddress(binding.host.name.c_str(), pointer))
        {
            throw AppError(kEXIT_RUN_FAILED, "setTensorAddress('" + binding.host.name + "') failed (messages above)");
        }
    }
    if (!context->enqueueV3(stream.get()))
    {
        throw AppError(kEXIT_RUN_FAILED, "enqueueV3 failed (messages above)");
    }
    for (Binding& binding : bindings)
    {
        if (!binding.isInput)
        {
            checkCuda(cudaMemcpyAsync(binding.host.bytes.data(), binding.device.get(), binding.host.bytes.size(),
                          cudaMemcpyDeviceToHost, stream.get()),
                "copying output '" + binding.host.name + "' from the GPU");
        }
    }
    // Errors of the kernels themselves (a plugin's included) surface here, not at enqueue time.
    checkCuda(cudaStreamSynchronize(stream.get()), "running the engine (cudaStreamSynchronize)");

    std::vector<HostTensor> outputs;
    for (Binding& binding : bindings)
    {
        if (!binding.isInput)
        {
            std::printf("output %s: %s [%s]\n", binding.host.name.c_str(), binding.host.dtype.c_str(),
                shapeText(binding.host.shape).c_str());
            outputs.push_back(std::move(binding.host));
        }
    }
    writeTensorDirectory(outputDir, outputs);
    std::printf("wrote %zu output(s) to %s\n", outputs.size(), outputDir.c_str());
}

} // namespace
} // namespace cpp_app

int main(int argc, char** argv)
{
    if (argc != 5)
    {
        std::fprintf(stderr,
            "usage: %s ENGINE PLUGIN_LIBRARY INPUT_DIR OUTPUT_DIR\n"
            "  ENGINE          a serialized engine (lowbit-deploy build writes RUN_DIR/model.engine)\n"
            "  PLUGIN_LIBRARY  plugins/build/liblowbit_plugins_trt%d.so, or 'none' for an engine without plugins\n"
            "  INPUT_DIR       tensors.txt + NAME.bin per input (examples/cpp_app/make_inputs.py writes them)\n"
            "  OUTPUT_DIR      receives tensors.txt + NAME.bin per output\n",
            argc > 0 ? argv[0] : "lowbit_cpp_app", NV_TENSORRT_MAJOR);
        return cpp_app::kEXIT_BAD_INPUT;
    }
    try
    {
        cpp_app::run(argv[1], argv[2], argv[3], argv[4]);
        std::printf("PASSED | lowbit_cpp_app | %s\n", argv[1]);
        return 0;
    }
    catch (cpp_app::AppError const& error)
    {
        std::fprintf(stderr, "error: %s\n", error.what());
        std::printf("FAILED | lowbit_cpp_app | %s\n", argv[1]);
        return error.exitCode;
    }
    catch (std::exception const& error)
    {
        std::fprintf(stderr, "internal error: %s\n", error.what());
        std::printf("FAILED | lowbit_cpp_app | %s\n", argv[1]);
        return cpp_app::kEXIT_RUN_FAILED;
    }
}
