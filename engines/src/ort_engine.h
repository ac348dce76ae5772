// The ONNX Runtime backend (not installed): one session per graph, every weight once in memory, every buffer
// allocated once. ort_engine.cpp holds what both devices share and the CPU path, ort_cuda.cpp the CUDA path.
#pragma once

#include <memory>
#include <mutex>
#include <set>
#include <unordered_map>

#include "cuda_device.h"
#include "ort_util.h"

namespace actvar {

struct OwnedValue {   // an owned OrtValue
    OrtValue* v = nullptr;
    OwnedValue() = default;
    OwnedValue(const OwnedValue&) = delete;
    OwnedValue& operator=(const OwnedValue&) = delete;
    ~OwnedValue() { if (v) ort_api().ReleaseValue(v); }
};

struct OrtGraph {
    std::string name, path;
    OrtSession* session = nullptr;
    bool cuda_graph = false;        // CUDA: the session runs as a CUDA graph
    std::string no_graph_reason;    // CUDA: why ONNX Runtime refused to capture this graph
    std::vector<std::string> in_names, out_names;
    std::vector<ONNXTensorElementDataType> out_types;
    std::vector<std::vector<int64_t>> out_dims;
    // CPU: preallocated host outputs, passed to Run with the inputs
    std::vector<std::unique_ptr<OwnedValue>> outs;
    std::vector<const OrtValue*> ins;
    std::vector<const char*> in_c, out_c;
    std::vector<OrtValue*> out_v;
    // CUDA: fixed device buffers bound once (views in in_names / out_names order)
    OrtIoBinding* binding = nullptr;
    std::vector<std::unique_ptr<OwnedValue>> bound_in, bound_out;
    size_t out_index(const std::string& n) const {
        for (size_t i = 0; i < out_names.size(); ++i)
            if (out_names[i] == n) return i;
        throw Error(path + ": graph has no output " + n);
    }
};

// ONNX Runtime keeps one environment per process: the engines share it, and with it the CUDA arena registered
// for each device.
struct OrtEnvironment {
    OrtEnv* env = nullptr;
    std::set<int> cuda_arenas;
    std::mutex mutex;
    ~OrtEnvironment() { if (env) ort_api().ReleaseEnv(env); }
};
std::shared_ptr<OrtEnvironment> ort_environment();

class OrtEngine final : public Engine {
public:
    OrtEngine(const Bundle& b, const Options& o);
    ~OrtEngine() override;
    std::string describe() const override;
    std::string graph_report() const override;
    const float* run(const int64_t* labels, const float* u, float cfg, float top_p, int64_t* ids) override;

private:
    void release();   // every ONNX Runtime object and the device memory, sessions first
    OrtSessionOptions* base_options(bool cuda_graph);
    OrtStatus* create_session(OrtGraph& g, const std::vector<const char*>& names,
                              const std::vector<const OrtValue*>& values, bool cuda_graph);
    void load(const std::string& name);
    std::string take_name(OrtStatus* st);
    void check_shape(const std::string& path, const std::string& graph, const std::string& out,
                     const std::vector<int64_t>& dims);
    // CPU path (ort_engine.cpp)
    void host_input(const std::string& key, void* p, size_t bytes, std::vector<int64_t> shape, ONNXTensorElementDataType t);
    void wire_cpu();
    const float* run_cpu(const int64_t* labels, const float* u, float cfg, float top_p, int64_t* ids);
    // CUDA path (ort_cuda.cpp)
    void open_cuda();
    void append_cuda_provider(OrtSessionOptions* so, bool cuda_graph);
    void plan_cuda();
    std::unique_ptr<OwnedValue> device_view(const OrtGraph& g, const std::string& name, void* p,
                                            ONNXTensorElementDataType t, const std::vector<int64_t>& dims);
    const float* run_cuda(const int64_t* labels, const float* u, float cfg, float top_p, int64_t* ids);

    const Bundle bundle_;
    Options opt_;
    const OrtApi& api_;
    std::shared_ptr<OrtEnvironment> env_;
    OrtMemoryInfo* cpu_ = nullptr;
    OrtAllocator* cpu_alloc_ = nullptr;
    OrtSessionOptions* so_ = nullptr;
    OrtSessionOptions* so_graph_ = nullptr;   // CUDA: the same with enable_cuda_graph
    OrtCustomOpDomain* domain_ = nullptr;
    char* tmp_ = nullptr;
    std::unordered_map<std::string, std::unique_ptr<OwnedValue>> shared_;   // initializers, one per name
    std::vector<OrtGraph> graphs_;
    // CPU: weights.bin mapped once; host inputs
    std::unique_ptr<MappedFile> weights_;
    std::unordered_map<std::string, std::unique_ptr<OwnedValue>> host_;
    std::vector<int64_t> labels_;
    float cfg_ = 0, top_p_ = 0;
    std::vector<float> u_[kNumScales];
    // CUDA: the device (stream, memory), weights.bin on it, the bound buffers
    std::unique_ptr<CudaDevice> cuda_;
    OrtMemoryInfo* device_info_ = nullptr;
    OrtRunOptions* run_options_ = nullptr;
    const uint8_t* weights_base_ = nullptr;   // weights.bin's first byte (host mapping or device copy)
    size_t weights_size_ = 0;
    void *labels_d_ = nullptr, *u_d_ = nullptr, *cfg_d_ = nullptr, *top_p_d_ = nullptr, *ids_d_ = nullptr;
    void *in_h_ = nullptr, *out_h_ = nullptr;             // pinned staging of the inputs and of ids + image
    std::unordered_map<std::string, void*> pool_;         // the graphs' output buffers
};

}  // namespace actvar
