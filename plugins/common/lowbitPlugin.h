/*
 * The IPluginV3 glue every lowbit plugin shares (IPluginV3OneCore + IPluginV3OneBuild + IPluginV3OneRuntime): the
 * capability interfaces, clone / attachToContext (a copy that reports through the execution context's error
 * recorder), name, version and namespace, one output, no workspace and no tactics, one timing-cache entry, and the
 * serialized fields kept alive for TensorRT. An op's plugin derives from LowbitPluginOf<itself, its fields, their
 * serialization> and adds its shapes, types, checks and enqueue; its creator derives from LowbitPluginCreator. Every
 * noexcept entry runs its body through guarded() (pluginLogging.h).
 */
#ifndef LOWBIT_PLUGIN_H
#define LOWBIT_PLUGIN_H

#include "pluginFields.h"
#include "pluginLogging.h"

#include <NvInferRuntime.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lowbit
{
namespace plugin
{

//! The output types the lowbit plugins offer: FLOAT (the ops' declared type) and HALF (the float32 value rounded to
//! nearest even), for builds that choose precisions.
inline bool isFloatOrHalf(nvinfer1::DataType type) noexcept
{
    return type == nvinfer1::DataType::kFLOAT || type == nvinfer1::DataType::kHALF;
}

//! Throws FieldError unless `type` (of output 0, in `where`) is FLOAT or HALF.
void checkOutputType(nvinfer1::DataType type, char const* where);

class LowbitPlugin : public nvinfer1::IPluginV3,
                     public nvinfer1::IPluginV3OneCore,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime
{
public:
    //! `opName`, `version`: static strings (the op's name is also the prefix of its errors: "lowbit::<op>: ...").
    LowbitPlugin(char const* opName, char const* version) noexcept
        : mOpName(opName)
        , mVersion(version)
    {
    }
    ~LowbitPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild (output types and shapes, formats and configurePlugin are the op's)
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t getValidTactics(int32_t* tactics, int32_t nbTactics) noexcept override;
    int32_t getNbTactics() noexcept override;
    char const* getTimingCacheID() noexcept override;

    // IPluginV3OneRuntime (onShapeChange and enqueue are the op's)
    int32_t setTactic(int32_t tactic) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

protected:
    LowbitPlugin(LowbitPlugin const&) = default;
    LowbitPlugin& operator=(LowbitPlugin const&) = delete;

    //! A copy with the same fields and configuration (clone, attachToContext set its error recorder).
    virtual std::unique_ptr<LowbitPlugin> copy() const = 0;
    //! The fields to serialize; the plugin keeps the buffers alive until the next call (TensorRT reads them later).
    virtual nvinfer1::PluginFieldCollection const* serializeFields() = 0;

    //! Runs `body` at a noexcept boundary of this plugin (errors go to its recorder, prefixed with `where`).
    template <typename Result, typename Body>
    Result guard(char const* where, Result failure, Body&& body) const noexcept
    {
        return guarded<Result>(where, mErrorRecorder, mOpName, failure, std::forward<Body>(body));
    }

    //! Reports an error of this op through its recorder and the logger.
    void report(std::string const& message, nvinfer1::ErrorCode code) const noexcept;

private:
    char const* mOpName;
    char const* mVersion;
    nvinfer1::IErrorRecorder* mErrorRecorder{nullptr}; //!< of the execution context, once attached
};

//! LowbitPlugin with validated `Fields` (exactly what the engine serializes) and their serialization `Serialized`
//! (owns the buffers a PluginFieldCollection points into; constructed from the fields, `collection()`).
template <typename Derived, typename Fields, typename Serialized>
class LowbitPluginOf : public LowbitPlugin
{
public:
    Fields const& fields() const noexcept
    {
        return mFields;
    }

protected:
    LowbitPluginOf(char const* opName, char const* version, Fields fields)
        : LowbitPlugin(opName, version)
        , mFields(std::move(fields))
    {
    }

    std::unique_ptr<LowbitPlugin> copy() const override
    {
        return std::make_unique<Derived>(static_cast<Derived const&>(*this));
    }

    nvinfer1::PluginFieldCollection const* serializeFields() override
    {
        // Rebuilt per call and kept on the plugin: TensorRT reads the buffers after getFieldsToSerialize returns.
        mSerialized = std::make_shared<Serialized>(mFields);
        return mSerialized->collection();
    }

    Fields mFields;

private:
    std::shared_ptr<Serialized const> mSerialized; //!< shared by copies: read-only once built
};

//! What every lowbit creator shares: name, version, namespace "lowbit" and the declared field names (INT32, no data,
//! as the Python creators declare them: the ONNX parser passes exactly these attributes). An op's creator adds
//! createPlugin.
class LowbitPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    //! `opName`, `version`: static strings.
    LowbitPluginCreator(char const* opName, char const* version, std::vector<char const*> const& fieldNames)
        : mOpName(opName)
        , mVersion(version)
        , mFieldNames(fieldNames)
    {
    }
    ~LowbitPluginCreator() override = default;

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    char const* mOpName;
    char const* mVersion;
    DeclaredFieldNames mFieldNames;
};

} // namespace plugin
} // namespace lowbit

#endif // LOWBIT_PLUGIN_H
