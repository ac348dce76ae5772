// One CUDA device for the ONNX Runtime backend's CUDA path: a stream of its own, device and pinned host buffers
// (freed with the object), copies queued on the stream. A build without the CUDA toolkit has no device: opening
// one throws the one-line Error.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace actvar {

class CudaDevice {
public:
    virtual ~CudaDevice() = default;
    virtual void* stream() const = 0;                                   // a cudaStream_t
    virtual void* device_alloc(size_t bytes, const std::string& what) = 0;
    virtual void* host_alloc(size_t bytes, const std::string& what) = 0;   // page-locked
    virtual void upload(void* device_dst, const void* host_src, size_t bytes) = 0;     // queued on stream()
    virtual void download(void* host_dst, const void* device_src, size_t bytes) = 0;   // queued on stream()
    virtual void synchronize(const std::string& what) = 0;             // waits for stream(); throws on a CUDA error
};

std::unique_ptr<CudaDevice> open_cuda_device(int device_id);

}  // namespace actvar
