/*
 * The library's only exports (shared/docs/TENSORRT.md, "C++ plugin libraries"): getCreators() for
 * IPluginRegistry::loadLibrary / trt.get_plugin_registry().load_library, and setLoggerFinder(). Everything else has
 * hidden visibility (plugins/api/exports.map). The library does not register itself at load time: combined with
 * getCreators, load_library would then fail and leave a dangling creator.
 */
#include "../common/pluginLogging.h"
#include "../quantize_dequantize_activation/quantizeDequantizeActivationPlugin.h"
#include "../unpack_dequantize/unpackDequantizePlugin.h"

#include <NvInferRuntime.h>

#define LOWBIT_STRINGIFY_(x) #x
#define LOWBIT_STRINGIFY(x) LOWBIT_STRINGIFY_(x)

namespace
{
// Found in the file's bytes by lowbit_deploy/engines/plugin_library.py (no extra export needed): a library compiled
// against other TensorRT headers than its runtime's family is refused before anything is built.
[[gnu::used]] char const kBUILD_INFO[] = "lowbit-plugin-build-info: tensorrt-headers="
    LOWBIT_STRINGIFY(NV_TENSORRT_MAJOR) "." LOWBIT_STRINGIFY(NV_TENSORRT_MINOR) "." LOWBIT_STRINGIFY(NV_TENSORRT_PATCH)
    "; ops=UnpackDequantize:1,2;QuantizeDequantizeActivation:1;";
} // namespace

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    lowbit::plugin::setLoggerFinder(finder);
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    try
    {
        // Function-local statics: constructed on first use, alive until the library is unloaded.
        static lowbit::plugin::UnpackDequantizePluginCreator words(lowbit::plugin::OpVersion::kWORDS);
        static lowbit::plugin::UnpackDequantizePluginCreator bitstream(lowbit::plugin::OpVersion::kBITSTREAM);
        static lowbit::plugin::QuantizeDequantizeActivationPluginCreator activation;
        static nvinfer1::IPluginCreatorInterface* const creators[] = {&words, &bitstream, &activation};
        nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
        return creators;
    }
    catch (std::exception const& error)
    {
        lowbit::plugin::reportException("getCreators", error);
    }
    catch (...)
    {
        lowbit::plugin::reportUnknownException("getCreators");
    }
    nbCreators = 0;
    return nullptr;
}
