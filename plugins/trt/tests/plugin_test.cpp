// actvar_trt_plugin_test: drives libactvar_trt_plugins.so through its own entry points, without TensorRT's runtime.
//   actvar_trt_plugin_test                 creator, shape, type, workspace and serialization checks (no GPU needed)
//   actvar_trt_plugin_test --enqueue DIR   runs enqueue on the GPU for every case of DIR/cases.txt:
//       scatter NAME DTYPE S L K C              reads NAME.x/.idx/.upd.bin, writes NAME.out.bin
//       expert NAME DTYPE T C HIDDEN N TOP_K     reads NAME.h/.logits/.fc1_w/.fc1_b/.fc2_w/.fc2_b.bin,
//                                                writes NAME.out.bin and NAME.experts.bin
//   (raw little-endian row-major data; DTYPE 0 float32, 1 float16, 2 bfloat16; logits float32, idx/experts int32)
// tests/test_plugins_build.py runs the first form in CI, tests/test_trt_plugins_gpu.py the second on a GPU.
#include "creators.h"

#include "actvar_plugins.h"

#include <NvInferImpl.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(ILoggerFinder* finder);

namespace
{
int gChecks = 0, gFailures = 0;
#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        ++gChecks;                                                                                                     \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);                                     \
        }                                                                                                              \
    } while (0)

// ---- the logger TensorRT would pass: collects the messages
class Logger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kERROR)
            messages.emplace_back(msg);
    }
    bool saw(std::string const& needle) const
    {
        for (auto const& m : messages)
            if (m.find(needle) != std::string::npos)
                return true;
        return false;
    }
    std::vector<std::string> messages;
};
class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() noexcept override { return &logger; }
    Logger logger;
};

// ---- constant-only dimension expressions (what TensorRT's builder passes for static shapes)
class ConstImpl : public apiv::VDimensionExpr
{
public:
    explicit ConstImpl(int64_t v) : value(v) {}
    bool isConstant() const override { return true; }
    int64_t getConstantValue() const override { return value; }
    bool isSizeTensor() const override { return false; }
    int64_t value;
};
class ConstExpr : public IDimensionExpr
{
public:
    explicit ConstExpr(int64_t v) : mConst(v) { mImpl = &mConst; }

private:
    ConstImpl mConst;
};
class BuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t v) override { return &exprs.emplace_back(v); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        int64_t x = a.getConstantValue(), y = b.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return constant(x + y);
        case DimensionOperation::kPROD: return constant(x * y);
        case DimensionOperation::kMAX: return constant(x > y ? x : y);
        case DimensionOperation::kMIN: return constant(x < y ? x : y);
        case DimensionOperation::kSUB: return constant(x - y);
        default: return nullptr;
        }
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    std::deque<ConstExpr> exprs;
};
class ExprBuilder : public IExprBuilder
{
public:
    ExprBuilder() { mImpl = &impl; }
    DimsExprs dims(std::vector<int64_t> const& v)
    {
        DimsExprs d{};
        d.nbDims = static_cast<int32_t>(v.size());
        for (size_t i = 0; i < v.size(); ++i)
            d.d[i] = impl.constant(v[i]);
        return d;
    }
    BuilderImpl impl;
};

Dims makeDims(std::vector<int64_t> const& v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
        d.d[i] = v[i];
    return d;
}
DynamicPluginTensorDesc desc(std::vector<int64_t> const& shape, DataType t, TensorFormat f = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc d{};
    d.desc.dims = d.min = d.max = d.opt = makeDims(shape);
    d.desc.type = t;
    d.desc.format = f;
    d.desc.scale = 1.f;
    return d;
}
std::vector<int64_t> values(DimsExprs const& d)
{
    std::vector<int64_t> v;
    for (int32_t i = 0; i < d.nbDims; ++i)
        v.push_back(d.d[i] && d.d[i]->isConstant() ? d.d[i]->getConstantValue() : -999);
    return v;
}

struct PluginDeleter
{
    void operator()(IPluginV3* p) const { delete p; }
};
using PluginPtr = std::unique_ptr<IPluginV3, PluginDeleter>;

IPluginCreatorV3One* creator(char const* name)
{
    int32_t n = 0;
    IPluginCreatorInterface* const* list = getCreators(n);
    for (int32_t i = 0; i < n; ++i)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
        if (std::strcmp(c->getPluginName(), name) == 0)
            return c;
    }
    return nullptr;
}

// A field collection owning its data.
struct Fields
{
    void addInt(char const* name, int64_t v, PluginFieldType t = PluginFieldType::kINT32, int32_t length = 1)
    {
        auto& buf = data.emplace_back(8 * (length > 0 ? length : 1), 0);
        for (int32_t i = 0; i < (length > 0 ? length : 1); ++i)
        {
            if (t == PluginFieldType::kINT64)
                std::memcpy(buf.data() + 8 * i, &v, 8);
            else if (t == PluginFieldType::kFLOAT32)
            {
                float f = static_cast<float>(v);
                std::memcpy(buf.data() + 4 * i, &f, 4);
            }
            else
            {
                int32_t x = static_cast<int32_t>(v);
                std::memcpy(buf.data() + 4 * i, &x, 4);
            }
        }
        names.emplace_back(name);
        types.push_back(t);
        lengths.push_back(length);
    }
    PluginFieldCollection const* collection()
    {
        fields.clear();
        for (size_t i = 0; i < names.size(); ++i)
            fields.emplace_back(names[i].c_str(), data[i].data(), types[i], lengths[i]);
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        return &fc;
    }
    // What an engine stores: every field's name, type and bytes, copied out of the plugin's collection.
    static Fields copyOf(PluginFieldCollection const* src)
    {
        Fields f;
        for (int32_t i = 0; i < src->nbFields; ++i)
        {
            PluginField const& p = src->fields[i];
            size_t const elem = p.type == PluginFieldType::kINT64 ? 8 : 4;
            f.names.emplace_back(p.name);
            f.types.push_back(p.type);
            f.lengths.push_back(p.length);
            auto const* b = static_cast<char const*>(p.data);
            f.data.emplace_back(b, b + elem * p.length);
        }
        return f;
    }
    std::deque<std::string> names;
    std::deque<std::vector<char>> data;
    std::vector<PluginFieldType> types;
    std::vector<int32_t> lengths;
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};
};

IPluginV3OneCore* core(IPluginV3* p)
{
    return static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
}
IPluginV3OneBuild* build(IPluginV3* p)
{
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
IPluginV3OneRuntime* runtime(IPluginV3* p)
{
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

int32_t fieldInt(PluginFieldCollection const* fc, char const* name)
{
    for (int32_t i = 0; i < fc->nbFields; ++i)
        if (std::strcmp(fc->fields[i].name, name) == 0 && fc->fields[i].type == PluginFieldType::kINT32)
            return *static_cast<int32_t const*>(fc->fields[i].data);
    return -1;
}

PluginPtr makeExpert(int64_t n, int64_t k, TensorRTPhase phase = TensorRTPhase::kBUILD)
{
    Fields f;
    f.addInt("num_experts", n);
    f.addInt("top_k", k);
    return PluginPtr(creator(actvar_trt::kExpertFfnName)->createPlugin("expert_node", f.collection(), phase));
}
} // namespace

namespace
{
using actvar_trt::kExpertFfnName;
using actvar_trt::kTokenScatterName;
constexpr DataType kActTypes[3] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16};

void checkCreators()
{
    int32_t n = 0;
    IPluginCreatorInterface* const* list = getCreators(n);
    CHECK(n == 2 && list != nullptr);
    for (int32_t i = 0; i < n; ++i)
    {
        CHECK(std::strcmp(list[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
        auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
        CHECK(std::strcmp(c->getPluginVersion(), "1") == 0 && std::strcmp(c->getPluginNamespace(), "") == 0);
    }
    IPluginCreatorV3One* s = creator(kTokenScatterName);
    IPluginCreatorV3One* e = creator(kExpertFfnName);
    CHECK(s && e && s != e);
    CHECK(s->getFieldNames()->nbFields == 0);
    PluginFieldCollection const* names = e->getFieldNames();
    CHECK(names->nbFields == 2 && std::strcmp(names->fields[0].name, "num_experts") == 0
        && std::strcmp(names->fields[1].name, "top_k") == 0 && names->fields[0].type == PluginFieldType::kINT32
        && names->fields[1].type == PluginFieldType::kINT32);
}

void checkCapabilities(IPluginV3* p, char const* name, int32_t nbOutputs)
{
    CHECK(core(p) && build(p) && runtime(p));
    CHECK(std::strcmp(core(p)->getPluginName(), name) == 0 && std::strcmp(core(p)->getPluginVersion(), "1") == 0
        && std::strcmp(core(p)->getPluginNamespace(), "") == 0);
    CHECK(build(p)->getNbOutputs() == nbOutputs);
    char const* meta = build(p)->getMetadataString();
    CHECK(meta && std::string(meta) == "libactvar_trt_plugins.so " + std::to_string(actvarPluginsVersion()));
}

// Expert FFN on the contract's shapes: T = S * K_t tokens of width C, hidden = 4C, N experts, top_k.
void checkExpertShapes(Finder& finder, int64_t T, int64_t C, int64_t N, int64_t k)
{
    int64_t const H = 4 * C;
    PluginPtr p = makeExpert(N, k);
    CHECK(p != nullptr);
    if (!p)
        return;
    checkCapabilities(p.get(), kExpertFfnName, 2);
    IPluginV3OneBuild* b = build(p.get());
    for (DataType t : kActTypes)
    {
        DataType in[6] = {t, DataType::kFLOAT, t, t, t, t}, out[2];
        CHECK(b->getOutputDataTypes(out, 2, in, 6) == 0 && out[0] == t && out[1] == DataType::kINT32);
        std::vector<DynamicPluginTensorDesc> io = {desc({T, C}, t), desc({T, N}, DataType::kFLOAT), desc({H, C}, t),
            desc({H}, t), desc({C, H}, t), desc({C}, t), desc({T, C}, t), desc({T, k}, DataType::kINT32)};
        bool all = true;
        for (int32_t pos = 0; pos < 8; ++pos)
            all = all && b->supportsFormatCombination(pos, io.data(), 6, 2);
        CHECK(all);
        io[2].desc.type = t == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT; // weights of another type
        CHECK(!b->supportsFormatCombination(2, io.data(), 6, 2));
        io[2].desc.type = t;
        io[7].desc.type = DataType::kINT64;
        CHECK(!b->supportsFormatCombination(7, io.data(), 6, 2));
        io[7].desc.type = DataType::kINT32;
        io[1].desc.type = t == DataType::kFLOAT ? DataType::kHALF : t;
        CHECK(!b->supportsFormatCombination(1, io.data(), 6, 2));
        io[1].desc.type = DataType::kFLOAT;
        io[0].desc.format = TensorFormat::kHWC8;
        CHECK(!b->supportsFormatCombination(0, io.data(), 6, 2));
        io[0].desc.format = TensorFormat::kLINEAR;
        CHECK(b->configurePlugin(io.data(), 6, io.data() + 6, 2) == 0);
        size_t const need = actvarExpertFfnWorkspaceSize(
            static_cast<int>(T), static_cast<int>(C), static_cast<int>(H), static_cast<int>(N), static_cast<int>(k),
            t == DataType::kFLOAT ? 0 : t == DataType::kHALF ? 1 : 2);
        CHECK(need > 0 && b->getWorkspaceSize(io.data(), 6, io.data() + 6, 2) == need + 256);
    }
    ExprBuilder eb;
    DimsExprs in[6] = {eb.dims({T, C}), eb.dims({T, N}), eb.dims({H, C}), eb.dims({H}), eb.dims({C, H}), eb.dims({C})};
    DimsExprs out[2];
    CHECK(b->getOutputShapes(in, 6, nullptr, 0, out, 2, eb) == 0);
    CHECK(values(out[0]) == (std::vector<int64_t>{T, C}) && values(out[1]) == (std::vector<int64_t>{T, k}));
    in[3] = eb.dims({H, 1}); // fc1_b of rank 2
    finder.logger.messages.clear();
    CHECK(b->getOutputShapes(in, 6, nullptr, 0, out, 2, eb) != 0 && finder.logger.saw("expects 6 inputs"));

    // inconsistent shapes: configure fails with the plugin's own message
    DataType t = DataType::kHALF;
    std::vector<DynamicPluginTensorDesc> bad = {desc({T, C}, t), desc({T, N}, DataType::kFLOAT), desc({H + 1, C}, t),
        desc({H + 1}, t), desc({C, H + 1}, t), desc({C}, t), desc({T, C}, t), desc({T, k}, DataType::kINT32)};
    finder.logger.messages.clear();
    CHECK(b->configurePlugin(bad.data(), 6, bad.data() + 6, 2) != 0 && finder.logger.saw("does not divide the hidden"));
    bad[2] = desc({H, C}, t), bad[3] = desc({H}, t), bad[4] = desc({C, H}, t);
    bad[1] = desc({T, N + 1}, DataType::kFLOAT);
    finder.logger.messages.clear();
    CHECK(b->configurePlugin(bad.data(), 6, bad.data() + 6, 2) != 0 && finder.logger.saw("inconsistent shapes"));
}

void checkScatterShapes(Finder& finder, int64_t S, int64_t L, int64_t K, int64_t C)
{
    Fields none;
    PluginPtr p(creator(kTokenScatterName)->createPlugin("scatter_node", none.collection(), TensorRTPhase::kBUILD));
    CHECK(p != nullptr);
    if (!p)
        return;
    checkCapabilities(p.get(), kTokenScatterName, 1);
    IPluginV3OneBuild* b = build(p.get());
    for (DataType t : kActTypes)
    {
        DataType in[3] = {t, DataType::kINT32, t}, out[1];
        CHECK(b->getOutputDataTypes(out, 1, in, 3) == 0 && out[0] == t);
        std::vector<DynamicPluginTensorDesc> io
            = {desc({S, L, C}, t), desc({S, K}, DataType::kINT32), desc({S, K, C}, t), desc({S, L, C}, t)};
        bool all = true;
        for (int32_t pos = 0; pos < 4; ++pos)
            all = all && b->supportsFormatCombination(pos, io.data(), 3, 1);
        CHECK(all);
        io[1].desc.type = DataType::kINT64;
        CHECK(!b->supportsFormatCombination(1, io.data(), 3, 1));
        io[1].desc.type = DataType::kINT32;
        io[3].desc.type = t == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
        CHECK(!b->supportsFormatCombination(3, io.data(), 3, 1));
        io[3].desc.type = t;
        CHECK(b->configurePlugin(io.data(), 3, io.data() + 3, 1) == 0);
        CHECK(b->getWorkspaceSize(io.data(), 3, io.data() + 3, 1) == 0);
    }
    DataType t = DataType::kINT8;
    std::vector<DynamicPluginTensorDesc> io8 = {desc({S, L, C}, t), desc({S, K}, DataType::kINT32), desc({S, K, C}, t)};
    CHECK(!b->supportsFormatCombination(0, io8.data(), 3, 1));
    ExprBuilder eb;
    DimsExprs in[3] = {eb.dims({S, L, C}), eb.dims({S, K}), eb.dims({S, K, C})}, out[1];
    CHECK(b->getOutputShapes(in, 3, nullptr, 0, out, 1, eb) == 0 && values(out[0]) == (std::vector<int64_t>{S, L, C}));
    std::vector<DynamicPluginTensorDesc> bad = {desc({S, L, C}, DataType::kFLOAT), desc({S, L + 1}, DataType::kINT32),
        desc({S, L + 1, C}, DataType::kFLOAT), desc({S, L, C}, DataType::kFLOAT)};
    finder.logger.messages.clear();
    CHECK(b->configurePlugin(bad.data(), 3, bad.data() + 3, 1) != 0 && finder.logger.saw("K <= L"));
    // serialization: no fields; the runtime copy has the same identity
    PluginFieldCollection const* fc = runtime(p.get())->getFieldsToSerialize();
    CHECK(fc && fc->nbFields == 0);
    PluginPtr r(creator(kTokenScatterName)->createPlugin("scatter_node", fc, TensorRTPhase::kRUNTIME));
    CHECK(r && std::strcmp(core(r.get())->getPluginName(), kTokenScatterName) == 0);
}

void checkSerialization()
{
    PluginPtr p = makeExpert(16, 12);
    CHECK(p != nullptr);
    if (!p)
        return;
    Fields stored = Fields::copyOf(runtime(p.get())->getFieldsToSerialize());
    p.reset(); // the engine's copy must not depend on the plugin object
    PluginPtr r(creator(kExpertFfnName)->createPlugin("expert_node", stored.collection(), TensorRTPhase::kRUNTIME));
    CHECK(r != nullptr);
    if (!r)
        return;
    PluginFieldCollection const* fc = runtime(r.get())->getFieldsToSerialize();
    CHECK(fc->nbFields == 2 && fieldInt(fc, "num_experts") == 16 && fieldInt(fc, "top_k") == 12);
    PluginPtr c(r->clone());
    CHECK(c && fieldInt(runtime(c.get())->getFieldsToSerialize(), "top_k") == 12);
    PluginPtr a(runtime(c.get())->attachToContext(nullptr));
    CHECK(a && fieldInt(runtime(a.get())->getFieldsToSerialize(), "num_experts") == 16);
    // an int64 attribute (ONNX's integer type) is accepted as well
    Fields f64;
    f64.addInt("num_experts", 8, PluginFieldType::kINT64);
    f64.addInt("top_k", 8, PluginFieldType::kINT64);
    PluginPtr q(creator(kExpertFfnName)->createPlugin("e", f64.collection(), TensorRTPhase::kBUILD));
    CHECK(q && fieldInt(runtime(q.get())->getFieldsToSerialize(), "top_k") == 8);
}

// Bad attributes: nullptr and one message naming the attribute, at build time and when deserializing.
void checkRejections(Finder& finder)
{
    struct Bad
    {
        int64_t n, k;
        PluginFieldType type;
        int32_t length;
        bool dropN;
        char const* needle;
    };
    Bad const cases[] = {{4, 0, PluginFieldType::kINT32, 1, false, "top_k=0 outside [1, 4]"},
        {4, 5, PluginFieldType::kINT32, 1, false, "top_k=5 outside [1, 4]"},
        {0, 1, PluginFieldType::kINT32, 1, false, "num_experts=0 outside [1, 64]"},
        {65, 1, PluginFieldType::kINT32, 1, false, "num_experts=65 outside [1, 64]"},
        {4, 2, PluginFieldType::kINT32, 1, true, "num_experts is missing"},
        {4, 2, PluginFieldType::kFLOAT32, 1, false, "must be an integer"},
        {4, 2, PluginFieldType::kINT32, 2, false, "must be one integer"}};
    for (TensorRTPhase phase : {TensorRTPhase::kBUILD, TensorRTPhase::kRUNTIME})
        for (Bad const& c : cases)
        {
            Fields f;
            if (!c.dropN)
                f.addInt("num_experts", c.n, c.type, c.length);
            f.addInt("top_k", c.k);
            finder.logger.messages.clear();
            IPluginV3* p = creator(kExpertFfnName)->createPlugin("bad_node", f.collection(), phase);
            CHECK(p == nullptr);
            delete p;
            bool const one = finder.logger.messages.size() == 1 && finder.logger.saw(c.needle)
                && finder.logger.saw("ActVarExpertFFN 'bad_node'")
                && (phase == TensorRTPhase::kBUILD || finder.logger.saw("deserializing"));
            CHECK(one);
            if (!one)
                std::fprintf(stderr, "  expected one message with '%s', got %zu\n", c.needle,
                    finder.logger.messages.size());
        }
    finder.logger.messages.clear();
    IPluginV3* p = creator(kExpertFfnName)->createPlugin("null_fc", nullptr, TensorRTPhase::kBUILD);
    CHECK(p == nullptr && finder.logger.saw("num_experts is missing"));
}

// ------------------------------------------------------------------------------------------------ enqueue (GPU)

struct DeviceBuf
{
    explicit DeviceBuf(size_t n) : bytes(n)
    {
        if (n && cudaMalloc(&ptr, n) != cudaSuccess)
            ptr = nullptr;
    }
    ~DeviceBuf() { cudaFree(ptr); }
    void* ptr = nullptr;
    size_t bytes;
};

bool readFile(std::string const& path, DeviceBuf& dst)
{
    std::ifstream f(path, std::ios::binary);
    std::vector<char> host(dst.bytes);
    if (!f.read(host.data(), static_cast<std::streamsize>(host.size())) || f.peek() != EOF)
    {
        std::fprintf(stderr, "%s: missing or not %zu bytes\n", path.c_str(), dst.bytes);
        return false;
    }
    return cudaMemcpy(dst.ptr, host.data(), host.size(), cudaMemcpyHostToDevice) == cudaSuccess;
}

bool writeFile(std::string const& path, DeviceBuf const& src)
{
    std::vector<char> host(src.bytes);
    if (cudaMemcpy(host.data(), src.ptr, host.size(), cudaMemcpyDeviceToHost) != cudaSuccess)
        return false;
    std::ofstream f(path, std::ios::binary);
    return static_cast<bool>(f.write(host.data(), static_cast<std::streamsize>(host.size())));
}

// One case: the plugin goes through the calls TensorRT makes (configure, workspace, attach, shape change,
// enqueue) with real device buffers; outputs are poisoned (0xFF bytes) first.
bool runCase(std::string const& dir, std::string const& line)
{
    std::istringstream in(line);
    std::string kind, name;
    int dtype = -1;
    in >> kind >> name >> dtype;
    DataType const dt = dtype == 0 ? DataType::kFLOAT : dtype == 1 ? DataType::kHALF : DataType::kBF16;
    std::string const base = dir + "/" + name;
    std::vector<DynamicPluginTensorDesc> io;
    std::vector<std::unique_ptr<DeviceBuf>> bufs;
    std::vector<std::string> inNames, outNames;
    PluginPtr plugin;
    int32_t nbIn = 0;
    auto add = [&](std::vector<int64_t> shape, DataType t, std::string const& file) {
        size_t n = t == DataType::kINT32 || t == DataType::kFLOAT ? 4 : 2;
        for (int64_t s : shape)
            n *= static_cast<size_t>(s);
        io.push_back(desc(shape, t));
        bufs.push_back(std::make_unique<DeviceBuf>(n));
        (inNames.size() < static_cast<size_t>(nbIn) ? inNames : outNames).push_back(file);
    };
    if (kind == "scatter")
    {
        int64_t S, L, K, C;
        in >> S >> L >> K >> C;
        Fields none;
        plugin.reset(creator(kTokenScatterName)->createPlugin(name.c_str(), none.collection(), TensorRTPhase::kBUILD));
        nbIn = 3;
        add({S, L, C}, dt, "x"), add({S, K}, DataType::kINT32, "idx"), add({S, K, C}, dt, "upd");
        add({S, L, C}, dt, "out");
    }
    else if (kind == "expert")
    {
        int64_t T, C, H, N, k;
        in >> T >> C >> H >> N >> k;
        plugin = makeExpert(N, k);
        nbIn = 6;
        add({T, C}, dt, "h"), add({T, N}, DataType::kFLOAT, "logits"), add({H, C}, dt, "fc1_w"), add({H}, dt, "fc1_b");
        add({C, H}, dt, "fc2_w"), add({C}, dt, "fc2_b");
        add({T, C}, dt, "out"), add({T, k}, DataType::kINT32, "experts");
    }
    if (!plugin || !in || dtype < 0 || dtype > 2)
    {
        std::fprintf(stderr, "bad case line: %s\n", line.c_str());
        return false;
    }
    for (auto const& b : bufs)
        if (!b->ptr && b->bytes)
            return false;
    int32_t const nbOut = static_cast<int32_t>(io.size()) - nbIn;
    for (int32_t i = 0; i < nbIn; ++i)
        if (!readFile(base + "." + inNames[i] + ".bin", *bufs[i]))
            return false;
    for (int32_t i = nbIn; i < nbIn + nbOut; ++i)
        cudaMemset(bufs[i]->ptr, 0xFF, bufs[i]->bytes);
    IPluginV3OneBuild* b = build(plugin.get());
    if (b->configurePlugin(io.data(), nbIn, io.data() + nbIn, nbOut) != 0)
        return false;
    size_t const ws = b->getWorkspaceSize(io.data(), nbIn, io.data() + nbIn, nbOut);
    // TensorRT's workspace pointer need not be 256-byte aligned: pass one 16 bytes past an allocation's start
    DeviceBuf workspace(ws ? ws + 16 : 0);
    PluginPtr rt(runtime(plugin.get())->attachToContext(nullptr));
    IPluginV3OneRuntime* r = runtime(rt.get());
    std::vector<PluginTensorDesc> pd;
    std::vector<void const*> ins;
    std::vector<void*> outs;
    for (size_t i = 0; i < io.size(); ++i)
    {
        pd.push_back(io[i].desc);
        if (static_cast<int32_t>(i) < nbIn)
            ins.push_back(bufs[i]->ptr);
        else
            outs.push_back(bufs[i]->ptr);
    }
    cudaStream_t stream;
    cudaStreamCreate(&stream);
    bool ok = r->onShapeChange(pd.data(), nbIn, pd.data() + nbIn, nbOut) == 0
        && r->enqueue(pd.data(), pd.data() + nbIn, ins.data(), outs.data(),
               ws ? static_cast<char*>(workspace.ptr) + 16 : nullptr, stream)
            == 0
        && cudaStreamSynchronize(stream) == cudaSuccess;
    cudaStreamDestroy(stream);
    for (int32_t i = 0; ok && i < nbOut; ++i)
        ok = writeFile(base + "." + outNames[i] + ".bin", *bufs[nbIn + i]);
    std::printf("%s %s: %s\n", kind.c_str(), name.c_str(), ok ? "ok" : "FAILED");
    return ok;
}

int runEnqueue(std::string const& dir)
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    {
        std::fprintf(stderr, "no CUDA device\n");
        return 2;
    }
    std::ifstream cases(dir + "/cases.txt");
    if (!cases)
    {
        std::fprintf(stderr, "no %s/cases.txt\n", dir.c_str());
        return 2;
    }
    int failed = 0, run = 0;
    for (std::string line; std::getline(cases, line);)
        if (!line.empty())
            failed += !runCase(dir, line), ++run;
    std::printf("%d case(s), %d failed\n", run, failed);
    return failed || run == 0 ? 1 : 0;
}
} // namespace

int main(int argc, char** argv)
{
    Finder finder;
    setLoggerFinder(&finder);
    if (argc == 3 && std::string(argv[1]) == "--enqueue")
        return runEnqueue(argv[2]);
    if (argc != 1)
    {
        std::fprintf(stderr, "usage: %s [--enqueue DIR]\n", argv[0]);
        return 2;
    }
    checkCreators();
    for (int64_t C : {1024, 1920})                  // d16, d30
        for (int64_t S : {2, 128})                  // sequences
            for (auto [L, K] : {std::pair<int64_t, int64_t>{169, 127}, {256, 192}}) // 13x13, 16x16 at token ratio 0.75
            {
                checkScatterShapes(finder, S, L, K, C);
                checkExpertShapes(finder, S * K, C, 16, 12);
            }
    checkExpertShapes(finder, 5, 64, 64, 64);
    checkSerialization();
    checkRejections(finder);
    std::printf("%d checks, %d failed\n", gChecks, gFailures);
    return gFailures ? 1 : 0;
}
