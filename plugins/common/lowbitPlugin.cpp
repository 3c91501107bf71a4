#include "lowbitPlugin.h"

#include "lowbitFormat.h"

#include <string>

namespace lowbit
{
namespace plugin
{

void checkOutputType(nvinfer1::DataType type, char const* where)
{
    if (!isFloatOrHalf(type))
    {
        throw FieldError(std::string(where) + ": the output must be FLOAT or HALF, got DataType "
            + std::to_string(static_cast<int32_t>(type)));
    }
}

nvinfer1::IPluginCapability* LowbitPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    return guard<nvinfer1::IPluginCapability*>("getCapabilityInterface", nullptr,
        [&]() -> nvinfer1::IPluginCapability* {
            switch (type)
            {
            case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
            case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
            case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
            }
            throw FieldError("unknown plugin capability type " + std::to_string(static_cast<int32_t>(type)));
        });
}

nvinfer1::IPluginV3* LowbitPlugin::clone() noexcept
{
    return guard<nvinfer1::IPluginV3*>("clone", nullptr, [&]() -> nvinfer1::IPluginV3* {
        std::unique_ptr<LowbitPlugin> duplicate = copy();
        duplicate->mErrorRecorder = mErrorRecorder;
        return duplicate.release();
    });
}

char const* LowbitPlugin::getPluginName() const noexcept
{
    return mOpName;
}

char const* LowbitPlugin::getPluginVersion() const noexcept
{
    return mVersion;
}

char const* LowbitPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t LowbitPlugin::getNbOutputs() const noexcept
{
    return 1;
}

size_t LowbitPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* /* inputs */, int32_t /* nbInputs */,
    nvinfer1::DynamicPluginTensorDesc const* /* outputs */, int32_t /* nbOutputs */) const noexcept
{
    return 0;
}

int32_t LowbitPlugin::getValidTactics(int32_t* /* tactics */, int32_t /* nbTactics */) noexcept
{
    return 0;
}

int32_t LowbitPlugin::getNbTactics() noexcept
{
    return 0;
}

char const* LowbitPlugin::getTimingCacheID() noexcept
{
    // Every instance with the same I/O shapes times the same: one cache entry for all (as the Python plugins).
    return "";
}

int32_t LowbitPlugin::setTactic(int32_t /* tactic */) noexcept
{
    return 0;
}

nvinfer1::IPluginV3* LowbitPlugin::attachToContext(nvinfer1::IPluginResourceContext* context) noexcept
{
    return guard<nvinfer1::IPluginV3*>("attachToContext", nullptr, [&]() -> nvinfer1::IPluginV3* {
        std::unique_ptr<LowbitPlugin> attached = copy();
        attached->mErrorRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
        return attached.release();
    });
}

nvinfer1::PluginFieldCollection const* LowbitPlugin::getFieldsToSerialize() noexcept
{
    return guard<nvinfer1::PluginFieldCollection const*>(
        "getFieldsToSerialize", nullptr, [&]() -> nvinfer1::PluginFieldCollection const* { return serializeFields(); });
}

void LowbitPlugin::report(std::string const& message, nvinfer1::ErrorCode code) const noexcept
{
    reportError(message, mErrorRecorder, code, mOpName);
}

nvinfer1::PluginFieldCollection const* LowbitPluginCreator::getFieldNames() noexcept
{
    return mFieldNames.collection();
}

char const* LowbitPluginCreator::getPluginName() const noexcept
{
    return mOpName;
}

char const* LowbitPluginCreator::getPluginVersion() const noexcept
{
    return mVersion;
}

char const* LowbitPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

} // namespace plugin
} // namespace lowbit
