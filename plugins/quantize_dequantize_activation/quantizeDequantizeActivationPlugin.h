/*
 * TensorRT IPluginV3 glue of lowbit::QuantizeDequantizeActivation v1 (docs/ops/QuantizeDequantizeActivation_v1.md),
 * the twin of the Python plugin in lowbit_deploy/engines/activation_plugin.py. The math is the kernel library's C ABI
 * (quantizeDequantizeActivationKernel.h), free of TensorRT types.
 *
 * Inputs: 0 FLOAT x [B, ...], 1 FLOAT scale [T], 2 INT64 step_index [B], 3 (optional) FLOAT zero_point [T]; output 0
 * FLOAT y, shaped as x; all LINEAR. Input count, ranks, extents and types are checked at build time
 * (getOutputDataTypes, getOutputShapes, configurePlugin) and the extents again per shape at run time (onShapeChange).
 */
#ifndef LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_PLUGIN_H
#define LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_PLUGIN_H

#include "../common/lowbitPlugin.h"
#include "quantizeDequantizeActivationFields.h"

#include <NvInferRuntime.h>

#include <memory>

namespace lowbit
{
namespace plugin
{

class QuantizeDequantizeActivationPlugin
    : public LowbitPluginOf<QuantizeDequantizeActivationPlugin, QuantizeDequantizeActivationFields,
          SerializedActivationFields>
{
public:
    explicit QuantizeDequantizeActivationPlugin(QuantizeDequantizeActivationFields fields);

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;

    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

private:
    //! 3 or 4 once configured (build) or shaped (run time): enqueue is not told how many inputs the layer has.
    int32_t mNbInputs{0};
};

//! Creator: name "QuantizeDequantizeActivation", namespace "lowbit", version "1"; fields qmin, qmax.
class QuantizeDequantizeActivationPluginCreator : public LowbitPluginCreator
{
public:
    QuantizeDequantizeActivationPluginCreator();

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

} // namespace plugin
} // namespace lowbit

#endif // LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_PLUGIN_H
