// The IPluginCreatorV3One creators of libactvar_trt_plugins.so (see plugins/*/CONTRACT.md and plugins/trt/README.md).
#ifndef ACTVAR_TRT_CREATORS_H
#define ACTVAR_TRT_CREATORS_H

#include "plugin_common.h"

namespace actvar_trt
{

// Shared by both creators: name, version "1", namespace "" and the attribute list.
class CreatorBase : public IPluginCreatorV3One
{
public:
    CreatorBase(char const* name, std::vector<char const*> const& intFields);
    PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldNames; }
    char const* getPluginName() const noexcept override { return mName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

private:
    char const* mName;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFieldNames{};
};

// ActVarTokenScatter: no attributes.
class TokenScatterCreator : public CreatorBase
{
public:
    TokenScatterCreator() : CreatorBase(kTokenScatterName, {}) {}
    IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override;
};

// ActVarExpertFFN: num_experts (1..64), top_k (1..num_experts), both int32.
class ExpertFfnCreator : public CreatorBase
{
public:
    ExpertFfnCreator() : CreatorBase(kExpertFfnName, {"num_experts", "top_k"}) {}
    IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override;
};

} // namespace actvar_trt

#endif
