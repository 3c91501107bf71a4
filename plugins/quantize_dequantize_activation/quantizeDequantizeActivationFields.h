/*
 * The plugin fields and build-time input checks of lowbit::QuantizeDequantizeActivation v1: fields parsed by name
 * from a PluginFieldCollection, validated, and serialized back as named fields. The C++ twin of parse_activation_fields
 * / check_activation_inputs in lowbit_deploy/engines/activation_plugin.py: the same names, the same checks and
 * messages, and the same serialized types (qmin and qmax as one INT32 each), so an engine built with either plugin is
 * byte-identical and deserializes with either (tests/trt/test_activation_plugin_build.py checks both).
 */
#ifndef LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_FIELDS_H
#define LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_FIELDS_H

#include "../common/pluginFields.h"

#include <NvInferRuntime.h>

#include <array>
#include <cstdint>
#include <vector>

namespace lowbit
{
namespace plugin
{

//! Inputs: x [B, ...], scale [T], step_index [B], optional zero_point [T]; one output, y, shaped as x.
constexpr int32_t kACTIVATION_MIN_INPUTS = 3;
constexpr int32_t kACTIVATION_MAX_INPUTS = 4;
constexpr int32_t kACTIVATION_X = 0;
constexpr int32_t kACTIVATION_SCALE = 1;
constexpr int32_t kACTIVATION_STEP_INDEX = 2;
constexpr int32_t kACTIVATION_ZERO_POINT = 3;

//! Validated plugin state: exactly what the engine serializes.
struct QuantizeDequantizeActivationFields
{
    int32_t qmin{0};
    int32_t qmax{0};
};

//! The field names, in the order the engine serializes them: qmin, qmax.
std::vector<char const*> const& activationFieldNames();

//! Parses and validates `fields` by name; throws FieldError saying what is wrong. INT32 and INT64 are both accepted
//! (the ONNX parser hands INT32, an engine serialized elsewhere may hold INT64); qmin < qmax and at most 65536 levels.
QuantizeDequantizeActivationFields parseActivationFields(nvinfer1::PluginFieldCollection const* fields);

//! Build-time checks of the inputs' count and ranks, and of the extents that must agree (step_index with the batch of
//! x, zero_point with scale) where both are known (an extent < 0 is unknown, e.g. a dynamic batch at build time).
void checkActivationInputs(nvinfer1::Dims const* inputDims, int32_t nbInputs, int32_t nbOutputs);

//! Build-time check of the input types: x, scale and zero_point FLOAT, step_index INT64.
void checkActivationInputTypes(nvinfer1::DataType const* inputTypes, int32_t nbInputs);

//! The type input `index` must have.
nvinfer1::DataType activationInputType(int32_t index);

//! Owns the buffers of the serialized fields (PluginField only points at them).
class SerializedActivationFields
{
public:
    explicit SerializedActivationFields(QuantizeDequantizeActivationFields const& fields);
    SerializedActivationFields(SerializedActivationFields const&) = delete;
    SerializedActivationFields& operator=(SerializedActivationFields const&) = delete;

    nvinfer1::PluginFieldCollection const* collection() const noexcept
    {
        return &mCollection;
    }

private:
    std::array<int32_t, 2> mValues{};
    std::array<nvinfer1::PluginField, 2> mFields{};
    nvinfer1::PluginFieldCollection mCollection{};
};

} // namespace plugin
} // namespace lowbit

#endif // LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_FIELDS_H
