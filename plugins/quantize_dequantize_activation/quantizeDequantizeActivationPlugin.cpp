#include "quantizeDequantizeActivationPlugin.h"

#include "../common/lowbitFormat.h"
#include "../common/pluginLogging.h"
#include "quantizeDequantizeActivationKernel.h"

#include <string>

namespace lowbit
{
namespace plugin
{
namespace
{
constexpr char const* kOP = kQUANTIZE_DEQUANTIZE_ACTIVATION_NAME;

//! Input extents for checkActivationInputs; a dimension that is not a build-time constant is -1 (unknown).
void constantDims(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::Dims* dims)
{
    for (int32_t i = 0; i < nbInputs && i < kACTIVATION_MAX_INPUTS; ++i)
    {
        dims[i].nbDims = inputs[i].nbDims;
        for (int32_t axis = 0; axis < inputs[i].nbDims && axis < nvinfer1::Dims::MAX_DIMS; ++axis)
        {
            dims[i].d[axis] = inputs[i].d[axis]->isConstant() ? inputs[i].d[axis]->getConstantValue() : -1;
        }
    }
}
} // namespace

QuantizeDequantizeActivationPlugin::QuantizeDequantizeActivationPlugin(QuantizeDequantizeActivationFields fields)
    : LowbitPluginOf(kOP, kQUANTIZE_DEQUANTIZE_ACTIVATION_VERSION, fields)
{
}

int32_t QuantizeDequantizeActivationPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in,
    int32_t nbInputs, nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guard<int32_t>("configurePlugin", -1, [&]() -> int32_t {
        if (in == nullptr && nbInputs > 0)
        {
            throw FieldError("configurePlugin: no input descriptions");
        }
        nvinfer1::Dims dims[kACTIVATION_MAX_INPUTS]{};
        nvinfer1::DataType types[kACTIVATION_MAX_INPUTS]{};
        for (int32_t i = 0; i < nbInputs && i < kACTIVATION_MAX_INPUTS; ++i)
        {
            dims[i] = in[i].desc.dims;
            types[i] = in[i].desc.type;
        }
        checkActivationInputs(dims, nbInputs, nbOutputs);
        checkActivationInputTypes(types, nbInputs);
        if (out != nullptr)
        {
            checkOutputType(out[0].desc.type, "configurePlugin");
        }
        mNbInputs = nbInputs;
        return 0;
    });
}

int32_t QuantizeDequantizeActivationPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    return guard<int32_t>("getOutputDataTypes", -1, [&]() -> int32_t {
        if (outputTypes == nullptr || nbOutputs != 1 || (inputTypes == nullptr && nbInputs > 0))
        {
            throw FieldError("getOutputDataTypes: expected 1 output, got " + std::to_string(nbOutputs));
        }
        if (nbInputs < kACTIVATION_MIN_INPUTS || nbInputs > kACTIVATION_MAX_INPUTS)
        {
            throw FieldError("expected 3 or 4 inputs (x, scale, step_index[, zero_point]) and 1 output, got "
                + std::to_string(nbInputs) + " inputs and " + std::to_string(nbOutputs) + " outputs");
        }
        // x float32 is part of the contract: a HALF activation is refused here, while the network is built.
        checkActivationInputTypes(inputTypes, nbInputs);
        outputTypes[0] = nvinfer1::DataType::kFLOAT;
        return 0;
    });
}

int32_t QuantizeDequantizeActivationPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /* shapeInputs */, int32_t /* nbShapeInputs */, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& /* exprBuilder */) noexcept
{
    return guard<int32_t>("getOutputShapes", -1, [&]() -> int32_t {
        if (inputs == nullptr || outputs == nullptr)
        {
            throw FieldError("getOutputShapes: no input or output shapes");
        }
        // Ranks always, extents where they are build-time constants: a mismatch is refused before the engine exists.
        nvinfer1::Dims dims[kACTIVATION_MAX_INPUTS]{};
        constantDims(inputs, nbInputs, dims);
        checkActivationInputs(dims, nbInputs, nbOutputs);
        outputs[0] = inputs[kACTIVATION_X];
        return 0;
    });
}

bool QuantizeDequantizeActivationPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return guard<bool>("supportsFormatCombination", false, [&]() -> bool {
        if (inOut == nullptr || nbInputs < kACTIVATION_MIN_INPUTS || nbInputs > kACTIVATION_MAX_INPUTS
            || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs)
        {
            return false;
        }
        nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
        // Output: float32 (declared), or float16 for builds that choose precisions (inputs keep their one type).
        bool const typeOk = pos < nbInputs ? desc.type == activationInputType(pos) : isFloatOrHalf(desc.type);
        return desc.format == nvinfer1::TensorFormat::kLINEAR && typeOk;
    });
}

int32_t QuantizeDequantizeActivationPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    return guard<int32_t>("onShapeChange", -1, [&]() -> int32_t {
        if (in == nullptr && nbInputs > 0)
        {
            throw FieldError("onShapeChange: no input descriptions");
        }
        nvinfer1::Dims dims[kACTIVATION_MAX_INPUTS]{};
        for (int32_t i = 0; i < nbInputs && i < kACTIVATION_MAX_INPUTS; ++i)
        {
            dims[i] = in[i].dims;
        }
        checkActivationInputs(dims, nbInputs, nbOutputs);
        mNbInputs = nbInputs;
        return 0;
    });
}

int32_t QuantizeDequantizeActivationPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs, void* const* outputs,
    void* /* workspace */, cudaStream_t stream) noexcept
{
    return guard<int32_t>("enqueue", -1, [&]() -> int32_t {
        if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
        {
            throw FieldError("enqueue: no input or output buffers");
        }
        checkOutputType(outputDesc[0].type, "enqueue");
        if (mNbInputs != kACTIVATION_MIN_INPUTS && mNbInputs != kACTIVATION_MAX_INPUTS)
        {
            throw FieldError("enqueue before onShapeChange/configurePlugin told the input count");
        }
        nvinfer1::Dims const& x = inputDesc[kACTIVATION_X].dims;
        int64_t perSample = 1;
        for (int32_t axis = 1; axis < x.nbDims; ++axis)
        {
            perSample *= x.d[axis];
        }
        auto const* zeroPoint = mNbInputs == kACTIVATION_MAX_INPUTS
            ? static_cast<float const*>(inputs[kACTIVATION_ZERO_POINT])
            : nullptr;
        auto const* xData = static_cast<float const*>(inputs[kACTIVATION_X]);
        auto const* scale = static_cast<float const*>(inputs[kACTIVATION_SCALE]);
        auto const* stepIndex = static_cast<int64_t const*>(inputs[kACTIVATION_STEP_INDEX]);
        int64_t const steps = inputDesc[kACTIVATION_SCALE].dims.d[0];
        // The kernel library validates its arguments again and returns a code instead of throwing.
        int32_t const status = outputDesc[0].type == nvinfer1::DataType::kHALF
            ? lowbit_quantize_dequantize_activation_launch_fp16(xData, scale, stepIndex, zeroPoint,
                static_cast<uint16_t*>(outputs[0]), x.d[0], perSample, steps, mFields.qmin, mFields.qmax, stream)
            : lowbit_quantize_dequantize_activation_launch(xData, scale, stepIndex, zeroPoint,
                static_cast<float*>(outputs[0]), x.d[0], perSample, steps, mFields.qmin, mFields.qmax, stream);
        if (status != 0)
        {
            report(std::string("enqueue: kernel launch failed: ") + lowbit_error_string(status),
                status > 0 ? nvinfer1::ErrorCode::kFAILED_EXECUTION : nvinfer1::ErrorCode::kINVALID_ARGUMENT);
        }
        return status;
    });
}

QuantizeDequantizeActivationPluginCreator::QuantizeDequantizeActivationPluginCreator()
    : LowbitPluginCreator(kQUANTIZE_DEQUANTIZE_ACTIVATION_NAME, kQUANTIZE_DEQUANTIZE_ACTIVATION_VERSION,
        activationFieldNames()) // declared as the Python creator declares them (INT32, no data)
{
}

nvinfer1::IPluginV3* QuantizeDequantizeActivationPluginCreator::createPlugin(
    char const* /* name */, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /* phase */) noexcept
{
    return guarded<nvinfer1::IPluginV3*>("createPlugin", nullptr, kOP, nullptr, [&]() -> nvinfer1::IPluginV3* {
        return new QuantizeDequantizeActivationPlugin(parseActivationFields(fc));
    });
}

} // namespace plugin
} // namespace lowbit
