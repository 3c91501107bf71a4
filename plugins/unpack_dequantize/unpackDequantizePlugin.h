/*
 * TensorRT IPluginV3 glue of lowbit::UnpackDequantize v1 (word formats) and v2 (bit stream): one plugin class whose
 * version lives in its validated fields (UnpackDequantizeFields: packed input type, packed length, launcher), and
 * one IPluginCreatorV3One per version, like the Python plugin in lowbit_deploy/engines/plugin.py. The shared IPluginV3
 * glue is LowbitPlugin (common/lowbitPlugin.h); the decode itself is the kernel library's C ABI
 * (unpackDequantizeKernel.h), free of TensorRT types.
 *
 * Inputs: 0 packed (INT8 words or stream bytes, or INT32 words) [packed length], 1 HALF scales [shape[0]];
 * output 0 `shape`, FLOAT (the op's type, what getOutputDataTypes declares) or HALF (offered to TensorRT through
 * supportsFormatCombination: the float32 value rounded to nearest even); all LINEAR. Input lengths are checked at
 * build time (getOutputShapes, configurePlugin).
 */
#ifndef LOWBIT_UNPACK_DEQUANTIZE_PLUGIN_H
#define LOWBIT_UNPACK_DEQUANTIZE_PLUGIN_H

#include "../common/lowbitPlugin.h"
#include "unpackDequantizeFields.h"

#include <NvInferRuntime.h>

#include <memory>

namespace lowbit
{
namespace plugin
{

class UnpackDequantizePlugin : public LowbitPluginOf<UnpackDequantizePlugin, UnpackDequantizeFields, SerializedFields>
{
public:
    explicit UnpackDequantizePlugin(UnpackDequantizeFields fields);

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
    //! Throws FieldError unless there are 2 one-dimensional inputs of the lengths the fields need and 1 output.
    void checkIo(nvinfer1::Dims const* inputDims, int32_t nbInputs, int32_t nbOutputs) const;
};

//! Creator of one op version: name "UnpackDequantize", namespace "lowbit", version "1" or "2".
class UnpackDequantizePluginCreator : public LowbitPluginCreator
{
public:
    explicit UnpackDequantizePluginCreator(OpVersion version);

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    OpVersion mVersion;
};

} // namespace plugin
} // namespace lowbit

#endif // LOWBIT_UNPACK_DEQUANTIZE_PLUGIN_H
