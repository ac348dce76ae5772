// ONNX Runtime backend, the CUDA path (the Python runtime's buffer plan, actvar_export/runtime/ort_runtime.py):
// - weights.bin copied once to device memory; every initializer of every session is a view of it handed over
//   with AddInitializer (no copy); session.disable_prepacking keeps ONNX Runtime from repacking them;
// - one arena for the intermediates of all sessions, registered with the environment (session.use_env_allocators);
// - fixed-address device buffers for every input and output, bound once with an IoBinding: a carried tensor
//   (x, KV cache, f_hat) alternates between two buffers, the ids of every step are slices of one buffer, the
//   inputs of a batch (labels, u, cfg, top_p) are copied in once per batch;
// - every session runs on the runtime's stream (user_compute_stream), as a CUDA graph where ONNX Runtime can
//   capture it (enable_cuda_graph; ONNX Runtime refuses at session creation when nodes fall outside the CUDA
//   provider: that graph then runs without one); only the ids and the image are copied back, with one sync;
// - ACTVAR_ORT_CUDA_OPTIONS="key=value,..." adds CUDA provider options, as in the Python runtime.
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ort_engine.h"

namespace actvar {

namespace {
size_t element_size(ONNXTensorElementDataType t) {
    switch (t) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return 4;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return 2;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return 8;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return 1;
        default: throw Error("ONNX Runtime: unsupported tensor element type " + std::to_string(int(t)));
    }
}

size_t numel(const std::vector<int64_t>& dims) {
    size_t n = 1;
    for (int64_t d : dims) n *= size_t(d);
    return n;
}

}  // namespace

void OrtEngine::open_cuda() {
    cuda_ = open_cuda_device(opt_.device_id);   // first: a build without CUDA says so
    char** providers = nullptr;
    int n = 0;
    ort_check(api_.GetAvailableProviders(&providers, &n), "ONNX Runtime: providers");
    bool has_cuda = false;
    for (int i = 0; i < n; ++i) has_cuda |= std::strcmp(providers[i], "CUDAExecutionProvider") == 0;
    ort_check(api_.ReleaseAvailableProviders(providers, n), "ONNX Runtime: providers");
    if (!has_cuda)
        throw Error(std::string("--device cuda: this ONNX Runtime (") + OrtGetApiBase()->GetVersionString() +
                    ") has no CUDA execution provider (a CPU-only build: link onnxruntime-gpu's library)");
    ort_check(api_.CreateMemoryInfo("Cuda", OrtDeviceAllocator, opt_.device_id, OrtMemTypeDefault, &device_info_),
              "ONNX Runtime: CUDA memory info");
    {   // weights.bin, once, on the device
        const MappedFile w(bundle_.file("weights.bin"));
        void* d = cuda_->device_alloc(w.size(), "weights.bin");
        cuda_->upload(d, w.data(), w.size());
        cuda_->synchronize(bundle_.file("weights.bin") + ": copy to the GPU");
        weights_base_ = static_cast<const uint8_t*>(d);
        weights_size_ = w.size();
    }
    {   // one arena for all sessions of this process on this device (grows by what a step asks, no doubling)
        std::lock_guard<std::mutex> lock(env_->mutex);
        if (!env_->cuda_arenas.count(opt_.device_id)) {
            OrtMemoryInfo* arena_info = nullptr;
            OrtArenaCfg* cfg = nullptr;
            const char* cfg_keys[] = {"arena_extend_strategy"};
            const size_t cfg_vals[] = {1};   // kSameAsRequested
            const std::string id = std::to_string(opt_.device_id);
            const char* keys[] = {"device_id"};
            const char* vals[] = {id.c_str()};
            OrtStatus* st = api_.CreateMemoryInfo("Cuda", OrtArenaAllocator, opt_.device_id, OrtMemTypeDefault, &arena_info);
            if (!st) st = api_.CreateArenaCfgV2(cfg_keys, cfg_vals, 1, &cfg);
            if (!st) st = api_.CreateAndRegisterAllocatorV2(env_->env, "CUDAExecutionProvider", arena_info, cfg, keys, vals, 1);
            if (cfg) api_.ReleaseArenaCfg(cfg);
            if (arena_info) api_.ReleaseMemoryInfo(arena_info);
            ort_check(st, "--device cuda: ONNX Runtime cannot create the CUDA arena");
            env_->cuda_arenas.insert(opt_.device_id);
        }
    }
    ort_check(api_.CreateRunOptions(&run_options_), "ONNX Runtime: run options");
    // no host sync at the end of each step: the stream orders the steps, one sync after the last copy back
    ort_check(api_.AddRunConfigEntry(run_options_, "disable_synchronize_execution_providers", "1"),
              "ONNX Runtime: run options");
}

namespace {
// ACTVAR_ORT_CUDA_OPTIONS: "key=value,key=value" (the Python runtime's extra_cuda_options)
std::vector<std::pair<std::string, std::string>> extra_cuda_options() {
    static const char* env = "ACTVAR_ORT_CUDA_OPTIONS";
    static const char* own[] = {"device_id", "user_compute_stream", "has_user_compute_stream", "enable_cuda_graph",
                                "use_tf32"};
    std::vector<std::pair<std::string, std::string>> out;
    const char* text = std::getenv(env);
    std::string all = text ? text : "";
    auto trim = [](std::string t) {
        const auto a = t.find_first_not_of(" \t"), b = t.find_last_not_of(" \t");
        return a == std::string::npos ? std::string() : t.substr(a, b - a + 1);
    };
    size_t pos = 0;
    while (pos <= all.size()) {
        size_t end = all.find(',', pos);
        if (end == std::string::npos) end = all.size();
        const std::string item = trim(all.substr(pos, end - pos));
        pos = end + 1;
        if (item.empty()) continue;
        const size_t eq = item.find('=');
        const std::string key = eq == std::string::npos ? "" : trim(item.substr(0, eq));
        const std::string value = eq == std::string::npos ? "" : trim(item.substr(eq + 1));
        if (key.empty() || value.empty()) throw Error(std::string(env) + ": '" + item + "' is not key=value");
        for (const char* k : own)
            if (key == k) throw Error(std::string(env) + ": " + key + " is set by the runtime itself");
        out.emplace_back(key, value);
    }
    return out;
}
}  // namespace

void OrtEngine::append_cuda_provider(OrtSessionOptions* so, bool cuda_graph) {
    const auto extra = extra_cuda_options();     // (a malformed variable fails before anything is created)
    ort_check(api_.AddSessionConfigEntry(so, "session.use_env_allocators", "1"), "ONNX Runtime: config");
    // every node runs on the GPU: no CPU thread pool per session, no worker threads spinning after each run
    // (they would take the CPU from whatever runs between generations: a server's requests and responses)
    ort_check(api_.SetIntraOpNumThreads(so, 1), "ONNX Runtime: threads");
    ort_check(api_.SetInterOpNumThreads(so, 1), "ONNX Runtime: threads");
    ort_check(api_.AddSessionConfigEntry(so, "session.intra_op.allow_spinning", "0"), "ONNX Runtime: config");
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    ort_check(api_.CreateCUDAProviderOptions(&cuda), "ONNX Runtime: CUDA provider options");
    const std::string id = std::to_string(opt_.device_id);
    // TF32 off for float32 bundles, as the Python runtime
    std::vector<const char*> keys = {"device_id", "use_tf32", "enable_cuda_graph"};
    std::vector<const char*> vals = {id.c_str(), bundle_.info.precision == "fp32" ? "0" : "1", cuda_graph ? "1" : "0"};
    for (const auto& kv : extra) {
        keys.push_back(kv.first.c_str());
        vals.push_back(kv.second.c_str());
    }
    OrtStatus* st = api_.UpdateCUDAProviderOptions(cuda, keys.data(), vals.data(), keys.size());
    // after UpdateCUDAProviderOptions, which resets has_user_compute_stream; this sets it with the stream
    if (!st) st = api_.UpdateCUDAProviderOptionsWithValue(cuda, "user_compute_stream", cuda_->stream());
    if (!st) st = api_.SessionOptionsAppendExecutionProvider_CUDA_V2(so, cuda);
    api_.ReleaseCUDAProviderOptions(cuda);
    ort_check(st, "--device cuda: this ONNX Runtime cannot use the CUDA execution provider");
}

std::unique_ptr<OwnedValue> OrtEngine::device_view(const OrtGraph& g, const std::string& name, void* p,
                                                   ONNXTensorElementDataType t, const std::vector<int64_t>& dims) {
    auto v = std::make_unique<OwnedValue>();
    ort_check(api_.CreateTensorWithDataAsOrtValue(device_info_, p, numel(dims) * element_size(t), dims.data(),
                                                  dims.size(), t, &v->v),
              g.path + ": device buffer of " + name);
    return v;
}

void OrtEngine::plan_cuda() {
    const int B = bundle_.info.batch;
    const size_t per_u = size_t(B) * kTotalTokens;
    labels_d_ = cuda_->device_alloc(size_t(B) * 8, "labels");
    u_d_ = cuda_->device_alloc(per_u * 4, "u");
    cfg_d_ = cuda_->device_alloc(4, "cfg");
    top_p_d_ = cuda_->device_alloc(4, "top_p");
    ids_d_ = cuda_->device_alloc(per_u * 8, "ids");
    in_h_ = cuda_->host_alloc(size_t(B) * 8 + per_u * 4 + 8, "inputs");
    out_h_ = cuda_->host_alloc(per_u * 8 + size_t(B) * 3 * kImageSize * kImageSize * 4, "ids and image");
    // a carried output of graph gi lives in buffer gi % 2 (graph gi + 1 reads it while writing the other one);
    // an output nothing reads on the device (logits, the image, ...) has one buffer; each sized for its largest use
    auto key = [](const std::string& out, int gi) { return is_carried_output(out) ? out + "#" + std::to_string(gi % 2) : out; };
    std::unordered_map<std::string, size_t> need;
    for (int gi = 0; gi <= kNumScales; ++gi) {
        const OrtGraph& g = graphs_[gi];
        for (size_t i = 0; i < g.out_names.size(); ++i) {
            if (g.out_names[i] == "idx") continue;
            size_t& n = need[key(g.out_names[i], gi)];
            n = std::max(n, numel(g.out_dims[i]) * element_size(g.out_types[i]));
        }
    }
    for (const auto& [k, n] : need) pool_[k] = cuda_->device_alloc(n, k);
    if (!pool_.count("image")) throw Error(graphs_.back().path + ": the decoder has no output 'image'");

    for (int gi = 0; gi <= kNumScales; ++gi) {
        OrtGraph& g = graphs_[gi];
        const bool step = gi < kNumScales;
        const int64_t l = step ? kPatchNums[gi] * kPatchNums[gi] : 0;
        const size_t a = step ? size_t(B) * scale_begin(gi) : 0;   // this scale's slice of u and of the ids
        ort_check(api_.CreateIoBinding(g.session, &g.binding), g.path + ": IoBinding");
        for (const std::string& n : g.in_names) {
            const std::string src = gi > 0 ? carried_from(n) : "";
            std::unique_ptr<OwnedValue> v;
            if (step && n == "u") v = device_view(g, n, static_cast<float*>(u_d_) + a, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {B, l});
            else if (step && n == "labels") v = device_view(g, n, labels_d_, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {B});
            else if (step && n == "cfg") v = device_view(g, n, cfg_d_, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {1});
            else if (step && n == "top_p") v = device_view(g, n, top_p_d_, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {1});
            else if (!src.empty()) {
                const OrtGraph& prev = graphs_[gi - 1];
                const size_t i = prev.out_index(src);
                v = device_view(g, n, pool_.at(key(src, gi - 1)), prev.out_types[i], prev.out_dims[i]);
            } else {
                throw Error(g.path + ": unexpected graph input " + n);
            }
            ort_check(api_.BindInput(g.binding, n.c_str(), v->v), g.path + ": binding input " + n);
            g.bound_in.push_back(std::move(v));
        }
        for (size_t i = 0; i < g.out_names.size(); ++i) {
            const std::string& n = g.out_names[i];
            void* p = nullptr;
            if (n == "idx") {
                if (!step || numel(g.out_dims[i]) != size_t(B * l))
                    throw Error(g.path + ": output idx is not batch x " + std::to_string(l));
                p = static_cast<int64_t*>(ids_d_) + a;
            } else {
                p = pool_.at(key(n, gi));
            }
            auto v = device_view(g, n, p, g.out_types[i], g.out_dims[i]);
            ort_check(api_.BindOutput(g.binding, n.c_str(), v->v), g.path + ": binding output " + n);
            g.bound_out.push_back(std::move(v));
        }
    }
}

const float* OrtEngine::run_cuda(const int64_t* labels, const float* u, float cfg, float top_p, int64_t* ids) {
    const int B = bundle_.info.batch;
    const size_t per_u = size_t(B) * kTotalTokens, image_n = size_t(B) * 3 * kImageSize * kImageSize;
    // this batch's inputs, staged in pinned memory; u in the bound layout: scale by scale, each B x l row-major
    auto* labels_h = static_cast<int64_t*>(in_h_);
    auto* u_h = reinterpret_cast<float*>(labels_h + B);
    float* scalars_h = u_h + per_u;
    std::copy(labels, labels + B, labels_h);
    for (int si = 0; si < kNumScales; ++si) {
        const int a = scale_begin(si), l = kPatchNums[si] * kPatchNums[si];
        for (int b = 0; b < B; ++b)
            std::memcpy(u_h + size_t(B) * a + size_t(b) * l, u + size_t(b) * kTotalTokens + a, size_t(l) * 4);
    }
    scalars_h[0] = cfg;
    scalars_h[1] = top_p;
    cuda_->upload(labels_d_, labels_h, size_t(B) * 8);
    cuda_->upload(u_d_, u_h, per_u * 4);
    cuda_->upload(cfg_d_, scalars_h, 4);
    cuda_->upload(top_p_d_, scalars_h + 1, 4);
    for (OrtGraph& g : graphs_) {
        if (!g.cuda_graph) {
            // ONNX Runtime copies a bound input to the device its nodes need when it is bound: a graph that may
            // have nodes outside the GPU binds its inputs again, once the stream has written them
            cuda_->synchronize(g.path + ": inputs");
            for (size_t i = 0; i < g.in_names.size(); ++i)
                ort_check(api_.BindInput(g.binding, g.in_names[i].c_str(), g.bound_in[i]->v),
                          g.path + ": binding input " + g.in_names[i]);
        }
        ort_check(api_.RunWithBinding(g.session, run_options_, g.binding), g.path + ": ONNX Runtime failed to run it");
    }
    auto* ids_h = static_cast<int64_t*>(out_h_);
    auto* image_h = reinterpret_cast<float*>(ids_h + per_u);
    if (ids) cuda_->download(ids_h, ids_d_, per_u * 8);
    cuda_->download(image_h, pool_.at("image"), image_n * 4);
    cuda_->synchronize(bundle_.info.path + ": ONNX Runtime CUDA run");
    if (ids)
        for (int si = 0; si < kNumScales; ++si) {
            const int a = scale_begin(si), l = kPatchNums[si] * kPatchNums[si];
            for (int b = 0; b < B; ++b)
                std::memcpy(ids + size_t(b) * kTotalTokens + a, ids_h + size_t(B) * a + size_t(b) * l, size_t(l) * 8);
        }
    return image_h;
}

std::string OrtEngine::graph_report() const {
    if (!cuda_) return "";
    if (!opt_.cuda_graphs) return "CUDA graphs: off (--no-cuda-graphs)";
    std::string done, other;
    int n = 0;
    for (const OrtGraph& g : graphs_) {
        if (g.cuda_graph) done += std::string(n++ ? ", " : "") + g.name;
        else other += "; " + g.name + ": no CUDA graph (" + g.no_graph_reason + ")";
    }
    return "CUDA graphs: " + std::to_string(n) + "/" + std::to_string(graphs_.size()) + " graphs (" +
           (n ? done : "none") + ")" + other;
}

}  // namespace actvar
