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
    std::map<std::string, nvinfer1::PluginField> const byName = fieldsByName(collection, fieldNames(version));
    UnpackDequantizeFields fields;
    fields.version = version;
    // Scalars first (type, count, range), then levels, then the version's own fields, then the shape: the order
    // of the checks in engines/plugin.py, so both plugins name the same problem first.
    std::map<std::string, int32_t> scalars;
    for (char const* name : fieldNames(version))
    {
        if (std::strcmp(name, kSHAPE) != 0)
        {
            scalars[name] = int32Scalar(byName.at(name));
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
