/*
 * The plugin fields of lowbit::UnpackDequantize v1 (word formats) and v2 (bit stream): parsed by name from a
 * PluginFieldCollection, validated, and serialized back as named fields. The C++ twin of parse_fields /
 * parse_fields_v2 / _serialization_arrays in lowbit_deploy/engines/plugin.py: the same names, the same checks, and the
 * same serialized types (scalars as one INT32, the shape as INT64), so an engine built with either plugin is
 * byte-identical and deserializes with either (tests/trt/test_cpp_plugin.py checks both).
 */
#ifndef LOWBIT_UNPACK_DEQUANTIZE_FIELDS_H
#define LOWBIT_UNPACK_DEQUANTIZE_FIELDS_H

#include "../common/pluginFields.h"

#include <NvInferRuntime.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace lowbit
{
namespace plugin
{

//! Op version = plugin version: "1" decodes base-L codes in int8/int32 words, "2" a bit stream of B-bit groups.
enum class OpVersion : int32_t
{
    kWORDS = 1,
    kBITSTREAM = 2,
};

//! TensorRT tensors have at most this many dimensions.
constexpr int32_t kMAX_RANK = nvinfer1::Dims::MAX_DIMS;
// Keeps every count derived from prod(shape) (words, stream bits = groups * 56) far from int64 overflow; 2^48 float32
// outputs would be 1 PiB, so no real weight is refused. Mirrored by MAX_WEIGHT_ELEMENTS in engines/plugin.py.
constexpr int64_t kMAX_WEIGHT_ELEMENTS = int64_t{1} << 48;

//! Validated plugin state: exactly what the engine serializes, for one op version.
struct UnpackDequantizeFields
{
    OpVersion version{OpVersion::kWORDS};
    int32_t levels{0};
    int32_t qmin{0};
    int32_t wordBits{0};     //!< v1: 8 or 32
    int32_t codesPerWord{0}; //!< v1: k, the largest count with levels^k <= 2^wordBits
    int32_t groupSize{0};    //!< v2: g
    int32_t groupBits{0};    //!< v2: B
    std::vector<int64_t> shape;

    int64_t numel() const;
    int64_t channels() const
    {
        return shape.front();
    }
    //! Length of the packed input: words (v1) or stream bytes (v2).
    int64_t packedElements() const;
    nvinfer1::DataType packedType() const;
    char const* versionString() const;
};

//! The field names of `version`, in the order the engine serializes them.
std::vector<char const*> const& fieldNames(OpVersion version);

//! Parses and validates `fields` by name; throws FieldError saying what is wrong. INT32 and INT64 integers are both
//! accepted (the ONNX parser hands INT32, an engine serialized elsewhere may hold INT64); any other type, a missing,
//! unknown or repeated name, or a value out of range is refused. `plugin_namespace`/`plugin_version` are ignored
//! (the ONNX parser may pass them; they are never read, so an unterminated CHAR value is harmless).
UnpackDequantizeFields parseFields(OpVersion version, nvinfer1::PluginFieldCollection const* fields);

//! Checks the packed and scale input lengths against the fields (build time): throws FieldError when they differ,
//! e.g. 4 packed words where the shape needs 116 (an out-of-bounds read at run time otherwise).
void checkInputLengths(UnpackDequantizeFields const& fields, int64_t packedLength, int64_t scaleLength);

//! Owns the buffers of the serialized fields (PluginField only points at them).
class SerializedFields
{
public:
    explicit SerializedFields(UnpackDequantizeFields const& fields);
    SerializedFields(SerializedFields const&) = delete;
    SerializedFields& operator=(SerializedFields const&) = delete;

    nvinfer1::PluginFieldCollection const* collection() const noexcept
    {
        return &mCollection;
    }

private:
    std::array<int32_t, 4> mScalars{};
    std::vector<int64_t> mShape;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

} // namespace plugin
} // namespace lowbit

#endif // LOWBIT_UNPACK_DEQUANTIZE_FIELDS_H
