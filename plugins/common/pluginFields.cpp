#include "pluginFields.h"

#include <cstring>
#include <limits>
#include <sstream>

namespace lowbit
{
namespace plugin
{
namespace
{
// Node attributes the ONNX parser may pass along; they select the plugin and carry nothing it needs.
constexpr char const* kIGNORED_FIELDS[] = {"plugin_namespace", "plugin_version"};

std::string expectedNames(std::vector<char const*> const& expected)
{
    return listNames(std::vector<std::string>(expected.begin(), expected.end()));
}

char const* typeName(nvinfer1::PluginFieldType type)
{
    switch (type)
    {
    case nvinfer1::PluginFieldType::kFLOAT16: return "FLOAT16";
    case nvinfer1::PluginFieldType::kFLOAT32: return "FLOAT32";
    case nvinfer1::PluginFieldType::kFLOAT64: return "FLOAT64";
    case nvinfer1::PluginFieldType::kINT8: return "INT8";
    case nvinfer1::PluginFieldType::kINT16: return "INT16";
    case nvinfer1::PluginFieldType::kINT32: return "INT32";
    case nvinfer1::PluginFieldType::kCHAR: return "CHAR";
    case nvinfer1::PluginFieldType::kDIMS: return "DIMS";
    case nvinfer1::PluginFieldType::kUNKNOWN: return "UNKNOWN";
    case nvinfer1::PluginFieldType::kBF16: return "BF16";
    case nvinfer1::PluginFieldType::kINT64: return "INT64";
    case nvinfer1::PluginFieldType::kFP8: return "FP8";
    case nvinfer1::PluginFieldType::kINT4: return "INT4";
    case nvinfer1::PluginFieldType::kFP4: return "FP4";
    }
    return "an unknown type";
}

//! Name of `field`, checked to be a terminated string of TensorRT's maximum length.
std::string fieldName(nvinfer1::PluginField const& field)
{
    if (field.name == nullptr)
    {
        throw FieldError("a field has no name");
    }
    size_t const length = strnlen(field.name, kMAX_NAME_LENGTH);
    if (length == kMAX_NAME_LENGTH)
    {
        throw FieldError("a field name is not NUL-terminated within 1024 bytes");
    }
    return std::string(field.name, length);
}

bool isIgnored(std::string const& name)
{
    for (char const* ignored : kIGNORED_FIELDS)
    {
        if (name == ignored)
        {
            return true;
        }
    }
    return false;
}
} // namespace

std::string listNames(std::vector<std::string> const& names)
{
    std::ostringstream text;
    text << "[";
    for (size_t i = 0; i < names.size(); ++i)
    {
        text << (i ? ", " : "") << "'" << names[i] << "'";
    }
    text << "]";
    return text.str();
}

std::vector<int64_t> integers(nvinfer1::PluginField const& field)
{
    bool const isInt32 = field.type == nvinfer1::PluginFieldType::kINT32;
    if (!isInt32 && field.type != nvinfer1::PluginFieldType::kINT64)
    {
        throw FieldError(std::string("field '") + field.name + "' has type " + typeName(field.type)
            + "; expected INT32 or INT64 integers");
    }
    if (field.length < 0)
    {
        throw FieldError(std::string("field '") + field.name + "' has a negative length "
            + std::to_string(field.length));
    }
    if (field.length > 0 && field.data == nullptr)
    {
        throw FieldError(std::string("field '") + field.name + "' has no data");
    }
    std::vector<int64_t> values(static_cast<size_t>(field.length));
    for (int32_t i = 0; i < field.length; ++i)
    {
        // memcpy: the data pointer carries no alignment promise.
        if (isInt32)
        {
            int32_t value;
            std::memcpy(&value, static_cast<char const*>(field.data) + i * sizeof(int32_t), sizeof(value));
            values[i] = value;
        }
        else
        {
            std::memcpy(&values[i], static_cast<char const*>(field.data) + i * sizeof(int64_t), sizeof(int64_t));
        }
    }
    return values;
}

int32_t int32Scalar(nvinfer1::PluginField const& field)
{
    std::vector<int64_t> const values = integers(field);
    if (values.size() != 1)
    {
        throw FieldError(std::string("field '") + field.name + "' must be one integer, got "
            + std::to_string(values.size()) + " values");
    }
    if (values[0] < std::numeric_limits<int32_t>::min() || values[0] > std::numeric_limits<int32_t>::max())
    {
        throw FieldError(std::string("field '") + field.name + "'=" + std::to_string(values[0])
            + " does not fit a 32-bit integer");
    }
    return static_cast<int32_t>(values[0]);
}

std::map<std::string, nvinfer1::PluginField> fieldsByName(
    nvinfer1::PluginFieldCollection const* collection, std::vector<char const*> const& expected)
{
    if (collection == nullptr)
    {
        throw FieldError("no field collection; expected " + expectedNames(expected));
    }
    if (collection->nbFields < 0 || (collection->nbFields > 0 && collection->fields == nullptr))
    {
        throw FieldError("malformed field collection (" + std::to_string(collection->nbFields) + " fields)");
    }
    std::map<std::string, nvinfer1::PluginField> byName;
    for (int32_t i = 0; i < collection->nbFields; ++i)
    {
        nvinfer1::PluginField const& field = collection->fields[i];
        std::string const name = fieldName(field);
        if (isIgnored(name))
        {
            continue;
        }
        if (!byName.emplace(name, field).second)
        {
            throw FieldError("field '" + name + "' is given more than once");
        }
    }
    std::vector<std::string> missing;
    for (char const* name : expected)
    {
        if (byName.find(name) == byName.end())
        {
            missing.emplace_back(name);
        }
    }
    if (!missing.empty())
    {
        throw FieldError("missing required field(s) " + listNames(missing) + "; expected " + expectedNames(expected));
    }
    std::vector<std::string> unknown;
    for (auto const& entry : byName)
    {
        bool known = false;
        for (char const* name : expected)
        {
            known = known || entry.first == name;
        }
        if (!known)
        {
            unknown.push_back(entry.first);
        }
    }
    if (!unknown.empty())
    {
        throw FieldError("unknown field(s) " + listNames(unknown) + "; expected " + expectedNames(expected));
    }
    return byName;
}

DeclaredFieldNames::DeclaredFieldNames(std::vector<char const*> const& names)
{
    for (char const* name : names)
    {
        mFields.emplace_back(name, nullptr, nvinfer1::PluginFieldType::kINT32, 0);
    }
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
}

} // namespace plugin
} // namespace lowbit
