#include "quantizeDequantizeActivationFields.h"

#include "../common/lowbitFormat.h"

#include <map>
#include <string>

namespace lowbit
{
namespace plugin
{
namespace
{
constexpr char const* kQMIN = "qmin";
constexpr char const* kQMAX = "qmax";
constexpr char const* kINPUT_NAMES[] = {"x", "scale", "step_index", "zero_point"};

std::string inputName(int32_t index)
{
    return "input " + std::to_string(index) + " (" + kINPUT_NAMES[index] + ")";
}

//! The Python binding's DataType member names, so both plugins word a type error alike.
std::string dataTypeName(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return "FLOAT";
    case nvinfer1::DataType::kHALF: return "HALF";
    case nvinfer1::DataType::kINT8: return "INT8";
    case nvinfer1::DataType::kINT32: return "INT32";
    case nvinfer1::DataType::kBOOL: return "BOOL";
    case nvinfer1::DataType::kUINT8: return "UINT8";
    case nvinfer1::DataType::kFP8: return "FP8";
    case nvinfer1::DataType::kBF16: return "BF16";
    case nvinfer1::DataType::kINT64: return "INT64";
    case nvinfer1::DataType::kINT4: return "INT4";
    default: break; // types newer than some header sets (FP4, E8M0, ...)
    }
    return "type " + std::to_string(static_cast<int32_t>(type));
}

void checkOneDimensional(nvinfer1::Dims const& dims, int32_t index, char const* extent)
{
    if (dims.nbDims != 1)
    {
        throw FieldError(inputName(index) + " must be one-dimensional [" + extent + "], got rank "
            + std::to_string(dims.nbDims));
    }
}
} // namespace

std::vector<char const*> const& activationFieldNames()
{
    static std::vector<char const*> const kNAMES{kQMIN, kQMAX};
    return kNAMES;
}

QuantizeDequantizeActivationFields parseActivationFields(nvinfer1::PluginFieldCollection const* collection)
{
    // Presence and names, then each scalar's type, count and range, then the grid: the order of the checks in
    // engines/activation_plugin.py, so both plugins name the same problem first.
    std::map<std::string, nvinfer1::PluginField> const byName = fieldsByName(collection, activationFieldNames());
    QuantizeDequantizeActivationFields fields;
    fields.qmin = int32Scalar(byName.at(kQMIN));
    fields.qmax = int32Scalar(byName.at(kQMAX));
    if (fields.qmin >= fields.qmax)
    {
        throw FieldError("qmin=" + std::to_string(fields.qmin) + " must be smaller than qmax="
            + std::to_string(fields.qmax));
    }
    int64_t const levels = static_cast<int64_t>(fields.qmax) - fields.qmin + 1;
    if (levels > kMAX_ACTIVATION_GRID_LEVELS)
    {
        throw FieldError("the grid [" + std::to_string(fields.qmin) + ", " + std::to_string(fields.qmax) + "] has "
            + std::to_string(levels) + " levels; at most " + std::to_string(kMAX_ACTIVATION_GRID_LEVELS)
            + " are allowed (qmax - qmin + 1 <= 65536)");
    }
    return fields;
}

void checkActivationInputs(nvinfer1::Dims const* inputDims, int32_t nbInputs, int32_t nbOutputs)
{
    if (nbInputs < kACTIVATION_MIN_INPUTS || nbInputs > kACTIVATION_MAX_INPUTS || nbOutputs != 1)
    {
        throw FieldError("expected 3 or 4 inputs (x, scale, step_index[, zero_point]) and 1 output, got "
            + std::to_string(nbInputs) + " inputs and " + std::to_string(nbOutputs) + " outputs");
    }
    nvinfer1::Dims const& x = inputDims[kACTIVATION_X];
    if (x.nbDims < 1)
    {
        throw FieldError(inputName(kACTIVATION_X) + " needs rank >= 1 (dimension 0 is the batch), got rank "
            + std::to_string(x.nbDims));
    }
    checkOneDimensional(inputDims[kACTIVATION_SCALE], kACTIVATION_SCALE, "T");
    checkOneDimensional(inputDims[kACTIVATION_STEP_INDEX], kACTIVATION_STEP_INDEX, "B");
    if (nbInputs == kACTIVATION_MAX_INPUTS)
    {
        checkOneDimensional(inputDims[kACTIVATION_ZERO_POINT], kACTIVATION_ZERO_POINT, "T");
    }
    int64_t const steps = inputDims[kACTIVATION_SCALE].d[0];
    if (steps == 0)
    {
        throw FieldError(inputName(kACTIVATION_SCALE) + " is empty; the step table needs at least one entry");
    }
    int64_t const indices = inputDims[kACTIVATION_STEP_INDEX].d[0];
    if (indices >= 0 && x.d[0] >= 0 && indices != x.d[0])
    {
        throw FieldError(inputName(kACTIVATION_STEP_INDEX) + " has " + std::to_string(indices)
            + " entries but x has a batch of " + std::to_string(x.d[0]) + " (one step index per sample)");
    }
    if (nbInputs == kACTIVATION_MAX_INPUTS)
    {
        int64_t const zeroPoints = inputDims[kACTIVATION_ZERO_POINT].d[0];
        if (zeroPoints >= 0 && steps >= 0 && zeroPoints != steps)
        {
            throw FieldError(inputName(kACTIVATION_ZERO_POINT) + " has " + std::to_string(zeroPoints)
                + " entries but scale has " + std::to_string(steps) + " (one zero point per step)");
        }
    }
}

nvinfer1::DataType activationInputType(int32_t index)
{
    return index == kACTIVATION_STEP_INDEX ? nvinfer1::DataType::kINT64 : nvinfer1::DataType::kFLOAT;
}

void checkActivationInputTypes(nvinfer1::DataType const* inputTypes, int32_t nbInputs)
{
    for (int32_t index = 0; index < nbInputs && index < kACTIVATION_MAX_INPUTS; ++index)
    {
        nvinfer1::DataType const expected = activationInputType(index);
        if (inputTypes[index] != expected)
        {
            throw FieldError(inputName(index) + " has type " + dataTypeName(inputTypes[index]) + "; expected "
                + dataTypeName(expected));
        }
    }
}

SerializedActivationFields::SerializedActivationFields(QuantizeDequantizeActivationFields const& fields)
    : mValues{fields.qmin, fields.qmax}
{
    // Same names, order and types as engines/activation_plugin.py: one INT32 each -- engines built with either plugin
    // are byte-identical.
    std::vector<char const*> const& names = activationFieldNames();
    for (size_t i = 0; i < mValues.size(); ++i)
    {
        mFields[i] = nvinfer1::PluginField(names[i], &mValues[i], nvinfer1::PluginFieldType::kINT32, 1);
    }
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
}

} // namespace plugin
} // namespace lowbit
