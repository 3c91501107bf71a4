#include "pluginLogging.h"

#include <atomic>
#include <cstdio>

namespace lowbit
{
namespace plugin
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

char const* severityName(nvinfer1::ILogger::Severity severity)
{
    switch (severity)
    {
    case nvinfer1::ILogger::Severity::kINTERNAL_ERROR: return "INTERNAL_ERROR";
    case nvinfer1::ILogger::Severity::kERROR: return "ERROR";
    case nvinfer1::ILogger::Severity::kWARNING: return "WARNING";
    case nvinfer1::ILogger::Severity::kINFO: return "INFO";
    case nvinfer1::ILogger::Severity::kVERBOSE: return "VERBOSE";
    }
    return "UNKNOWN";
}
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void log(nvinfer1::ILogger::Severity severity, char const* message) noexcept
{
    nvinfer1::ILoggerFinder* const finder = gLoggerFinder.load();
    // findLogger() must be called on the thread of the plugin call: no caching of the logger itself.
    nvinfer1::ILogger* const logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(severity, message);
        return;
    }
    std::fprintf(stderr, "[lowbit plugin] %s: %s\n", severityName(severity), message);
}

void reportError(std::string const& message, nvinfer1::IErrorRecorder* recorder, nvinfer1::ErrorCode code,
    char const* op) noexcept
{
    try
    {
        std::string const text = std::string(kPLUGIN_NAMESPACE) + "::" + op + ": " + message;
        if (recorder != nullptr)
        {
            recorder->reportError(code, text.c_str());
        }
        log(nvinfer1::ILogger::Severity::kERROR, text.c_str());
    }
    catch (...)
    {
        // Building the message failed (out of memory): say something rather than nothing.
        log(nvinfer1::ILogger::Severity::kERROR, "lowbit plugin: error (message allocation failed)");
    }
}

void reportException(
    char const* where, std::exception const& error, nvinfer1::IErrorRecorder* recorder, char const* op) noexcept
{
    try
    {
        reportError(std::string(where) + ": " + error.what(), recorder, nvinfer1::ErrorCode::kINVALID_ARGUMENT, op);
    }
    catch (...)
    {
        log(nvinfer1::ILogger::Severity::kERROR, where);
    }
}

void reportUnknownException(char const* where, nvinfer1::IErrorRecorder* recorder, char const* op) noexcept
{
    try
    {
        reportError(std::string(where) + ": unknown exception", recorder, nvinfer1::ErrorCode::kINTERNAL_ERROR, op);
    }
    catch (...)
    {
        log(nvinfer1::ILogger::Severity::kERROR, where);
    }
}

} // namespace plugin
} // namespace lowbit
