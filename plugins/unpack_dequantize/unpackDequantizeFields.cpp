#include "unpackDequantizeFields.h"

#include "../common/lowbitFormat.h"

#include <cstring>
#include <limits>
#include <map>
#include <sstream>

namespace lowbit
{
namespace plugin
{
namespace
{
constexpr char const* kLEVELS = "levels";
constexpr char const* kQMIN = "qmin";
constexpr char const* kWORD_BITS = "word_bits";
constexpr char const* kCODES_PER_WORD = "codes_per_word";
constexpr char const* kGROUP_SIZE = "group_size";
constexpr char const* kGROUP_BITS = "group_bits";
constexpr char const* kSHAPE = "shape";
// Node attributes the ONNX parser may pass along; they select the plugin and carry nothing it needs.
constexpr char const* kIGNORED_FIELDS[] = {"plugin_namespace", "plugin_version"};

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

std::string expectedNames(OpVersion version)
{
    std::vector<std::string> names;
    for (char const* name : fieldNames(version))
    {
        names.emplace_back(name);
    }
    return listNames(names);
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

//! The integers of one field, widened to int64; only INT32 and INT64 fields are integers here.
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

int32_t scalar(nvinfer1::PluginField const& field)
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

std::vector<int64_t> shapeValues(nvinfer1::PluginField const& field)
{
    std::vector<int64_t> shape = integers(field);
    std::ostringstream text;
    for (size_t i = 0; i < shape.size(); ++i)
    {
        text << (i ? ", " : "") << shape[i];
    }
    std::string const shown = "(" + text.str() + (shape.size() == 1 ? ",)" : ")");
    if (shape.empty() || shape.size() > static_cast<size_t>(kMAX_RANK))
    {
        throw FieldError("shape must be non-empty with at most " + std::to_string(kMAX_RANK) + " dimensions, got "
            + shown);
    }
    int64_t numel = 1;
    for (int64_t extent : shape)
    {
        if (extent < 1)
        {
            throw FieldError("shape must be non-empty with positive dimensions, got " + shown);
        }
        if (numel > kMAX_WEIGHT_ELEMENTS / extent)
        {
            throw FieldError("shape " + shown + " has more than 2^48 elements");
        }
        numel *= extent;
    }
    return shape;
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

//! The fields of `collection` by name: every expected name present once, nothing unknown.
std::map<std::string, nvinfer1::PluginField> fieldsByName(
    OpVersion version, nvinfer1::PluginFieldCollection const* collection)
{
    if (collection == nullptr)
    {
        throw FieldError("no field collection; expected " + expectedNames(version));
    }
    if (collection->nbFields < 0 || (collection->nbFields > 0 && collection->fields == nullptr))
    {
        throw FieldError("malformed field collection (" + std::to_string(collection->nbFields) + " fields)");
    }
    std::map<std::string, nvinfer1::PluginField> byName;
    std::vector<std::string> unknown;
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
    for (char const* name : fieldNames(version))
    {
        if (byName.find(name) == byName.end())
        {
            missing.emplace_back(name);
        }
    }
    if (!missing.empty())
    {
        throw FieldError("missing required field(s) " + listNames(missing) + "; expected " + expectedNames(version));
    }
    for (auto const& entry : byName)
    {
        bool known = false;
        for (char const* name : fieldNames(version))
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
        throw FieldError("unknown field(s) " + listNames(unknown) + "; expected " + expectedNames(version));
    }
    return byName;
}
} // namespace

int64_t UnpackDequantizeFields::numel() const
{
    int64_t count = 1;
    for (int64_t extent : shape)
    {
        count *= extent;
    }
    return count;
}

int64_t UnpackDequantizeFields::packedElements() const
{
    int64_t const count = numel();
    if (version == OpVersion::kWORDS)
    {
        return (count + codesPerWord - 1) / codesPerWord;
    }
    int64_t const groups = (count + groupSize - 1) / groupSize;
    return (groups * groupBits + 7) / 8;
}

nvinfer1::DataType UnpackDequantizeFields::packedType() const
{
    // UINT8 is never used: TensorRT widens UINT8 initializers to INT32 (shared/docs/TENSORRT.md).
    return version == OpVersion::kWORDS && wordBits == kINT32_WORDS_WORD_BITS ? nvinfer1::DataType::kINT32
                                                                             : nvinfer1::DataType::kINT8;
}

char const* UnpackDequantizeFields::versionString() const
{
    return version == OpVersion::kWORDS ? kUNPACK_DEQUANTIZE_VERSION : kUNPACK_DEQUANTIZE_BITSTREAM_VERSION;
}

std::vector<char const*> const& fieldNames(OpVersion version)
{
    static std::vector<char const*> const kWORDS_FIELDS{kLEVELS, kQMIN, kWORD_BITS, kCODES_PER_WORD, kSHAPE};
    static std::vector<char const*> const kBITSTREAM_FIELDS{kLEVELS, kQMIN, kGROUP_SIZE, kGROUP_BITS, kSHAPE};
    return version == OpVersion::kWORDS ? kWORDS_FIELDS : kBITSTREAM_FIELDS;
}

UnpackDequantizeFields parseFields(OpVersion version, nvinfer1::PluginFieldCollection const* collection)
{
    if (version != OpVersion::kWORDS && version != OpVersion::kBITSTREAM)
    {
        throw FieldError("unknown op version " + std::to_string(static_cast<int32_t>(version)));
    }
    std::map<std::string, nvinfer1::PluginField> const byName = fieldsByName(version, collection);
    UnpackDequantizeFields fields;
    fields.version = version;
    // Scalars first (type, count, range), then levels, then the version's own fields, then the shape: the order
    // of the checks in engines/plugin.py, so both plugins name the same problem first.
    std::map<std::string, int32_t> scalars;
    for (char const* name : fieldNames(version))
    {
        if (std::strcmp(name, kSHAPE) != 0)
        {
            scalars[name] = scalar(byName.at(name));
        }
    }
    // The shape's type is checked with the scalars, its values after the version's fields (as engines/plugin.py).
    static_cast<void>(integers(byName.at(kSHAPE)));
    fields.levels = scalars.at(kLEVELS);
    fields.qmin = scalars.at(kQMIN);
    if (fields.levels < kMIN_LEVELS || fields.levels > kMAX_LEVELS)
    {
        throw FieldError("levels=" + std::to_string(fields.levels) + " is out of range [" + std::to_string(kMIN_LEVELS)
            + ", " + std::to_string(kMAX_LEVELS) + "]");
    }
    if (static_cast<int64_t>(fields.qmin) + fields.levels - 1 > std::numeric_limits<int32_t>::max())
    {
        throw FieldError("qmin=" + std::to_string(fields.qmin) + " with " + std::to_string(fields.levels)
            + " levels overflows a 32-bit integer");
    }
    if (version == OpVersion::kWORDS)
    {
        fields.wordBits = scalars.at(kWORD_BITS);
        fields.codesPerWord = scalars.at(kCODES_PER_WORD);
        if (fields.wordBits != kINT8_WORDS_WORD_BITS && fields.wordBits != kINT32_WORDS_WORD_BITS)
        {
            throw FieldError("word_bits=" + std::to_string(fields.wordBits)
                + " is not supported; use 8 (INT8 words) or 32 (INT32 words)");
        }
        int32_t const expected = codesPerWord(fields.levels, fields.wordBits);
        if (expected < 1)
        {
            throw FieldError(std::to_string(fields.levels) + " levels do not fit one "
                + std::to_string(fields.wordBits) + "-bit word; use word_bits=32");
        }
        if (fields.codesPerWord != expected)
        {
            throw FieldError("codes_per_word=" + std::to_string(fields.codesPerWord) + " but "
                + std::to_string(fields.levels) + " levels in " + std::to_string(fields.wordBits) + "-bit words pack "
                + std::to_string(expected) + " codes per word");
        }
    }
    else
    {
        fields.groupSize = scalars.at(kGROUP_SIZE);
        fields.groupBits = scalars.at(kGROUP_BITS);
        BitstreamGroup const expected = bitstreamGroup(fields.levels);
        if (fields.groupSize != expected.size || fields.groupBits != expected.bits)
        {
            throw FieldError("group_size=" + std::to_string(fields.groupSize) + ", group_bits="
                + std::to_string(fields.groupBits) + " but " + std::to_string(fields.levels)
                + " levels use the bit-stream group (group_size, group_bits) = (" + std::to_string(expected.size)
                + ", " + std::to_string(expected.bits) + ")");
        }
    }
    fields.shape = shapeValues(byName.at(kSHAPE));
    return fields;
}

void checkInputLengths(UnpackDequantizeFields const& fields, int64_t packedLength, int64_t scaleLength)
{
    int64_t const expected = fields.packedElements();
    if (packedLength != expected)
    {
        throw FieldError("the packed input has " + std::to_string(packedLength) + " elements but "
            + std::to_string(fields.numel()) + " codes need " + std::to_string(expected)
            + (fields.version == OpVersion::kWORDS ? " words" : " stream bytes"));
    }
    if (scaleLength != fields.channels())
    {
        throw FieldError("the scale input has " + std::to_string(scaleLength) + " elements but shape[0] is "
            + std::to_string(fields.channels()) + " (one scale per output channel)");
    }
}

SerializedFields::SerializedFields(UnpackDequantizeFields const& fields)
    : mShape(fields.shape)
{
    std::vector<char const*> const& names = fieldNames(fields.version);
    mScalars = fields.version == OpVersion::kWORDS
        ? std::array<int32_t, 4>{fields.levels, fields.qmin, fields.wordBits, fields.codesPerWord}
        : std::array<int32_t, 4>{fields.levels, fields.qmin, fields.groupSize, fields.groupBits};
    // Same names, order and types as engines/plugin.py's _serialization_arrays: one INT32 per scalar, the shape as
    // INT64 (the op allows any extent) -- engines built with either plugin are byte-identical.
    for (size_t i = 0; i < mScalars.size(); ++i)
    {
        mFields.emplace_back(names[i], &mScalars[i], nvinfer1::PluginFieldType::kINT32, 1);
    }
    mFields.emplace_back(
        names[4], mShape.data(), nvinfer1::PluginFieldType::kINT64, static_cast<int32_t>(mShape.size()));
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
}

} // namespace plugin
} // namespace lowbit
