// ActVarTokenScatter (plugins/token_scatter/CONTRACT.md): out [S, L, C] = x [S, L, C] with rows idx[s, :] (int32
// [S, K]) replaced by upd [S, K, C]; x, upd, out share float32, float16 or bfloat16. No attributes, no workspace.
#include "creators.h"

#include "actvar_plugins.h"

#include <climits>

namespace actvar_trt
{
namespace
{

class TokenScatterPlugin final : public PluginBase
{
public:
    using PluginBase::PluginBase;

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new TokenScatterPlugin(mNode);
        }
        catch (...)
        {
            return nullptr;
        }
    }
    char const* getPluginName() const noexcept override { return kTokenScatterName; }
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1)
            return -1;
        outputTypes[0] = inputTypes[0];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder&) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 3 || inputs[1].nbDims != 2 || inputs[2].nbDims != 3)
        {
            error("expects 3 inputs x [S, L, C], idx [S, K], upd [S, K, C] and 1 output");
            return -1;
        }
        outputs[0] = inputs[0];
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || pos < 0 || pos > 3)
            return false;
        PluginTensorDesc const& d = inOut[pos].desc;
        if (d.format != TensorFormat::kLINEAR)
            return false;
        if (pos == 0)
            return actDtype(d.type) >= 0;
        if (pos == 1)
            return d.type == DataType::kINT32;
        return d.type == inOut[0].desc.type; // upd, out: x's type
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1)
            return -1;
        Dims const& x = in[0].desc.dims;
        Dims const& idx = in[1].desc.dims;
        Dims const& upd = in[2].desc.dims;
        auto same = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }; // -1: known at run time only
        bool ok = same(x.d[0], idx.d[0]) && same(x.d[0], upd.d[0]) && same(idx.d[1], upd.d[1]) && same(x.d[2], upd.d[2])
            && (idx.d[1] < 0 || x.d[1] < 0 || idx.d[1] <= x.d[1]);
        for (Dims const* d : {&x, &idx, &upd})
            for (int32_t i = 0; i < d->nbDims; ++i)
                ok = ok && d->d[i] <= INT_MAX;
        if (!ok)
        {
            error("inconsistent shapes x " + dimsString(x) + ", idx " + dimsString(idx) + ", upd " + dimsString(upd)
                + " (want [S, L, C], [S, K], [S, K, C] with K <= L)");
            return -1;
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        Dims const& x = inputDesc[0].dims;
        int const S = static_cast<int>(x.d[0]), L = static_cast<int>(x.d[1]), C = static_cast<int>(x.d[2]);
        int const K = static_cast<int>(inputDesc[1].dims.d[1]);
        cudaError_t e = actvarTokenScatter(inputs[0], static_cast<int32_t const*>(inputs[1]), inputs[2], outputs[0], S,
            L, K, C, actDtype(inputDesc[0].type), stream);
        if (e != cudaSuccess)
        {
            error(std::string("actvarTokenScatter failed: ") + cudaGetErrorName(e));
            return -1;
        }
        return 0;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mNoFields; }

private:
    PluginFieldCollection mNoFields{0, nullptr};
};

} // namespace

IPluginV3* TokenScatterCreator::createPlugin(char const* name, PluginFieldCollection const*, TensorRTPhase) noexcept
{
    try
    {
        return new TokenScatterPlugin(name ? name : "");
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace actvar_trt
