// ActVarExpertFFN (plugins/expert_routing/CONTRACT.md): inputs h [T, C], router logits [T, N] float32,
// fc1_w [hidden, C], fc1_b [hidden], fc2_w [C, hidden], fc2_b [C]; outputs out [T, C] (h's type) and
// experts [T, top_k] int32. h, the weights and out share float16, bfloat16 or float32.
// Attributes num_experts = N (1..64, dividing hidden) and top_k (1..N). Workspace: actvarExpertFfnWorkspaceSize
// (the function the kernels use) + 256 bytes so that enqueue can align TensorRT's pointer.
#include "creators.h"

#include "actvar_plugins.h"

#include <climits>

namespace actvar_trt
{
namespace
{

class ExpertFfnPlugin final : public PluginBase
{
public:
    ExpertFfnPlugin(std::string node, int32_t numExperts, int32_t topK)
        : PluginBase(std::move(node))
        , mNumExperts(numExperts)
        , mTopK(topK)
    {
        mFields[0] = PluginField("num_experts", &mNumExperts, PluginFieldType::kINT32, 1);
        mFields[1] = PluginField("top_k", &mTopK, PluginFieldType::kINT32, 1);
        mFc.nbFields = 2;
        mFc.fields = mFields;
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new ExpertFfnPlugin(mNode, mNumExperts, mTopK);
        }
        catch (...)
        {
            return nullptr;
        }
    }
    char const* getPluginName() const noexcept override { return kExpertFfnName; }
    int32_t getNbOutputs() const noexcept override { return 2; }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != 6 || nbOutputs != 2)
            return -1;
        outputTypes[0] = inputTypes[0];
        outputTypes[1] = DataType::kINT32;
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        static constexpr int32_t kRanks[6] = {2, 2, 2, 1, 2, 1};
        bool ok = nbInputs == 6 && nbOutputs == 2;
        for (int32_t i = 0; ok && i < 6; ++i)
            ok = inputs[i].nbDims == kRanks[i];
        if (!ok)
        {
            error("expects 6 inputs h [T, C], router logits [T, N], fc1_w [hidden, C], fc1_b [hidden], "
                  "fc2_w [C, hidden], fc2_b [C] and 2 outputs");
            return -1;
        }
        outputs[0] = inputs[0];
        outputs[1].nbDims = 2;
        outputs[1].d[0] = inputs[0].d[0];
        outputs[1].d[1] = exprBuilder.constant(mTopK);
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 6 || nbOutputs != 2 || pos < 0 || pos > 7)
            return false;
        PluginTensorDesc const& d = inOut[pos].desc;
        if (d.format != TensorFormat::kLINEAR)
            return false;
        if (pos == 0)
            return actDtype(d.type) >= 0; // h
        if (pos == 1)
            return d.type == DataType::kFLOAT; // router logits
        if (pos == 7)
            return d.type == DataType::kINT32; // experts
        return d.type == inOut[0].desc.type;   // fc1_w, fc1_b, fc2_w, fc2_b, out: h's type
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 6 || nbOutputs != 2)
            return -1;
        Dims const &h = in[0].desc.dims, &r = in[1].desc.dims, &w1 = in[2].desc.dims, &b1 = in[3].desc.dims,
                   &w2 = in[4].desc.dims, &b2 = in[5].desc.dims;
        auto same = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }; // -1: known at run time only
        int64_t const C = h.d[1], hidden = w1.d[0];
        bool ok = same(h.d[0], r.d[0]) && same(r.d[1], mNumExperts) && same(w1.d[1], C) && same(w2.d[0], C)
            && same(b2.d[0], C) && same(b1.d[0], hidden) && same(w2.d[1], hidden);
        for (Dims const* d : {&h, &r, &w1, &b1, &w2, &b2})
            for (int32_t i = 0; i < d->nbDims; ++i)
                ok = ok && d->d[i] <= INT_MAX;
        if (!ok)
        {
            error("inconsistent shapes h " + dimsString(h) + ", router logits " + dimsString(r) + ", fc1_w "
                + dimsString(w1) + ", fc1_b " + dimsString(b1) + ", fc2_w " + dimsString(w2) + ", fc2_b "
                + dimsString(b2) + " for num_experts=" + std::to_string(mNumExperts));
            return -1;
        }
        if (hidden >= 0 && hidden % mNumExperts != 0)
        {
            error("num_experts=" + std::to_string(mNumExperts) + " does not divide the hidden width "
                + std::to_string(hidden) + " (fc1_w " + dimsString(w1) + ")");
            return -1;
        }
        return 0;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        if (nbInputs != 6)
            return 0;
        size_t n = actvarExpertFfnWorkspaceSize(static_cast<int>(in[0].max.d[0]), static_cast<int>(in[0].max.d[1]),
            static_cast<int>(in[2].max.d[0]), mNumExperts, mTopK, actDtype(in[0].desc.type));
        return n ? n + kWorkspaceAlign : 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        int const T = static_cast<int>(inputDesc[0].dims.d[0]), C = static_cast<int>(inputDesc[0].dims.d[1]);
        int const hidden = static_cast<int>(inputDesc[2].dims.d[0]);
        int const dtype = actDtype(inputDesc[0].type);
        size_t const need = actvarExpertFfnWorkspaceSize(T, C, hidden, mNumExperts, mTopK, dtype);
        if (need && !workspace)
        {
            error("no workspace passed, " + std::to_string(need) + " bytes needed");
            return -1;
        }
        // getWorkspaceSize reported need + 256, so [aligned, aligned + need) lies inside TensorRT's buffer
        uintptr_t const p = reinterpret_cast<uintptr_t>(workspace);
        void* aligned = need ? reinterpret_cast<void*>((p + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign)
                             : nullptr;
        cudaError_t e = actvarExpertFfn(inputs[0], static_cast<float const*>(inputs[1]), inputs[2], inputs[3],
            inputs[4], inputs[5], outputs[0], static_cast<int32_t*>(outputs[1]), T, C, hidden, mNumExperts, mTopK, dtype,
            aligned, need, stream);
        if (e != cudaSuccess)
        {
            error(std::string("actvarExpertFfn failed: ") + cudaGetErrorName(e));
            return -1;
        }
        return 0;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mFc; }

private:
    int32_t mNumExperts;
    int32_t mTopK;
    PluginField mFields[2];
    PluginFieldCollection mFc{};
};

} // namespace

IPluginV3* ExpertFfnCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    try
    {
        std::string const node = name ? name : "";
        int32_t n = 0, k = 0;
        std::string err;
        if (!readIntField(fc, "num_experts", 1, ACTVAR_MAX_EXPERTS, n, err) || !readIntField(fc, "top_k", 1, n, k, err))
        {
            logError(kExpertFfnName, node,
                err + (phase == TensorRTPhase::kRUNTIME ? " (deserializing an engine)" : ""));
            return nullptr;
        }
        return new ExpertFfnPlugin(node, n, k);
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace actvar_trt
