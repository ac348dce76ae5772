// ONNX Runtime backend through the C API, what both devices share and the CPU path: on the CPU every weight is
// once in memory (one mmap of weights.bin handed to all sessions as external initializers) and every input and
// output buffer is allocated once (outputs preallocated and passed to Run).
#include "ort_engine.h"

#include <cstring>

namespace actvar {

const OrtApi& ort_api() {
    static const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
    if (!api)
        throw Error(std::string("ONNX Runtime ") + OrtGetApiBase()->GetVersionString() + " is older than API " +
                    std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1.29 needed)");
    return *api;
}

std::shared_ptr<OrtEnvironment> ort_environment() {
    static std::mutex m;
    static std::weak_ptr<OrtEnvironment> current;
    std::lock_guard<std::mutex> lock(m);
    std::shared_ptr<OrtEnvironment> e = current.lock();
    if (!e) {
        e = std::make_shared<OrtEnvironment>();
        ort_check(ort_api().CreateEnv(ORT_LOGGING_LEVEL_ERROR, "actvar", &e->env), "ONNX Runtime: environment");
        current = e;
    }
    return e;
}

OrtEngine::OrtEngine(const Bundle& b, const Options& o) : bundle_(b), opt_(o), api_(ort_api()), env_(ort_environment()) {
    try {
        ort_check(api_.CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &cpu_), "ONNX Runtime: memory info");
        ort_check(api_.GetAllocatorWithDefaultOptions(&cpu_alloc_), "ONNX Runtime: allocator");
        const bool plugin = b.info.lowering == "plugin";
        if (plugin && opt_.custom_op_library.empty()) {
            if (opt_.device == Device::Cuda)
                throw Error("a plugin bundle on CUDA needs the project's custom-op library (--custom-op-library PATH)");
            if (b.info.precision != "fp32")
                throw Error("the CPU implementation of the plugin ops is float32 only: this bundle is " + b.info.precision +
                            " (use --device cuda --custom-op-library PATH, or a portable bundle)");
            domain_ = cpu_custom_op_domain();
        }
        if (opt_.device == Device::Cuda) {
            open_cuda();
        } else {
            weights_ = std::make_unique<MappedFile>(b.file("weights.bin"));
            weights_base_ = weights_->data();
            weights_size_ = weights_->size();
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
        }
        graphs_.reserve(kNumScales + 1);
        for (int gi = 0; gi <= kNumScales; ++gi) load(gi < kNumScales ? "step_" + std::to_string(gi) : "decoder");
        if (cuda_) plan_cuda();
        else wire_cpu();
    } catch (...) {   // what was created so far, released as the destructor would
        release();
        throw;
    }
}

OrtEngine::~OrtEngine() { release(); }

void OrtEngine::release() {
    for (OrtGraph& g : graphs_) {
        if (g.binding) api_.ReleaseIoBinding(g.binding);
        g.bound_in.clear();
        g.bound_out.clear();
        g.outs.clear();
        if (g.session) api_.ReleaseSession(g.session);
    }
    host_.clear();
    shared_.clear();
    if (run_options_) api_.ReleaseRunOptions(run_options_);
    if (so_) api_.ReleaseSessionOptions(so_);
    if (so_graph_) api_.ReleaseSessionOptions(so_graph_);
    if (domain_) api_.ReleaseCustomOpDomain(domain_);
    if (device_info_) api_.ReleaseMemoryInfo(device_info_);
    if (cpu_) api_.ReleaseMemoryInfo(cpu_);
    graphs_.clear();
    run_options_ = nullptr, so_ = so_graph_ = nullptr, domain_ = nullptr, device_info_ = cpu_ = nullptr;
    cuda_.reset();   // the device memory the sessions used, after them
}

std::string OrtEngine::describe() const {
    return std::string("onnxruntime ") + OrtGetApiBase()->GetVersionString() + (cuda_ ? " cuda" : " cpu");
}

const float* OrtEngine::run(const int64_t* labels, const float* u, float cfg, float top_p, int64_t* ids) {
    return cuda_ ? run_cuda(labels, u, cfg, top_p, ids) : run_cpu(labels, u, cfg, top_p, ids);
}

const float* OrtEngine::run_cpu(const int64_t* labels, const float* u, float cfg, float top_p, int64_t* ids) {
    const int B = bundle_.info.batch;
    std::copy(labels, labels + B, labels_.begin());
    cfg_ = cfg;
    top_p_ = top_p;
    for (int si = 0; si < kNumScales; ++si) {
        const int a = scale_begin(si), l = kPatchNums[si] * kPatchNums[si];
        for (int b = 0; b < B; ++b) std::memcpy(&u_[si][size_t(b) * l], u + size_t(b) * kTotalTokens + a, l * 4);
    }
    for (int gi = 0; gi <= kNumScales; ++gi) {
        OrtGraph& g = graphs_[gi];
        ort_check(api_.Run(g.session, nullptr, g.in_c.data(), g.ins.data(), g.ins.size(), g.out_c.data(),
                           g.out_c.size(), g.out_v.data()),
                  g.path + ": ONNX Runtime failed to run it");
        if (gi < kNumScales && ids) {
            const int a = scale_begin(gi), l = kPatchNums[gi] * kPatchNums[gi];
            void* idx = nullptr;
            ort_check(api_.GetTensorMutableData(g.outs[g.out_index("idx")]->v, &idx), "ONNX Runtime: tensor data");
            for (int b = 0; b < B; ++b)
                std::memcpy(ids + size_t(b) * kTotalTokens + a, static_cast<int64_t*>(idx) + size_t(b) * l, l * 8);
        }
    }
    void* img = nullptr;
    ort_check(api_.GetTensorMutableData(graphs_.back().outs[graphs_.back().out_index("image")]->v, &img),
              "ONNX Runtime: tensor data");
    return static_cast<const float*>(img);
}

void OrtEngine::host_input(const std::string& key, void* p, size_t bytes, std::vector<int64_t> shape,
                           ONNXTensorElementDataType t) {
    auto v = std::make_unique<OwnedValue>();
    ort_check(api_.CreateTensorWithDataAsOrtValue(cpu_, p, bytes, shape.data(), shape.size(), t, &v->v),
              "ONNX Runtime: input " + key);
    host_[key] = std::move(v);
}

OrtSessionOptions* OrtEngine::base_options(bool cuda_graph) {
    OrtSessionOptions*& so = cuda_graph ? so_graph_ : so_;
    if (so) return so;
    ort_check(api_.CreateSessionOptions(&so), "ONNX Runtime: session options");
    // one copy of each weight for all sessions: no per-session pre-packed duplicates (as the Python runtime)
    ort_check(api_.AddSessionConfigEntry(so, "session.disable_prepacking", "1"), "ONNX Runtime: config");
    if (cuda_) append_cuda_provider(so, cuda_graph);
    if (!opt_.custom_op_library.empty())
        ort_check(api_.RegisterCustomOpsLibrary_V2(so, opt_.custom_op_library.c_str()),
                  opt_.custom_op_library + ": cannot register it as an ONNX Runtime custom-op library");
    else if (domain_)
        ort_check(api_.AddCustomOpDomain(so, domain_), "ONNX Runtime: custom ops");
    return so;
}

// A session of graph g with its initializers: external initializers over the host mapping on the CPU, shared
// initializers over the device copy on CUDA (the options are per session: a copy carries this graph's list).
OrtStatus* OrtEngine::create_session(OrtGraph& g, const std::vector<const char*>& names,
                                     const std::vector<const OrtValue*>& values, bool cuda_graph) {
    OrtSessionOptions* mine = nullptr;
    OrtStatus* st = api_.CloneSessionOptions(base_options(cuda_graph), &mine);
    if (st) return st;
    if (cuda_)
        for (size_t i = 0; i < names.size() && !st; ++i) st = api_.AddInitializer(mine, names[i], values[i]);
    else
        st = api_.AddExternalInitializers(mine, names.data(), values.data(), names.size());
    if (!st) st = api_.CreateSession(env_->env, g.path.c_str(), mine, &g.session);
    api_.ReleaseSessionOptions(mine);
    return st;
}

// Graph `name` appended to graphs_ (released with the engine, also when loading it fails half-way).
void OrtEngine::load(const std::string& name) {
    OrtGraph& g = graphs_.emplace_back();
    g.name = name;
    g.path = bundle_.file(bundle_.graphs.at(name).file);
    const std::string& path = g.path;
    std::vector<const char*> names;
    std::vector<const OrtValue*> values;
    const std::vector<ExternalInitializer> inits = external_initializers(path);   // owns the names below
    OrtMemoryInfo* where = cuda_ ? device_info_ : cpu_;
    for (const ExternalInitializer& t : inits) {
        if (t.location != "weights.bin")
            throw Error(path + ": initializer " + t.name + " is stored in '" + t.location + "', not weights.bin");
        if (t.offset > weights_size_ || t.length > weights_size_ - t.offset)
            throw Error(path + ": initializer " + t.name + " lies outside weights.bin");
        std::unique_ptr<OwnedValue>& v = shared_[t.name];
        if (!v) {
            v = std::make_unique<OwnedValue>();
            ort_check(api_.CreateTensorWithDataAsOrtValue(where, const_cast<uint8_t*>(weights_base_ + t.offset),
                                                          t.length, t.dims.data(), t.dims.size(),
                                                          ONNXTensorElementDataType(t.data_type), &v->v),
                      path + ": initializer " + t.name);
        }
        names.push_back(t.name.c_str());
        values.push_back(v->v);
    }
    const bool want_graph = cuda_ && opt_.cuda_graphs;
    OrtStatus* st = create_session(g, names, values, want_graph);
    if (st && want_graph) {   // e.g. nodes outside the CUDA provider: this graph runs without a CUDA graph
        g.no_graph_reason = ort_message(st);
        st = create_session(g, names, values, false);
    }
    g.cuda_graph = want_graph && g.no_graph_reason.empty();
    ort_check(st, path + ": ONNX Runtime cannot load it");
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
        st = api_.CastTypeInfoToTensorInfo(ti, &tsi);
        if (!st && !tsi) st = api_.CreateStatus(ORT_INVALID_GRAPH, "not a tensor");
        if (!st) st = api_.GetTensorElementType(tsi, &type);
        if (!st) st = api_.GetDimensionsCount(tsi, &nd);
        std::vector<int64_t> dims(nd);
        if (!st) st = api_.GetDimensions(tsi, dims.data(), nd);
        api_.ReleaseTypeInfo(ti);
        ort_check(st, path + ": output " + g.out_names.back());
        check_shape(path, name, g.out_names.back(), dims);
        g.out_types.push_back(type);
        g.out_dims.push_back(dims);
        if (!cuda_) {   // on CUDA the outputs are bound to device buffers by plan_cuda
            auto v = std::make_unique<OwnedValue>();
            ort_check(api_.CreateTensorAsOrtValue(cpu_alloc_, dims.data(), nd, type, &v->v),
                      path + ": output buffer " + g.out_names.back());
            g.outs.push_back(std::move(v));
        }
    }
}

std::string OrtEngine::take_name(OrtStatus* st) {
    ort_check(st, "ONNX Runtime: I/O name");
    std::string s = tmp_;
    ort_check(api_.AllocatorFree(cpu_alloc_, tmp_), "ONNX Runtime: free");
    return s;
}

void OrtEngine::check_shape(const std::string& path, const std::string& graph, const std::string& out,
                            const std::vector<int64_t>& dims) {
    const auto& outs = bundle_.graphs.at(graph).outputs;
    auto it = outs.find(out);
    if (it == outs.end() || it->second.shape != dims)
        throw Error(bundle_.file("manifest.json") + ": graph " + graph + " output " + out +
                    " does not match " + path + " (wrong manifest for these graphs)");
}

// Inputs of each graph: host tensors (labels, u, cfg, top_p) or the previous graph's outputs.
void OrtEngine::wire_cpu() {
    for (int gi = 0; gi <= kNumScales; ++gi) {
        OrtGraph& g = graphs_[gi];
        for (const std::string& n : g.in_names) {
            const OrtValue* v = nullptr;
            const std::string src = gi > 0 ? carried_from(n) : "";
            if (n == "u") v = host_.at("u" + std::to_string(gi))->v;
            else if (host_.count(n) && gi < kNumScales) v = host_.at(n)->v;
            else if (!src.empty()) v = graphs_[gi - 1].outs[graphs_[gi - 1].out_index(src)]->v;
            else throw Error(g.path + ": unexpected graph input " + n);
            g.ins.push_back(v);
            g.in_c.push_back(n.c_str());
        }
        for (size_t i = 0; i < g.out_names.size(); ++i) {
            g.out_c.push_back(g.out_names[i].c_str());
            g.out_v.push_back(g.outs[i]->v);
        }
    }
}

std::unique_ptr<Engine> make_ort_engine(const Bundle& bundle, const Options& options) {
    return std::make_unique<OrtEngine>(bundle, options);
}

}  // namespace actvar
