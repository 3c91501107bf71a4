/*
 * The tensor-directory format of the example app (README.md, "Input and output files"), free of TensorRT and CUDA:
 *
 *   DIR/tensors.txt   one line per tensor: NAME DTYPE SHAPE   (SHAPE: 2,1,16,16 ; "scalar" for rank 0;
 *                     '#' starts a comment line)
 *   DIR/NAME.bin      the tensor's elements, raw little-endian, C (row-major) order, nothing else
 *
 * The same format carries the inputs (written by make_inputs.py) and the outputs (written by the app, read by
 * compare.py), so one reader serves both sides.
 */
#pragma once

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace cpp_app
{

//! A user-facing failure: the message names the problem and the fix; `exitCode` is what main() returns.
class AppError : public std::runtime_error
{
public:
    AppError(int exitCode, std::string const& message)
        : std::runtime_error(message)
        , exitCode(exitCode)
    {
    }
    int exitCode;
};

// Exit codes (README.md): 0 ran and wrote the outputs; 1 TensorRT or CUDA failed while running; 2 bad arguments or
// input files; 3 no usable CUDA GPU.
constexpr int kEXIT_RUN_FAILED = 1;
constexpr int kEXIT_BAD_INPUT = 2;
constexpr int kEXIT_NO_GPU = 3;

constexpr char const* kMANIFEST_NAME = "tensors.txt";

struct HostTensor
{
    std::string name;
    std::string dtype; //!< numpy spelling: float32, float16, bfloat16, int8, uint8, int32, int64, bool
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
};

//! Bytes per element of a dtype name; 0 for a name the format does not know.
size_t dtypeSize(std::string const& dtype);

int64_t elementCount(std::vector<int64_t> const& shape);

std::string shapeText(std::vector<int64_t> const& shape);

//! Reads DIR/tensors.txt and every DIR/NAME.bin it lists, checking each file's size against its shape and dtype.
std::vector<HostTensor> readTensorDirectory(std::filesystem::path const& directory);

//! Writes DIR/NAME.bin for every tensor and DIR/tensors.txt (creating DIR).
void writeTensorDirectory(std::filesystem::path const& directory, std::vector<HostTensor> const& tensors);

} // namespace cpp_app
