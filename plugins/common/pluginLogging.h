/*
 * Error reporting for the lowbit TensorRT plugins: every noexcept entry point catches everything and reports here.
 *
 * The library links no TensorRT library (shared/docs/TENSORRT.md), so the only channels are the ones TensorRT hands
 * over: the ILoggerFinder given to setLoggerFinder() (build and runtime), and the IErrorRecorder of the execution
 * context a plugin is attached to (runtime). Without either (a test harness, a caller that never set a finder), the
 * message goes to stderr so it is never lost.
 */
#ifndef LOWBIT_PLUGIN_LOGGING_H
#define LOWBIT_PLUGIN_LOGGING_H

#include "lowbitFormat.h"

#include <NvInferRuntime.h>

#include <exception>
#include <string>

namespace lowbit
{
namespace plugin
{

//! Stores the finder passed to the exported setLoggerFinder() (nullptr clears it).
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

//! Logs `message` with `severity` through TensorRT's logger (stderr when there is none).
void log(nvinfer1::ILogger::Severity severity, char const* message) noexcept;

//! Reports an error of op `op` ("lowbit::<op>: <message>"): to `recorder` when given (runtime), and always to the
//! logger at kERROR.
void reportError(std::string const& message, nvinfer1::IErrorRecorder* recorder = nullptr,
    nvinfer1::ErrorCode code = nvinfer1::ErrorCode::kINVALID_ARGUMENT,
    char const* op = kUNPACK_DEQUANTIZE_NAME) noexcept;

//! Reports an exception caught at a noexcept boundary, prefixed with the entry point's name.
void reportException(char const* where, std::exception const& error, nvinfer1::IErrorRecorder* recorder = nullptr,
    char const* op = kUNPACK_DEQUANTIZE_NAME) noexcept;

//! Reports a non-standard exception (catch (...)) caught at a noexcept boundary.
void reportUnknownException(char const* where, nvinfer1::IErrorRecorder* recorder = nullptr,
    char const* op = kUNPACK_DEQUANTIZE_NAME) noexcept;

//! Runs `body` at a noexcept boundary: returns its result, or reports whatever it throws (prefixed with `where`)
//! and returns `failure`.
template <typename Result, typename Body>
Result guarded(char const* where, nvinfer1::IErrorRecorder* recorder, char const* op, Result failure,
    Body&& body) noexcept
{
    try
    {
        return body();
    }
    catch (std::exception const& error)
    {
        reportException(where, error, recorder, op);
    }
    catch (...)
    {
        reportUnknownException(where, recorder, op);
    }
    return failure;
}

} // namespace plugin
} // namespace lowbit

#endif // LOWBIT_PLUGIN_LOGGING_H
