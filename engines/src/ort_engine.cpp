// ONNX Runtime backend through the C API: one session per graph, every weight once in memory (one mmap of
// weights.bin handed to all sessions as external initializers), every input and output buffer allocated once
// (outputs preallocated and passed to Run; on CUDA the carried tensors stay in device memory).
#include <cstring>
#include <unordered_map>

#include "ort_util.h"

namespace actvar {

const OrtApi& ort_api() {
    static const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
    if (!api)
        throw Error(std::string("ONNX Runtime ") + OrtGetApiBase()->GetVersionString() + " is older than API " +
                    std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1.29 needed)");
    return *api;
}

namespace {
struct Value {   // an owned OrtValue
    OrtValue* v = nullptr;
    Value() = default;
    Value(const Value&) = delete;
    Value& operator=(const Value&) = delete;
    ~Value() { if (v) ort_api().ReleaseValue(v); }
};

struct Graph {
    std::string name;
    OrtSession* session = nullptr;
    std::vector<std::string> in_names, out_names;
    std::vector<std::unique_ptr<Value>> outs;   // preallocated, one per output
    std::vector<const OrtValue*> ins;           // filled per run
    std::vector<const char*> in_c, out_c;
    std::vector<OrtValue*> out_v;
    OrtValue* out(const std::string& n) const {
        for (size_t i = 0; i < out_names.size(); ++i)
            if (out_names[i] == n) return outs[i]->v;
        throw Error(name + ": graph has no output " + n);
    }
};

class OrtEngine final : public Engine {
public:
    OrtEngine(const Bundle& b, const Options& o) : bundle_(b), opt_(o), api_(ort_api()) {
        ort_check(api_.CreateEnv(ORT_LOGGING_LEVEL_ERROR, "actvar", &env_), "ONNX Runtime: environment");
        ort_check(api_.CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &cpu_), "ONNX Runtime: memory info");
        ort_check(api_.GetAllocatorWithDefaultOptions(&cpu_alloc_), "ONNX Runtime: allocator");
        weights_ = std::make_unique<MappedFile>(b.file("weights.bin"));
        const bool plugin = b.info.lowering == "plugin";
        if (plugin && opt_.custom_op_library.empty()) {
            if (opt_.device == Device::Cuda)
                throw Error("a plugin bundle on CUDA needs the project's custom-op library (--custom-op-library PATH)");
            if (b.info.precision != "fp32")
                throw Error("the CPU implementation of the plugin ops is float32 only: this bundle is " + b.info.precision +
                            " (use --device cuda --custom-op-library PATH, or a portable bundle)");
            domain_ = cpu_custom_op_domain();
        }
        const int B = b.info.batch;
        labels_.resize(B);
        host_input("labels", labels_.data(), labels_.size() * 8, {B}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
        host_input("cfg", &cfg_, 4, {1}, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
        host_input("top_p", &top_p_, 4, {1}, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
        for (int si = 0; si < kNumScales; ++si) {
            const int l = kPatchNums[si] * kPatchNums[si];
            u_[si].resize(size_t(B) * l);
            host_input("u" + std::to_string(si), u_[si].data(), u_[si].size() * 4, {B, l}, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
        }
        for (int gi = 0; gi <= kNumScales; ++gi) graphs_.push_back(load(gi < kNumScales ? "step_" + std::to_string(gi) : "decoder"));
        wire();
    }

    ~OrtEngine() override {
        for (auto& g : graphs_) {
            g.outs.clear();
            if (g.session) api_.ReleaseSession(g.session);
        }
        host_.clear();
        shared_.clear();
        if (device_alloc_) api_.ReleaseAllocator(device_alloc_);
        if (so_) api_.ReleaseSessionOptions(so_);
        if (domain_) api_.ReleaseCustomOpDomain(domain_);
        if (device_info_) api_.ReleaseMemoryInfo(device_info_);
        if (cpu_) api_.ReleaseMemoryInfo(cpu_);
        if (env_) api_.ReleaseEnv(env_);
    }

    std::string describe() const override {
        return std::string("onnxruntime ") + OrtGetApiBase()->GetVersionString() +
               (opt_.device == Device::Cuda ? " cuda" : " cpu");
    }

    void run(const int64_t* labels, const float* u, float cfg, float top_p, float* image, int64_t* ids) override {
        const int B = bundle_.info.batch;
        std::copy(labels, labels + B, labels_.begin());
        cfg_ = cfg;
        top_p_ = top_p;
        for (int si = 0; si < kNumScales; ++si) {
            const int a = scale_begin(si), l = kPatchNums[si] * kPatchNums[si];
            for (int b = 0; b < B; ++b) std::memcpy(&u_[si][size_t(b) * l], u + size_t(b) * kTotalTokens + a, l * 4);
        }
        for (int gi = 0; gi <= kNumScales; ++gi) {
            Graph& g = graphs_[gi];
            ort_check(api_.Run(g.session, nullptr, g.in_c.data(), g.ins.data(), g.ins.size(), g.out_c.data(),
                               g.out_c.size(), g.out_v.data()),
                      bundle_.file(bundle_.graphs.at(g.name).file) + ": ONNX Runtime failed to run it");
            if (gi < kNumScales && ids) {
                const int a = scale_begin(gi), l = kPatchNums[gi] * kPatchNums[gi];
                const int64_t* idx = data<int64_t>(g.out("idx"));
                for (int b = 0; b < B; ++b) std::memcpy(ids + size_t(b) * kTotalTokens + a, idx + size_t(b) * l, l * 8);
            }
        }
        const float* img = data<float>(graphs_.back().out("image"));
        std::copy(img, img + size_t(B) * 3 * kImageSize * kImageSize, image);
    }

private:
    template <class T>
    T* data(OrtValue* v) {
        void* p = nullptr;
        ort_check(api_.GetTensorMutableData(v, &p), "ONNX Runtime: tensor data");
        return static_cast<T*>(p);
    }

    void host_input(const std::string& key, void* p, size_t bytes, std::vector<int64_t> shape, ONNXTensorElementDataType t) {
        auto v = std::make_unique<Value>();
        ort_check(api_.CreateTensorWithDataAsOrtValue(cpu_, p, bytes, shape.data(), shape.size(), t, &v->v),
                  "ONNX Runtime: input " + key);
        host_[key] = std::move(v);
    }

    OrtSessionOptions* options() {
        if (so_) return so_;
        ort_check(api_.CreateSessionOptions(&so_), "ONNX Runtime: session options");
        // one copy of each weight for all sessions: no per-session pre-packed duplicates (as the Python runtime)
        ort_check(api_.AddSessionConfigEntry(so_, "session.disable_prepacking", "1"), "ONNX Runtime: config");
        if (opt_.device == Device::Cuda) {
            OrtCUDAProviderOptionsV2* cuda = nullptr;
            ort_check(api_.CreateCUDAProviderOptions(&cuda), "ONNX Runtime: CUDA provider options");
            const std::string id = std::to_string(opt_.device_id);
            const char* keys[] = {"device_id"};
            const char* vals[] = {id.c_str()};
            OrtStatus* st = api_.UpdateCUDAProviderOptions(cuda, keys, vals, 1);
            if (!st) st = api_.SessionOptionsAppendExecutionProvider_CUDA_V2(so_, cuda);
            api_.ReleaseCUDAProviderOptions(cuda);
            ort_check(st, "--device cuda: this ONNX Runtime cannot use the CUDA execution provider "
                          "(a CPU-only build, or no GPU/driver)");
        }
        if (!opt_.custom_op_library.empty())
            ort_check(api_.RegisterCustomOpsLibrary_V2(so_, opt_.custom_op_library.c_str()),
                      opt_.custom_op_library + ": cannot register it as an ONNX Runtime custom-op library");
        else if (domain_)
            ort_check(api_.AddCustomOpDomain(so_, domain_), "ONNX Runtime: custom ops");
        return so_;
    }

    Graph load(const std::string& name) {
        Graph g;
        g.name = name;
        const std::string path = bundle_.file(bundle_.graphs.at(name).file);
        std::vector<const char*> names;
        std::vector<const OrtValue*> values;
        const std::vector<ExternalInitializer> inits = external_initializers(path);   // owns the names below
        for (const ExternalInitializer& t : inits) {
            if (t.location != "weights.bin")
                throw Error(path + ": initializer " + t.name + " is stored in '" + t.location + "', not weights.bin");
            if (t.offset > weights_->size() || t.length > weights_->size() - t.offset)
                throw Error(path + ": initializer " + t.name + " lies outside weights.bin");
            std::unique_ptr<Value>& v = shared_[t.name];
            if (!v) {
                v = std::make_unique<Value>();
                ort_check(api_.CreateTensorWithDataAsOrtValue(cpu_, const_cast<uint8_t*>(weights_->data() + t.offset),
                                                              t.length, t.dims.data(), t.dims.size(),
                                                              ONNXTensorElementDataType(t.data_type), &v->v),
                          path + ": initializer " + t.name);
            }
            names.push_back(t.name.c_str());
            values.push_back(v->v);
        }
        OrtSessionOptions* so = options();
        // external initializers are per session: a copy of the options carries this graph's list
        OrtSessionOptions* mine = nullptr;
        ort_check(api_.CloneSessionOptions(so, &mine), "ONNX Runtime: session options");
        OrtStatus* st = api_.AddExternalInitializers(mine, names.data(), values.data(), names.size());
        if (!st) st = api_.CreateSession(env_, path.c_str(), mine, &g.session);
        api_.ReleaseSessionOptions(mine);
        ort_check(st, path + ": ONNX Runtime cannot load it");
        if (opt_.device == Device::Cuda && !device_info_) {
            ort_check(api_.CreateMemoryInfo("Cuda", OrtDeviceAllocator, opt_.device_id, OrtMemTypeDefault, &device_info_),
                      "ONNX Runtime: CUDA memory info");
            ort_check(api_.CreateAllocator(g.session, device_info_, &device_alloc_), "ONNX Runtime: CUDA allocator");
        }
        size_t n_in = 0, n_out = 0;
        ort_check(api_.SessionGetInputCount(g.session, &n_in), path + ": inputs");
        ort_check(api_.SessionGetOutputCount(g.session, &n_out), path + ": outputs");
        for (size_t i = 0; i < n_in; ++i) g.in_names.push_back(take_name(api_.SessionGetInputName(g.session, i, cpu_alloc_, &tmp_)));
        for (size_t i = 0; i < n_out; ++i) {
            g.out_names.push_back(take_name(api_.SessionGetOutputName(g.session, i, cpu_alloc_, &tmp_)));
            OrtTypeInfo* ti = nullptr;
            ort_check(api_.SessionGetOutputTypeInfo(g.session, i, &ti), path + ": output type");
            const OrtTensorTypeAndShapeInfo* tsi = nullptr;
            ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
            size_t nd = 0;
            OrtStatus* st = api_.CastTypeInfoToTensorInfo(ti, &tsi);
            if (!st && !tsi) st = api_.CreateStatus(ORT_INVALID_GRAPH, "not a tensor");
            if (!st) st = api_.GetTensorElementType(tsi, &type);
            if (!st) st = api_.GetDimensionsCount(tsi, &nd);
            std::vector<int64_t> dims(nd);
            if (!st) st = api_.GetDimensions(tsi, dims.data(), nd);
            api_.ReleaseTypeInfo(ti);
            ort_check(st, path + ": output " + g.out_names.back());
            check_shape(path, name, g.out_names.back(), dims);
            // the sampled ids and the image come back to the host; everything else stays where the graphs run
            const bool host = !device_alloc_ || g.out_names.back() == "idx" || g.out_names.back() == "image";
            auto v = std::make_unique<Value>();
            ort_check(api_.CreateTensorAsOrtValue(host ? cpu_alloc_ : device_alloc_, dims.data(), nd, type, &v->v),
                      path + ": output buffer " + g.out_names.back());
            g.outs.push_back(std::move(v));
        }
        return g;
    }

    std::string take_name(OrtStatus* st) {
        ort_check(st, "ONNX Runtime: I/O name");
        std::string s = tmp_;
        ort_check(api_.AllocatorFree(cpu_alloc_, tmp_), "ONNX Runtime: free");
        return s;
    }

    void check_shape(const std::string& path, const std::string& graph, const std::string& out,
                     const std::vector<int64_t>& dims) {
        const auto& outs = bundle_.graphs.at(graph).outputs;
        auto it = outs.find(out);
        if (it == outs.end() || it->second.shape != dims)
            throw Error(bundle_.file("manifest.json") + ": graph " + graph + " output " + out +
                        " does not match " + path + " (wrong manifest for these graphs)");
    }

    // Inputs of each graph: host tensors (labels, u, cfg, top_p) or the previous graph's outputs.
    void wire() {
        for (int gi = 0; gi <= kNumScales; ++gi) {
            Graph& g = graphs_[gi];
            for (const std::string& n : g.in_names) {
                const OrtValue* v = nullptr;
                if (n == "u") v = host_.at("u" + std::to_string(gi))->v;
                else if (host_.count(n) && gi < kNumScales) v = host_.at(n)->v;
                else if (gi > 0 && n == "x_in") v = graphs_[gi - 1].out("x_next");
                else if (gi > 0 && n == "kv_in") v = graphs_[gi - 1].out("kv_out");
                else if (gi > 0 && (n == "f_hat_in" || n == "f_hat")) v = graphs_[gi - 1].out("f_hat_out");
                else throw Error(bundle_.file(bundle_.graphs.at(g.name).file) + ": unexpected graph input " + n);
                g.ins.push_back(v);
                g.in_c.push_back(n.c_str());
            }
            for (size_t i = 0; i < g.out_names.size(); ++i) {
                g.out_c.push_back(g.out_names[i].c_str());
                g.out_v.push_back(g.outs[i]->v);
            }
        }
    }

    const Bundle bundle_;
    Options opt_;
    const OrtApi& api_;
    OrtEnv* env_ = nullptr;
    OrtMemoryInfo* cpu_ = nullptr;
    OrtMemoryInfo* device_info_ = nullptr;
    OrtAllocator* cpu_alloc_ = nullptr;
    OrtAllocator* device_alloc_ = nullptr;
    OrtSessionOptions* so_ = nullptr;
    OrtCustomOpDomain* domain_ = nullptr;
    char* tmp_ = nullptr;
    std::unique_ptr<MappedFile> weights_;
    std::unordered_map<std::string, std::unique_ptr<Value>> shared_, host_;
    std::vector<int64_t> labels_;
    float cfg_ = 0, top_p_ = 0;
    std::vector<float> u_[kNumScales];
    std::vector<Graph> graphs_;
};
}  // namespace

std::unique_ptr<Engine> make_ort_engine(const Bundle& bundle, const Options& options) {
    return std::make_unique<OrtEngine>(bundle, options);
}

}  // namespace actvar
