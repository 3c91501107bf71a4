#include "unpackDequantizePlugin.h"

#include "../common/lowbitFormat.h"
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

//! Runs the kernel library's launcher of `fields` (version, output type); returns its status code.
int32_t launch(UnpackDequantizeFields const& fields, void const* packed, uint16_t const* scale, void* out,
    bool outputHalf, cudaStream_t stream)
{
    if (fields.version == OpVersion::kWORDS)
    {
        return outputHalf ? lowbit_unpack_dequantize_launch_fp16(packed, fields.wordBits, scale,
                   static_cast<uint16_t*>(out), fields.numel(), fields.channels(), fields.levels, fields.qmin,
                   fields.codesPerWord, stream)
                          : lowbit_unpack_dequantize_launch(packed, fields.wordBits, scale, static_cast<float*>(out),
                              fields.numel(), fields.channels(), fields.levels, fields.qmin, fields.codesPerWord,
                              stream);
    }
    return outputHalf ? lowbit_unpack_dequantize_bitstream_launch_fp16(packed, fields.packedElements(), scale,
               static_cast<uint16_t*>(out), fields.numel(), fields.channels(), fields.levels, fields.qmin,
               fields.groupSize, fields.groupBits, stream)
                      : lowbit_unpack_dequantize_bitstream_launch(packed, fields.packedElements(), scale,
                          static_cast<float*>(out), fields.numel(), fields.channels(), fields.levels, fields.qmin,
                          fields.groupSize, fields.groupBits, stream);
}
} // namespace

UnpackDequantizePlugin::UnpackDequantizePlugin(UnpackDequantizeFields fields)
    : LowbitPluginOf(kUNPACK_DEQUANTIZE_NAME, fields.versionString(), std::move(fields)) // a static string
{
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
    nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guard<int32_t>("configurePlugin", -1, [&]() -> int32_t {
        if (in == nullptr && nbInputs > 0)
        {
            throw FieldError("configurePlugin: no input descriptions");
        }
        nvinfer1::Dims dims[kNB_INPUTS]{};
        for (int32_t i = 0; i < nbInputs && i < kNB_INPUTS; ++i)
        {
            dims[i] = in[i].desc.dims;
        }
        checkIo(dims, nbInputs, nbOutputs);
        if (out != nullptr)
        {
            checkOutputType(out[0].desc.type, "configurePlugin");
        }
        return 0;
    });
}

int32_t UnpackDequantizePlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* /* inputTypes */, int32_t /* nbInputs */) const noexcept
{
    return guard<int32_t>("getOutputDataTypes", -1, [&]() -> int32_t {
        if (outputTypes == nullptr || nbOutputs != kNB_OUTPUTS)
        {
            throw FieldError("getOutputDataTypes: expected 1 output, got " + std::to_string(nbOutputs));
        }
        // The op's output type. HALF is offered through supportsFormatCombination: a network that is not strongly
        // typed may pick it; a strongly typed one (every TensorRT-RTX network) keeps this type.
        outputTypes[0] = nvinfer1::DataType::kFLOAT;
        return 0;
    });
}

int32_t UnpackDequantizePlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /* shapeInputs */, int32_t /* nbShapeInputs */, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    return guard<int32_t>("getOutputShapes", -1, [&]() -> int32_t {
        if (inputs == nullptr || outputs == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
        {
            throw FieldError("expected 2 inputs (packed, scale) and 1 output, got " + std::to_string(nbInputs)
                + " inputs and " + std::to_string(nbOutputs) + " outputs");
        }
        // The packed weight and its scales are initializers: their lengths are build-time constants, so a mismatch
        // with the fields (an out-of-bounds read at run time) is refused here, before the engine exists.
        nvinfer1::Dims lengths[kNB_INPUTS]{};
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
    });
}

bool UnpackDequantizePlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return guard<bool>("supportsFormatCombination", false, [&]() -> bool {
        if (inOut == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0
            || pos >= kNB_INPUTS + kNB_OUTPUTS)
        {
            return false;
        }
        nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != nvinfer1::TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case kPACKED_INPUT: return desc.type == mFields.packedType();
        case kSCALE_INPUT: return desc.type == nvinfer1::DataType::kHALF;
        default: return isFloatOrHalf(desc.type); // float32, or float16 for networks that run in half precision
        }
    });
}

int32_t UnpackDequantizePlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    return guard<int32_t>("onShapeChange", -1, [&]() -> int32_t {
        if (in == nullptr && nbInputs > 0)
        {
            throw FieldError("onShapeChange: no input descriptions");
        }
        nvinfer1::Dims dims[kNB_INPUTS]{};
        for (int32_t i = 0; i < nbInputs && i < kNB_INPUTS; ++i)
        {
            dims[i] = in[i].dims;
        }
        checkIo(dims, nbInputs, nbOutputs);
        return 0;
    });
}

int32_t UnpackDequantizePlugin::enqueue(nvinfer1::PluginTensorDesc const* /* inputDesc */,
    nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs, void* const* outputs,
    void* /* workspace */, cudaStream_t stream) noexcept
{
    return guard<int32_t>("enqueue", -1, [&]() -> int32_t {
        if (inputs == nullptr || outputs == nullptr || outputDesc == nullptr)
        {
            throw FieldError("enqueue: no input or output buffers");
        }
        checkOutputType(outputDesc[0].type, "enqueue");
        // The kernel library validates its arguments again and returns a code instead of throwing.
        auto const* scale = static_cast<uint16_t const*>(inputs[kSCALE_INPUT]);
        int32_t const status = launch(mFields, inputs[kPACKED_INPUT], scale, outputs[0],
            outputDesc[0].type == nvinfer1::DataType::kHALF, stream);
        if (status != 0)
        {
            report(std::string("enqueue: kernel launch failed: ") + lowbit_error_string(status),
                status > 0 ? nvinfer1::ErrorCode::kFAILED_EXECUTION : nvinfer1::ErrorCode::kINVALID_ARGUMENT);
        }
        return status;
    });
}

UnpackDequantizePluginCreator::UnpackDequantizePluginCreator(OpVersion version)
    : LowbitPluginCreator(kUNPACK_DEQUANTIZE_NAME,
        version == OpVersion::kWORDS ? kUNPACK_DEQUANTIZE_VERSION : kUNPACK_DEQUANTIZE_BITSTREAM_VERSION,
        fieldNames(version)) // declared as the Python creator declares them (INT32, no data)
    , mVersion(version)
{
}

nvinfer1::IPluginV3* UnpackDequantizePluginCreator::createPlugin(
    char const* /* name */, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /* phase */) noexcept
{
    char const* const where = mVersion == OpVersion::kWORDS ? "createPlugin (v1)" : "createPlugin (v2)";
    return guarded<nvinfer1::IPluginV3*>(where, nullptr, kUNPACK_DEQUANTIZE_NAME, nullptr,
        [&]() -> nvinfer1::IPluginV3* { return new UnpackDequantizePlugin(parseFields(mVersion, fc)); });
}

} // namespace plugin
} // namespace lowbit
