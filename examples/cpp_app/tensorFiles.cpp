#include "tensorFiles.h"

#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

namespace cpp_app
{
namespace
{

std::map<std::string, size_t> const kDTYPE_SIZES = {{"float32", 4}, {"float16", 2}, {"bfloat16", 2}, {"int8", 1},
    {"uint8", 1}, {"int32", 4}, {"int64", 8}, {"bool", 1}};

std::string knownDtypes()
{
    std::string names;
    for (auto const& entry : kDTYPE_SIZES)
    {
        names += (names.empty() ? "" : ", ") + entry.first;
    }
    return names;
}

std::vector<int64_t> parseShape(std::string const& text, std::string const& where)
{
    std::vector<int64_t> shape;
    if (text == "scalar")
    {
        return shape;
    }
    std::stringstream stream(text);
    std::string item;
    while (std::getline(stream, item, ','))
    {
        size_t used = 0;
        long long value = -1;
        try
        {
            value = std::stoll(item, &used);
        }
        catch (std::exception const&)
        {
            used = 0;
        }
        if (item.empty() || used != item.size() || value < 0)
        {
            throw AppError(kEXIT_BAD_INPUT, where + ": shape '" + text
                    + "' is not a comma-separated list of non-negative integers (e.g. 2,4,64,64, or 'scalar')");
        }
        shape.push_back(value);
    }
    return shape;
}

// Tensor names become file names: refuse what would leave the directory or break the one-line-per-tensor format.
void checkName(std::string const& name, std::string const& where)
{
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos
        || name.find('\\') != std::string::npos)
    {
        throw AppError(kEXIT_BAD_INPUT, where + ": tensor name '" + name + "' cannot be a file name in the directory");
    }
}

} // namespace

size_t dtypeSize(std::string const& dtype)
{
    auto found = kDTYPE_SIZES.find(dtype);
    return found == kDTYPE_SIZES.end() ? 0 : found->second;
}

int64_t elementCount(std::vector<int64_t> const& shape)
{
    int64_t count = 1;
    for (int64_t extent : shape)
    {
        if (extent != 0 && count > std::numeric_limits<int64_t>::max() / extent)
        {
            throw AppError(kEXIT_BAD_INPUT, "shape " + shapeText(shape) + " has too many elements");
        }
        count *= extent;
    }
    return count;
}

std::string shapeText(std::vector<int64_t> const& shape)
{
    if (shape.empty())
    {
        return "scalar";
    }
    std::string text;
    for (int64_t extent : shape)
    {
        text += (text.empty() ? "" : ",") + std::to_string(extent);
    }
    return text;
}

std::vector<HostTensor> readTensorDirectory(std::filesystem::path const& directory)
{
    std::filesystem::path const manifest = directory / kMANIFEST_NAME;
    std::ifstream lines(manifest);
    if (!lines)
    {
        throw AppError(kEXIT_BAD_INPUT, "cannot read " + manifest.string() + ": the input directory must hold "
                + kMANIFEST_NAME + " and one NAME.bin per input (write them with examples/cpp_app/make_inputs.py)");
    }
    std::vector<HostTensor> tensors;
    std::set<std::string> seen;
    std::string line;
    for (int number = 1; std::getline(lines, line); ++number)
    {
        std::string const where = manifest.string() + ":" + std::to_string(number);
        std::stringstream fields(line);
        HostTensor tensor;
        std::string shape;
        std::string extra;
        if (!(fields >> tensor.name) || tensor.name[0] == '#')
        {
            continue;
        }
        if (!(fields >> tensor.dtype >> shape) || (fields >> extra))
        {
            throw AppError(kEXIT_BAD_INPUT, where + ": expected 'NAME DTYPE SHAPE', got '" + line + "'");
        }
        checkName(tensor.name, where);
        if (!seen.insert(tensor.name).second)
        {
            throw AppError(kEXIT_BAD_INPUT, where + ": tensor '" + tensor.name + "' is listed twice");
        }
        size_t const itemSize = dtypeSize(tensor.dtype);
        if (itemSize == 0)
        {
            throw AppError(kEXIT_BAD_INPUT, where + ": unknown dtype '" + tensor.dtype + "' (known: " + knownDtypes()
                    + ")");
        }
        tensor.shape = parseShape(shape, where);
        std::filesystem::path const data = directory / (tensor.name + ".bin");
        std::error_code error;
        auto const fileBytes = std::filesystem::file_size(data, error);
        if (error)
        {
            throw AppError(kEXIT_BAD_INPUT, "cannot read " + data.string() + " (" + error.message() + "), listed in "
                    + where);
        }
        uint64_t const expected = static_cast<uint64_t>(elementCount(tensor.shape)) * itemSize;
        if (fileBytes != expected)
        {
            throw AppError(kEXIT_BAD_INPUT, data.string() + " holds " + std::to_string(fileBytes) + " bytes, but "
                    + tensor.dtype + " [" + shapeText(tensor.shape) + "] needs " + std::to_string(expected)
                    + ": write the file and its line in " + kMANIFEST_NAME + " together");
        }
        tensor.bytes.resize(expected);
        std::ifstream file(data, std::ios::binary);
        if (!file.read(reinterpret_cast<char*>(tensor.bytes.data()), static_cast<std::streamsize>(expected)))
        {
            throw AppError(kEXIT_BAD_INPUT, "cannot read " + std::to_string(expected) + " bytes from " + data.string());
        }
        tensors.push_back(std::move(tensor));
    }
    if (tensors.empty())
    {
        throw AppError(kEXIT_BAD_INPUT, manifest.string() + " lists no tensor");
    }
    return tensors;
}

void writeTensorDirectory(std::filesystem::path const& directory, std::vector<HostTensor> const& tensors)
{
    std::error_code error;
    std::filesystem::create_directories(directory, error);
    if (error)
    {
        throw AppError(kEXIT_BAD_INPUT, "cannot create the output directory " + directory.string() + ": "
                + error.message());
    }
    std::string manifest = "# NAME DTYPE SHAPE; data in NAME.bin (raw little-endian, C order)\n";
    for (HostTensor const& tensor : tensors)
    {
        checkName(tensor.name, "output");
        std::filesystem::path const data = directory / (tensor.name + ".bin");
        std::ofstream file(data, std::ios::binary | std::ios::trunc);
        file.write(reinterpret_cast<char const*>(tensor.bytes.data()), static_cast<std::streamsize>(tensor.bytes.size()));
        if (!file.flush())
        {
            throw AppError(kEXIT_BAD_INPUT, "cannot write " + data.string() + " (disk full or not writable?)");
        }
        manifest += tensor.name + " " + tensor.dtype + " " + shapeText(tensor.shape) + "\n";
    }
    // The manifest last: a reader never sees it listing a half-written file.
    std::ofstream file(directory / kMANIFEST_NAME, std::ios::trunc);
    if (!(file << manifest).flush())
    {
        throw AppError(kEXIT_BAD_INPUT, "cannot write " + (directory / kMANIFEST_NAME).string());
    }
}

} // namespace cpp_app
