// The entry points TensorRT's IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, Python's
// get_plugin_registry().load_library) looks up: getCreators and setLoggerFinder. No TensorRT symbol is used, so
// the library needs no link to libnvinfer and serves TensorRT and TensorRT-RTX alike.
#include "creators.h"

#define ACTVAR_TRT_EXPORT __attribute__((visibility("default")))

extern "C" ACTVAR_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    actvar_trt::setLoggerFinder(finder);
}

extern "C" ACTVAR_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static actvar_trt::TokenScatterCreator scatter;
    static actvar_trt::ExpertFfnCreator expert;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&scatter, &expert};
    nbCreators = 2;
    return creators;
}
