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

#include "../common/pluginFields.h"
#include "quantizeDequantizeActivationFields.h"

#include <NvInferRuntime.h>

#include <memory>

namespace lowbit
{
namespace plugin
{

class QuantizeDequantizeActivationPlugin : public nvinfer1::IPluginV3,
                                           public nvinfer1::IPluginV3OneCore,
                                           public nvinfer1::IPluginV3OneBuild,
                                           public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit QuantizeDequantizeActivationPlugin(QuantizeDequantizeActivationFields fields);
    ~QuantizeDequantizeActivationPlugin() override = default;

    QuantizeDequantizeActivationFields const& fields() const noexcept
    {
        return mFields;
    }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t getValidTactics(int32_t* tactics, int32_t nbTactics) noexcept override;
    int32_t getNbTactics() noexcept override;
    char const* getTimingCacheID() noexcept override;

    // IPluginV3OneRuntime
    int32_t setTactic(int32_t tactic) noexcept override;
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    QuantizeDequantizeActivationFields mFields;
    //! 3 or 4 once configured (build) or shaped (run time): enqueue is not told how many inputs the layer has.
    int32_t mNbInputs{0};
    std::unique_ptr<SerializedActivationFields> mSerialized;
    nvinfer1::IErrorRecorder* mErrorRecorder{nullptr}; //!< of the execution context, once attached
};

//! Creator: name "QuantizeDequantizeActivation", namespace "lowbit", version "1"; fields qmin, qmax.
class QuantizeDequantizeActivationPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    QuantizeDequantizeActivationPluginCreator();
    ~QuantizeDequantizeActivationPluginCreator() override = default;

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    DeclaredFieldNames mFieldNames;
};

} // namespace plugin
} // namespace lowbit

#endif // LOWBIT_QUANTIZE_DEQUANTIZE_ACTIVATION_PLUGIN_H
