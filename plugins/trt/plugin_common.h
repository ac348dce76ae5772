// Shared by the TensorRT plugins of libactvar_trt_plugins.so: names, logging through TensorRT's logger, attribute
// parsing, the activation types of the contracts, and the base class holding the three IPluginV3One capabilities.
#ifndef ACTVAR_TRT_PLUGIN_COMMON_H
#define ACTVAR_TRT_PLUGIN_COMMON_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace actvar_trt
{
using namespace nvinfer1;

constexpr char const* kPluginVersion = "1";    // CONTRACT.md of both plugins
constexpr char const* kPluginNamespace = "";
constexpr char const* kTokenScatterName = "ActVarTokenScatter";
constexpr char const* kExpertFfnName = "ActVarExpertFFN";
constexpr size_t kWorkspaceAlign = 256;        // actvarExpertFfn wants a 256-byte aligned workspace

// The logger finder TensorRT passed to setLoggerFinder (nullptr before: messages go to stderr).
void setLoggerFinder(ILoggerFinder* finder) noexcept;
// One message of severity kERROR through TensorRT's logger, prefixed by the plugin and node name.
void logError(char const* plugin, std::string const& node, std::string const& msg) noexcept;

// ActvarDataType of an activation type (float32, float16, bfloat16), -1 for any other.
int32_t actDtype(DataType t) noexcept;

// "libactvar_trt_plugins.so <library version>": what getMetadataString() reports (names this library in engines).
char const* metadataString() noexcept;

// An integer attribute of a field collection, range-checked. Returns false with `err` set when it is missing, not
// one integer, or outside [lo, hi]; the first field of that name counts.
bool readIntField(PluginFieldCollection const* fc, char const* name, int64_t lo, int64_t hi, int32_t& value,
    std::string& err) noexcept;

// The object behind the three capabilities (one object serves core, build and runtime, as TensorRT allows).
class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    explicit PluginBase(std::string node) : mNode(std::move(node)) {}
    ~PluginBase() override = default;

    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override;
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
    char const* getMetadataString() noexcept override { return metadataString(); }
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override
    {
        return 0;
    }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

protected:
    void error(std::string const& msg) const noexcept { logError(getPluginName(), mNode, msg); }
    std::string mNode;
};

// Dims as "[a, b, c]" for messages.
std::string dimsString(Dims const& d);

} // namespace actvar_trt

#endif
