// libactvar_trt_plugins_registered.so: the plugins register themselves with TensorRT's global registry when the
// library is loaded (plain dlopen: Triton's TensorRT backend `plugins=`, trtexec --staticPlugins). This calls the
// TensorRT library's getPluginRegistry() and getLogger(), hence this variant's link to it.
#include "creators.h"

namespace
{
class TensorRTLoggerFinder : public nvinfer1::ILoggerFinder
{
public:
    nvinfer1::ILogger* findLogger() noexcept override { return getLogger(); }
};

struct UseTensorRTLogger
{
    UseTensorRTLogger()
    {
        static TensorRTLoggerFinder finder;
        actvar_trt::setLoggerFinder(&finder);
    }
};
UseTensorRTLogger const gUseTensorRTLogger;
} // namespace

using actvar_trt::ExpertFfnCreator;
using actvar_trt::TokenScatterCreator;
REGISTER_TENSORRT_PLUGIN(TokenScatterCreator);
REGISTER_TENSORRT_PLUGIN(ExpertFfnCreator);
