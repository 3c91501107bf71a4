/*
 * Plugin-field helpers shared by every lowbit creator: a PluginFieldCollection looked up by name (every expected
 * name once, nothing unknown, the ONNX parser's plugin_namespace/plugin_version ignored) and integer fields read as
 * INT32 or INT64. The Python twins are in lowbit_deploy/engines/plugin_fields.py (same checks, same messages).
 */
#ifndef LOWBIT_PLUGIN_FIELDS_H
#define LOWBIT_PLUGIN_FIELDS_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace lowbit
{
namespace plugin
{

//! TensorRT's limit on plugin and field name strings, terminator included.
constexpr size_t kMAX_NAME_LENGTH = 1024;

//! A field the creator refuses (or an input the plugin refuses at build time): the message says what and why.
class FieldError : public std::invalid_argument
{
public:
    using std::invalid_argument::invalid_argument;
};

//! "['a', 'b']", as Python prints a list of names.
std::string listNames(std::vector<std::string> const& names);

//! The integers of one field, widened to int64; only INT32 and INT64 fields are integers here.
std::vector<int64_t> integers(nvinfer1::PluginField const& field);

//! The one integer of a field, which must fit int32.
int32_t int32Scalar(nvinfer1::PluginField const& field);

//! The fields of `collection` by name: every name of `expected` present once, nothing unknown; the node attributes
//! plugin_namespace/plugin_version are skipped (never read, so an unterminated CHAR value is harmless).
std::map<std::string, nvinfer1::PluginField> fieldsByName(
    nvinfer1::PluginFieldCollection const* collection, std::vector<char const*> const& expected);

//! The creator's getFieldNames(): the names declared as INT32 without data (the ONNX parser passes these attributes).
class DeclaredFieldNames
{
public:
    explicit DeclaredFieldNames(std::vector<char const*> const& names);
    DeclaredFieldNames(DeclaredFieldNames const&) = delete;
    DeclaredFieldNames& operator=(DeclaredFieldNames const&) = delete;

    nvinfer1::PluginFieldCollection const* collection() const noexcept
    {
        return &mCollection;
    }

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

} // namespace plugin
} // namespace lowbit

#endif // LOWBIT_PLUGIN_FIELDS_H
