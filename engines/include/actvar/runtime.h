// actvar runtime: run an actvar-export bundle (10 step graphs + decoder) from C++.
//
//   actvar::Options opt;                        // ONNX Runtime on the CPU by default
//   auto rt = actvar::Runtime::open("bundle_dir", opt);   // checks manifest.json, sizes and sha256
//   std::vector<uint8_t> rgb = rt->generate({207, 360}, /*seed=*/0, /*cfg=*/1.5f, /*top_p=*/0.96f);
//   // rgb: 2 x 256 x 256 x 3, uint8, NHWC
//
// Errors (bad bundle, missing library, unsupported device) are thrown as actvar::Error with one line.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace actvar {

constexpr int kTotalTokens = 680;           // tokens over the 10 scales of one image
constexpr int kImageSize = 256;             // output images are kImageSize x kImageSize x 3

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The canonical uniform u of design §3.1 for (seed, image b of the request, token t): a float in [0, 1).
float uniform(uint64_t seed, uint64_t image, uint32_t token);
// u for images first_image .. first_image + n_images - 1, row-major n_images x kTotalTokens.
void noise(uint64_t seed, uint64_t first_image, int n_images, float* u_out);

enum class Backend { OnnxRuntime, TensorRT };
enum class Device { Cpu, Cuda };

struct Options {
    Backend backend = Backend::OnnxRuntime;
    Device device = Device::Cpu;
    int device_id = 0;
    std::string custom_op_library;   // ONNX Runtime: the project's custom-op library (plugin bundles on CUDA)
    std::string trt_plugin_library;  // TensorRT: the project's plugin library (plugin bundles)
    bool verify_digests = true;      // sha256 of every file against manifest.json before anything runs
    bool cuda_graphs = true;         // ONNX Runtime on CUDA: each graph as a CUDA graph where ONNX Runtime can capture it
};

struct BundleInfo {
    std::string path, precision, lowering;
    int batch = 0, depth = 0, top_k = 0;
};

class Runtime {
public:
    static std::unique_ptr<Runtime> open(const std::string& bundle_dir, const Options& options = {});
    virtual ~Runtime() = default;

    virtual const BundleInfo& info() const = 0;
    virtual std::string describe() const = 0;   // backend and device, e.g. "onnxruntime cpu"
    // ONNX Runtime on CUDA: one line saying which graphs run as CUDA graphs (and why others do not), e.g.
    // "CUDA graphs: 11/11 graphs (step_0, ..., decoder)"; empty elsewhere.
    virtual std::string graph_report() const = 0;

    // One batch of exactly info().batch images; image i uses u of request image first_image + i.
    // images_out: batch x 256 x 256 x 3 uint8; ids_out (optional): batch x kTotalTokens sampled ids.
    virtual void run_batch(const int64_t* labels, uint64_t seed, uint64_t first_image, float cfg, float top_p,
                           uint8_t* images_out, int64_t* ids_out = nullptr) = 0;

    // Any number of images: batches of info().batch (the last padded with its last class), image b of the
    // request gets u of image b whatever the batching. Returns classes.size() x 256 x 256 x 3 uint8.
    // ids_out (optional) receives classes.size() x kTotalTokens sampled ids.
    std::vector<uint8_t> generate(const std::vector<int64_t>& classes, uint64_t seed, float cfg, float top_p,
                                  std::vector<int64_t>* ids_out = nullptr);
};

// .npy files (descr: numpy's type string, e.g. "|u1" or "<i8") and a PNG grid of uint8 NHWC images (up to 4
// per row); both written to a temporary file beside the target and renamed.
void write_npy(const std::string& path, const std::string& descr, size_t item_bytes, const void* data,
               const std::vector<int64_t>& shape);
void write_png_grid(const std::string& path, const uint8_t* nhwc, int n, int h, int w);

}  // namespace actvar
