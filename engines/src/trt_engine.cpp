// TensorRT backend: the bundle's serialized engines (<graph>.engine, from `actvar-export engines`), libnvinfer
// opened at run time (the build needs only the headers), the plugin library for plugin bundles, enqueueV3 with
// every device buffer allocated once, and one CUDA graph per step captured on the first run.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstring>
#include <fstream>
#include <map>

#include "internal.h"

namespace actvar {

namespace {
void cuda_check(cudaError_t e, const std::string& what) {
    if (e != cudaSuccess) throw Error(what + " (CUDA: " + cudaGetErrorString(e) + ")");
}

class Logger final : public nvinfer1::ILogger {
public:
    std::string last_error;
    void log(Severity s, const char* msg) noexcept override {
        if (s <= Severity::kERROR) last_error = msg;
    }
};

size_t element_size(nvinfer1::DataType t) {
    switch (t) {
        case nvinfer1::DataType::kFLOAT: case nvinfer1::DataType::kINT32: return 4;
        case nvinfer1::DataType::kHALF: case nvinfer1::DataType::kBF16: return 2;
        case nvinfer1::DataType::kINT64: return 8;
        case nvinfer1::DataType::kBOOL: case nvinfer1::DataType::kUINT8: case nvinfer1::DataType::kINT8: return 1;
        default: throw Error("TensorRT engine: unsupported tensor type");
    }
}

struct Step {
    std::string name;
    nvinfer1::ICudaEngine* engine = nullptr;
    nvinfer1::IExecutionContext* ctx = nullptr;
    std::map<std::string, void*> buffers;   // this graph's outputs (device), allocated once
    cudaGraphExec_t graph = nullptr;
};

class TrtEngine final : public Engine {
public:
    TrtEngine(const Bundle& b, const Options& o) : bundle_(b), opt_(o) {
        if (o.device != Device::Cuda) throw Error("--backend tensorrt runs on the GPU only: use --device cuda");
        const char* libs[] = {"libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so"};
        for (const char* l : libs)
            if ((lib_ = dlopen(l, RTLD_NOW | RTLD_GLOBAL))) break;
        if (!lib_) throw Error("TensorRT is not installed here: cannot load libnvinfer.so (set LD_LIBRARY_PATH to a TensorRT install)");
        using Create = void* (*)(void*, int32_t);
        auto create = reinterpret_cast<Create>(dlsym(lib_, "createInferRuntime_INTERNAL"));
        if (!create) throw Error("libnvinfer has no createInferRuntime_INTERNAL: not a TensorRT runtime library");
        runtime_ = static_cast<nvinfer1::IRuntime*>(create(&logger_, NV_TENSORRT_VERSION));
        if (!runtime_) throw Error("TensorRT refused to create a runtime (" + logger_.last_error + ")");
        if (b.info.lowering == "plugin") {
            if (o.trt_plugin_library.empty()) throw Error("a plugin bundle needs the TensorRT plugin library (--plugins PATH)");
            if (!runtime_->getPluginRegistry().loadLibrary(o.trt_plugin_library.c_str()))
                throw Error(o.trt_plugin_library + ": TensorRT cannot load it as a plugin library (" + logger_.last_error + ")");
        }
        cuda_check(cudaSetDevice(o.device_id), "--device cuda: no usable GPU");
        cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "CUDA stream");
        const int B = b.info.batch;
        alloc("labels", size_t(B) * 8);
        alloc("cfg", 4);
        alloc("top_p", 4);
        alloc("u", size_t(B) * kTotalTokens * 4);
        cuda_check(cudaMallocHost(&host_, size_t(B) * (kTotalTokens * 8 + 3 * kImageSize * kImageSize * 4)), "pinned memory");
        for (int gi = 0; gi <= kNumScales; ++gi) steps_.push_back(load(gi < kNumScales ? "step_" + std::to_string(gi) : "decoder", gi));
    }

    ~TrtEngine() override {
        for (Step& s : steps_) {
            if (s.graph) cudaGraphExecDestroy(s.graph);
            delete s.ctx;
            delete s.engine;
            for (auto& [n, p] : s.buffers) cudaFree(p);
        }
        for (auto& [n, p] : inputs_) cudaFree(p);
        if (host_) cudaFreeHost(host_);
        if (stream_) cudaStreamDestroy(stream_);
        delete runtime_;
        // libnvinfer stays loaded: objects it created may run code at process exit
    }

    std::string describe() const override { return "tensorrt cuda"; }

    const float* run(const int64_t* labels, const float* u, float cfg, float top_p, int64_t* ids) override {
        const int B = bundle_.info.batch;
        up("labels", labels, size_t(B) * 8);
        up("cfg", &cfg, 4);
        up("top_p", &top_p, 4);
        up("u", u, size_t(B) * kTotalTokens * 4);
        auto* ids_h = static_cast<int64_t*>(host_);
        auto* img_h = reinterpret_cast<float*>(ids_h + size_t(B) * kTotalTokens);
        for (int gi = 0; gi <= kNumScales; ++gi) {
            Step& s = steps_[gi];
            if (s.graph) cuda_check(cudaGraphLaunch(s.graph, stream_), s.name + ": CUDA graph launch");
            else enqueue(s);
            if (gi < kNumScales) {
                const int l = kPatchNums[gi] * kPatchNums[gi], a = scale_begin(gi);
                cuda_check(cudaMemcpy2DAsync(ids_h + a, kTotalTokens * 8, s.buffers.at("idx"), l * 8, l * 8, B,
                                             cudaMemcpyDeviceToHost, stream_), "ids to host");
            }
        }
        cuda_check(cudaMemcpyAsync(img_h, steps_.back().buffers.at("image"), size_t(B) * 3 * kImageSize * kImageSize * 4,
                                   cudaMemcpyDeviceToHost, stream_), "image to host");
        cuda_check(cudaStreamSynchronize(stream_), "TensorRT run");
        if (ids) std::memcpy(ids, ids_h, size_t(B) * kTotalTokens * 8);
        if (!captured_) {   // after one eager run (TensorRT's lazy set-up done), one CUDA graph per step
            captured_ = true;
            for (Step& st : steps_) capture(st);
        }
        return img_h;
    }

private:
    void alloc(const std::string& n, size_t bytes) { cuda_check(cudaMalloc(&inputs_[n], bytes), "device memory for " + n); }
    void up(const std::string& n, const void* p, size_t bytes) {
        cuda_check(cudaMemcpyAsync(inputs_.at(n), p, bytes, cudaMemcpyHostToDevice, stream_), "input " + n);
    }

    Step load(const std::string& name, int gi) {
        Step s;
        s.name = name;
        const std::string path = bundle_.file(name + ".engine");
        std::ifstream f(path, std::ios::binary);
        if (!f) throw Error(path + ": no engine (build them with `actvar-export engines " + bundle_.info.path + "`)");
        const std::vector<char> blob((std::istreambuf_iterator<char>(f)), {});
        s.engine = runtime_->deserializeCudaEngine(blob.data(), blob.size());
        if (!s.engine) throw Error(path + ": TensorRT cannot deserialize it (" + logger_.last_error + ")");
        s.ctx = s.engine->createExecutionContext();
        if (!s.ctx) throw Error(path + ": no execution context (" + logger_.last_error + ")");
        const int B = bundle_.info.batch;
        for (int i = 0; i < s.engine->getNbIOTensors(); ++i) {
            const char* n = s.engine->getIOTensorName(i);
            const std::string t = n;
            void* p = nullptr;
            if (s.engine->getTensorIOMode(n) == nvinfer1::TensorIOMode::kOUTPUT) {
                const nvinfer1::Dims d = s.engine->getTensorShape(n);
                size_t count = 1;
                for (int k = 0; k < d.nbDims; ++k) count *= size_t(d.d[k]);
                cuda_check(cudaMalloc(&p, count * element_size(s.engine->getTensorDataType(n))), path + ": output " + t);
                s.buffers[t] = p;
            } else if (s.engine->getTensorDataType(n) != expected_type(t)) {
                throw Error(path + ": input " + t + " has another type than the bundle's graphs (rebuild the engines)");
            } else if (t == "u") {   // this scale's columns, copied in by the step
                cuda_check(cudaMalloc(&p, size_t(B) * kPatchNums[gi] * kPatchNums[gi] * 4), "u");
                s.buffers["u_in"] = p;
            } else if (inputs_.count(t)) {
                p = inputs_.at(t);
            } else if (gi > 0 && !carried_from(t).empty()) {
                p = steps_[gi - 1].buffers.at(carried_from(t));
            } else {
                throw Error(path + ": unexpected engine input " + t);
            }
            if (!s.ctx->setTensorAddress(n, p)) throw Error(path + ": cannot bind " + t + " (" + logger_.last_error + ")");
        }
        return s;
    }

    // One step: the u columns of this scale into the engine's input, then enqueueV3.
    void enqueue(Step& s) {
        if (s.buffers.count("u_in")) {
            const int gi = std::stoi(s.name.substr(5)), l = kPatchNums[gi] * kPatchNums[gi];
            cuda_check(cudaMemcpy2DAsync(s.buffers.at("u_in"), l * 4, static_cast<float*>(inputs_.at("u")) + scale_begin(gi),
                                         kTotalTokens * 4, l * 4, bundle_.info.batch, cudaMemcpyDeviceToDevice, stream_),
                       s.name + ": u");
        }
        if (!s.ctx->enqueueV3(stream_)) throw Error(s.name + ": enqueueV3 failed (" + logger_.last_error + ")");
    }

    // The step as a CUDA graph; where capture fails (e.g. a plugin that synchronises) the step stays eager.
    void capture(Step& s) {
        if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return;
        bool ok = true;
        try {
            enqueue(s);
        } catch (const Error&) {
            ok = false;
        }
        cudaGraph_t g = nullptr;
        ok = cudaStreamEndCapture(stream_, &g) == cudaSuccess && ok;
        if (ok && cudaGraphInstantiate(&s.graph, g, 0) != cudaSuccess) s.graph = nullptr;
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();   // a failed capture leaves no sticky error: the step runs eagerly
    }

    nvinfer1::DataType expected_type(const std::string& input) const {   // the step graphs' input types
        if (input == "labels") return nvinfer1::DataType::kINT64;
        if (!is_cache_input(input)) return nvinfer1::DataType::kFLOAT;
        const std::string& p = bundle_.info.precision;   // the KV cache is stored at the bundle's precision
        return p == "fp16" ? nvinfer1::DataType::kHALF : p == "bf16" ? nvinfer1::DataType::kBF16 : nvinfer1::DataType::kFLOAT;
    }

    const Bundle bundle_;
    Options opt_;
    Logger logger_;
    bool captured_ = false;
    void* lib_ = nullptr;
    nvinfer1::IRuntime* runtime_ = nullptr;
    cudaStream_t stream_ = nullptr;
    void* host_ = nullptr;                     // pinned: ids then the image
    std::map<std::string, void*> inputs_;      // labels, cfg, top_p, u (all 680 columns)
    std::vector<Step> steps_;
};
}  // namespace

std::unique_ptr<Engine> make_trt_engine(const Bundle& bundle, const Options& options) {
    return std::make_unique<TrtEngine>(bundle, options);
}

}  // namespace actvar
