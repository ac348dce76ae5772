#include "plugin_common.h"

#include "creators.h"

#include "actvar_plugins.h"

#include <atomic>
#include <cstdio>

namespace actvar_trt
{
namespace
{
std::atomic<ILoggerFinder*> gFinder{nullptr};
}

void setLoggerFinder(ILoggerFinder* finder) noexcept
{
    gFinder.store(finder);
}

void logError(char const* plugin, std::string const& node, std::string const& msg) noexcept
{
    try
    {
        std::string line = std::string(plugin) + " '" + node + "': " + msg;
        ILoggerFinder* finder = gFinder.load();
        ILogger* logger = finder ? finder->findLogger() : nullptr;
        if (logger)
            logger->log(ILogger::Severity::kERROR, line.c_str());
        else
            std::fprintf(stderr, "[actvar_trt_plugins] ERROR: %s\n", line.c_str());
    }
    catch (...)
    {
    }
}

int32_t actDtype(DataType t) noexcept
{
    switch (t)
    {
    case DataType::kFLOAT: return ACTVAR_DTYPE_FLOAT32;
    case DataType::kHALF: return ACTVAR_DTYPE_FLOAT16;
    case DataType::kBF16: return ACTVAR_DTYPE_BFLOAT16;
    default: return -1;
    }
}

char const* metadataString() noexcept
{
    static std::string const s = "libactvar_trt_plugins.so " + std::to_string(actvarPluginsVersion());
    return s.c_str();
}

bool readIntField(PluginFieldCollection const* fc, char const* name, int64_t lo, int64_t hi, int32_t& value,
    std::string& err) noexcept
{
    try
    {
        PluginField const* f = nullptr;
        for (int32_t i = 0; fc && fc->fields && i < fc->nbFields && !f; ++i)
            if (fc->fields[i].name && std::string(fc->fields[i].name) == name)
                f = &fc->fields[i];
        if (!f)
        {
            err = std::string("attribute ") + name + " is missing";
            return false;
        }
        if (f->length != 1 || !f->data)
        {
            err = std::string("attribute ") + name + " must be one integer, got " + std::to_string(f->length)
                + " values";
            return false;
        }
        int64_t v;
        switch (f->type)
        {
        case PluginFieldType::kINT8: v = *static_cast<int8_t const*>(f->data); break;
        case PluginFieldType::kINT16: v = *static_cast<int16_t const*>(f->data); break;
        case PluginFieldType::kINT32: v = *static_cast<int32_t const*>(f->data); break;
        case PluginFieldType::kINT64: v = *static_cast<int64_t const*>(f->data); break;
        default:
            err = std::string("attribute ") + name + " must be an integer (field type "
                + std::to_string(static_cast<int32_t>(f->type)) + ")";
            return false;
        }
        if (v < lo || v > hi)
        {
            err = std::string(name) + "=" + std::to_string(v) + " outside [" + std::to_string(lo) + ", "
                + std::to_string(hi) + "]";
            return false;
        }
        value = static_cast<int32_t>(v);
        return true;
    }
    catch (...)
    {
        err = "out of memory";
        return false;
    }
}

IPluginCapability* PluginBase::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

CreatorBase::CreatorBase(char const* name, std::vector<char const*> const& intFields) : mName(name)
{
    for (char const* f : intFields)
        mFields.emplace_back(f, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.nbFields = static_cast<int32_t>(mFields.size());
    mFieldNames.fields = mFields.data();
}

std::string dimsString(Dims const& d)
{
    std::string s = "[";
    for (int32_t i = 0; i < d.nbDims; ++i)
        s += (i ? ", " : "") + std::to_string(d.d[i]);
    return s + "]";
}

} // namespace actvar_trt
