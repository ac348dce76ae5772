// CudaDevice over the CUDA runtime (linked statically: only the driver is needed at run time).
#include <cuda_runtime_api.h>

#include <vector>

#include "cuda_device.h"
#include "internal.h"

namespace actvar {

namespace {
void check(cudaError_t e, const std::string& what) {
    if (e != cudaSuccess) throw Error(what + " (CUDA: " + cudaGetErrorString(e) + ")");
}

class CudaRuntimeDevice final : public CudaDevice {
public:
    explicit CudaRuntimeDevice(int id) {
        check(cudaSetDevice(id), "--device cuda: no usable GPU " + std::to_string(id));
        check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "CUDA stream");
    }
    ~CudaRuntimeDevice() override {
        if (stream_) cudaStreamSynchronize(stream_);
        for (void* p : device_) cudaFree(p);
        for (void* p : host_) cudaFreeHost(p);
        if (stream_) cudaStreamDestroy(stream_);
    }
    void* stream() const override { return stream_; }
    void* device_alloc(size_t bytes, const std::string& what) override {
        void* p = nullptr;
        check(cudaMalloc(&p, bytes), "device memory for " + what + " (" + std::to_string(bytes) + " bytes)");
        device_.push_back(p);
        return p;
    }
    void* host_alloc(size_t bytes, const std::string& what) override {
        void* p = nullptr;
        check(cudaMallocHost(&p, bytes), "pinned memory for " + what);
        host_.push_back(p);
        return p;
    }
    void upload(void* dst, const void* src, size_t bytes) override {
        check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "copy to the GPU");
    }
    void download(void* dst, const void* src, size_t bytes) override {
        check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "copy from the GPU");
    }
    void synchronize(const std::string& what) override { check(cudaStreamSynchronize(stream_), what); }

private:
    cudaStream_t stream_ = nullptr;
    std::vector<void*> device_, host_;
};
}  // namespace

std::unique_ptr<CudaDevice> open_cuda_device(int device_id) { return std::make_unique<CudaRuntimeDevice>(device_id); }

}  // namespace actvar
