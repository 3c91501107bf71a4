#include "unpackDequantizePlugin.h"

#include "../common/lowbitFormat.h"
#include "../common/pluginLogging.h"
#include "unpackDequantizeKernel.h"

#include <string>
#include <utility>

namespace lowbit
{
namespace plugin
{
namespace
{
constexpr int32_t kNB_INPUTS = 2;
constexpr int32_t kNB_OUTPUTS = 1;
constexpr int32_t kPACKED_INPUT = 0;
constexpr int32_t kSCALE_INPUT = 1;
} // namespace

UnpackDequantizePlugin::UnpackDequantizePlugin(UnpackDequantizeFields fields)
    : mFields(std::move(fields))
{
}

nvinfer1::IPluginCapability* UnpackDequantizePlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept
{
    try
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        reportError("unknown plugin capability type " + std::to_string(static_cast<int32_t>(type)), mErrorRecorder);
    }
    catch (std::exception const& error)
    {
        reportException("getCapabilityInterface", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("getCapabilityInterface", mErrorRecorder);
    }
    return nullptr;
}

nvinfer1::IPluginV3* UnpackDequantizePlugin::clone() noexcept
{
    try
    {
        auto copy = std::make_unique<UnpackDequantizePlugin>(mFields);
        copy->mErrorRecorder = mErrorRecorder;
        return copy.release();
    }
    catch (std::exception const& error)
    {
        reportException("clone", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("clone", mErrorRecorder);
    }
    return nullptr;
}

char const* UnpackDequantizePlugin::getPluginName() const noexcept
{
    return kUNPACK_DEQUANTIZE_NAME;
}

char const* UnpackDequantizePlugin::getPluginVersion() const noexcept
{
    return mFields.versionString();
}

char const* UnpackDequantizePlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

void UnpackDequantizePlugin::checkIo(nvinfer1::Dims const* inputDims, int32_t nbInputs, int32_t nbOutputs) const
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        throw FieldError("expected 2 inputs (packed, scale) and 1 output, got " + std::to_string(nbInputs)
            + " inputs and " + std::to_string(nbOutputs) + " outputs");
    }
    for (int32_t index : {kPACKED_INPUT, kSCALE_INPUT})
    {
        if (inputDims[index].nbDims != 1)
        {
            throw FieldError("input " + std::to_string(index) + " must be one-dimensional, got "
                + std::to_string(inputDims[index].nbDims) + " dimensions");
        }
    }
    checkInputLengths(mFields, inputDims[kPACKED_INPUT].d[0], inputDims[kSCALE_INPUT].d[0]);
}

int32_t UnpackDequantizePlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    try
    {
        if (in == nullptr && nbInputs > 0)
        {
            throw FieldError("configurePlugin: no input descriptions");
        }
        nvinfer1::Dims dims[kNB_INPUTS];
        for (int32_t i = 0; i < nbInputs && i < kNB_INPUTS; ++i)
        {
            dims[i] = in[i].desc.dims;
        }
        checkIo(dims, nbInputs, nbOutputs);
        return 0;
    }
    catch (std::exception const& error)
    {
        reportException("configurePlugin", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("configurePlugin", mErrorRecorder);
    }
    return -1;
}

int32_t UnpackDequantizePlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* /* inputTypes */, int32_t /* nbInputs */) const noexcept
{
    try
    {
        if (outputTypes == nullptr || nbOutputs != kNB_OUTPUTS)
        {
            throw FieldError("getOutputDataTypes: expected 1 output, got " + std::to_string(nbOutputs));
        }
        outputTypes[0] = nvinfer1::DataType::kFLOAT;
        return 0;
    }
    catch (std::exception const& error)
    {
        reportException("getOutputDataTypes", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("getOutputDataTypes", mErrorRecorder);
    }
    return -1;
}

int32_t UnpackDequantizePlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /* shapeInputs */, int32_t /* nbShapeInputs */, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    try
    {
        if (inputs == nullptr || outputs == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
        {
            throw FieldError("expected 2 inputs (packed, scale) and 1 output, got " + std::to_string(nbInputs)
                + " inputs and " + std::to_string(nbOutputs) + " outputs");
        }
        // The packed weight and its scales are initializers: their lengths are build-time constants, so a mismatch
        // with the fields (an out-of-bounds read at run time) is refused here, before the engine exists.
        nvinfer1::Dims lengths[kNB_INPUTS];
        bool constant = true;
        for (int32_t index : {kPACKED_INPUT, kSCALE_INPUT})
        {
            lengths[index].nbDims = inputs[index].nbDims;
            if (inputs[index].nbDims == 1)
            {
                constant = constant && inputs[index].d[0]->isConstant();
                lengths[index].d[0] = constant ? inputs[index].d[0]->getConstantValue() : -1;
            }
        }
        if (constant)
        {
            checkIo(lengths, nbInputs, nbOutputs);
        }
        outputs[0].nbDims = static_cast<int32_t>(mFields.shape.size());
        for (size_t axis = 0; axis < mFields.shape.size(); ++axis)
        {
            outputs[0].d[axis] = exprBuilder.constant(mFields.shape[axis]);
        }
        return 0;
    }
    catch (std::exception const& error)
    {
        reportException("getOutputShapes", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("getOutputShapes", mErrorRecorder);
    }
    return -1;
}

bool UnpackDequantizePlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    try
    {
        if (inOut == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0
            || pos >= kNB_INPUTS + kNB_OUTPUTS)
        {
            return false;
        }
        nvinfer1::DataType const wanted[] = {mFields.packedType(), nvinfer1::DataType::kHALF, nvinfer1::DataType::kFLOAT};
        nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
        return desc.format == nvinfer1::TensorFormat::kLINEAR && desc.type == wanted[pos];
    }
    catch (std::exception const& error)
    {
        reportException("supportsFormatCombination", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("supportsFormatCombination", mErrorRecorder);
    }
    return false;
}

int32_t UnpackDequantizePlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

size_t UnpackDequantizePlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* /* inputs */,
    int32_t /* nbInputs */, nvinfer1::DynamicPluginTensorDesc const* /* outputs */,
    int32_t /* nbOutputs */) const noexcept
{
    return 0;
}

int32_t UnpackDequantizePlugin::getValidTactics(int32_t* /* tactics */, int32_t /* nbTactics */) noexcept
{
    return 0;
}

int32_t UnpackDequantizePlugin::getNbTactics() noexcept
{
    return 0;
}

char const* UnpackDequantizePlugin::getTimingCacheID() noexcept
{
    // Every instance with the same I/O shapes times the same: one cache entry for all (as the Python plugin).
    return "";
}

int32_t UnpackDequantizePlugin::setTactic(int32_t /* tactic */) noexcept
{
    return 0;
}

int32_t UnpackDequantizePlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    try
    {
        if (in == nullptr && nbInputs > 0)
        {
            throw FieldError("onShapeChange: no input descriptions");
        }
        nvinfer1::Dims dims[kNB_INPUTS];
        for (int32_t i = 0; i < nbInputs && i < kNB_INPUTS; ++i)
        {
            dims[i] = in[i].dims;
        }
        checkIo(dims, nbInputs, nbOutputs);
        return 0;
    }
    catch (std::exception const& error)
    {
        reportException("onShapeChange", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("onShapeChange", mErrorRecorder);
    }
    return -1;
}

int32_t UnpackDequantizePlugin::enqueue(nvinfer1::PluginTensorDesc const* /* inputDesc */,
    nvinfer1::PluginTensorDesc const* /* outputDesc */, void const* const* inputs, void* const* outputs,
    void* /* workspace */, cudaStream_t stream) noexcept
{
    try
    {
        if (inputs == nullptr || outputs == nullptr)
        {
            throw FieldError("enqueue: no input or output buffers");
        }
        auto const* scale = static_cast<uint16_t const*>(inputs[kSCALE_INPUT]);
        auto* out = static_cast<float*>(outputs[0]);
        // The kernel library validates its arguments again and returns a code instead of throwing.
        int32_t const status = mFields.version == OpVersion::kWORDS
            ? lowbit_unpack_dequantize_launch(inputs[kPACKED_INPUT], mFields.wordBits, scale, out, mFields.numel(),
                mFields.channels(), mFields.levels, mFields.qmin, mFields.codesPerWord, stream)
            : lowbit_unpack_dequantize_bitstream_launch(inputs[kPACKED_INPUT], mFields.packedElements(), scale, out,
                mFields.numel(), mFields.channels(), mFields.levels, mFields.qmin, mFields.groupSize,
                mFields.groupBits, stream);
        if (status != 0)
        {
            reportError(std::string("enqueue: kernel launch failed: ") + lowbit_error_string(status), mErrorRecorder,
                status > 0 ? nvinfer1::ErrorCode::kFAILED_EXECUTION : nvinfer1::ErrorCode::kINVALID_ARGUMENT);
            return status;
        }
        return 0;
    }
    catch (std::exception const& error)
    {
        reportException("enqueue", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("enqueue", mErrorRecorder);
    }
    return -1;
}

nvinfer1::IPluginV3* UnpackDequantizePlugin::attachToContext(nvinfer1::IPluginResourceContext* context) noexcept
{
    try
    {
        auto copy = std::make_unique<UnpackDequantizePlugin>(mFields);
        copy->mErrorRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
        return copy.release();
    }
    catch (std::exception const& error)
    {
        reportException("attachToContext", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("attachToContext", mErrorRecorder);
    }
    return nullptr;
}

nvinfer1::PluginFieldCollection const* UnpackDequantizePlugin::getFieldsToSerialize() noexcept
{
    try
    {
        // Rebuilt per call and kept on the plugin: TensorRT reads the buffers after this returns.
        mSerialized = std::make_unique<SerializedFields>(mFields);
        return mSerialized->collection();
    }
    catch (std::exception const& error)
    {
        reportException("getFieldsToSerialize", error, mErrorRecorder);
    }
    catch (...)
    {
        reportUnknownException("getFieldsToSerialize", mErrorRecorder);
    }
    return nullptr;
}

UnpackDequantizePluginCreator::UnpackDequantizePluginCreator(OpVersion version)
    : mVersion(version)
    , mFieldNames(fieldNames(version)) // declared as the Python creator declares them (INT32, no data)
{
}

nvinfer1::IPluginV3* UnpackDequantizePluginCreator::createPlugin(
    char const* /* name */, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /* phase */) noexcept
{
    try
    {
        return new UnpackDequantizePlugin(parseFields(mVersion, fc));
    }
    catch (std::exception const& error)
    {
        reportException(mVersion == OpVersion::kWORDS ? "createPlugin (v1)" : "createPlugin (v2)", error);
    }
    catch (...)
    {
        reportUnknownException("createPlugin");
    }
    return nullptr;
}

nvinfer1::PluginFieldCollection const* UnpackDequantizePluginCreator::getFieldNames() noexcept
{
    return mFieldNames.collection();
}

char const* UnpackDequantizePluginCreator::getPluginName() const noexcept
{
    return kUNPACK_DEQUANTIZE_NAME;
}

char const* UnpackDequantizePluginCreator::getPluginVersion() const noexcept
{
    return mVersion == OpVersion::kWORDS ? kUNPACK_DEQUANTIZE_VERSION : kUNPACK_DEQUANTIZE_BITSTREAM_VERSION;
}

char const* UnpackDequantizePluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

} // namespace plugin
} // namespace lowbit
