// Internals shared by the runtime's sources (not installed).
#pragma once

#include <array>
#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "actvar/runtime.h"

namespace actvar {

constexpr int kNumScales = 10;
constexpr std::array<int, kNumScales> kPatchNums{1, 2, 3, 4, 5, 6, 8, 10, 13, 16};
int scale_begin(int si);   // first token of scale si (0, 1, 5, 14, ...)

struct TensorSpec {
    std::string dtype;          // manifest spelling: float32, int64, ... ("P" = the bundle's precision)
    std::vector<int64_t> shape;
};
struct GraphSpec {
    std::string file;
    std::map<std::string, TensorSpec> inputs, outputs;
};

// The output of graph gi - 1 that feeds input `input` of graph gi > 0, or "" when the input is not carried: the
// manifest's `carried` map (x_in <- x_next, k_in.b <- k_out.b and v_in.b <- v_out.b per block, f_hat_in <- f_hat_out)
// and the decoder's f_hat <- f_hat_out.
inline std::string carried_from(const std::string& input) {
    if (input == "x_in") return "x_next";
    if (input == "f_hat_in" || input == "f_hat") return "f_hat_out";
    if (input.rfind("k_in.", 0) == 0 || input.rfind("v_in.", 0) == 0) return input.substr(0, 2) + "out" + input.substr(4);
    return "";
}
inline bool is_cache_input(const std::string& input) { return input.rfind("k_in.", 0) == 0 || input.rfind("v_in.", 0) == 0; }
inline bool is_carried_output(const std::string& out) {
    return out == "x_next" || out == "f_hat_out" || out.rfind("k_out.", 0) == 0 || out.rfind("v_out.", 0) == 0;
}

// A bundle checked against its manifest: every listed file present with its size (and sha256).
struct Bundle {
    BundleInfo info;
    std::map<std::string, GraphSpec> graphs;      // step_0 .. step_9, decoder
    static Bundle open(const std::string& dir, bool verify_digests);
    std::string file(const std::string& name) const { return info.path + "/" + name; }
};

// A read-only mapping of a whole file.
class MappedFile {
public:
    explicit MappedFile(const std::string& path);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
private:
    uint8_t* data_ = nullptr;
    size_t size_ = 0;
};

std::string sha256_file(const std::string& path);
std::vector<uint8_t> read_file(const std::string& path);

// One batch through the 10 steps and the decoder: u_B680 row-major batch x 680; ids_B680 optional. Returns the
// decoder's output image_B3HW (float, [0, 1] before clamping) in host memory of the engine, valid until the next run.
class Engine {
public:
    virtual ~Engine() = default;
    virtual std::string describe() const = 0;
    virtual std::string graph_report() const { return ""; }   // see Runtime::graph_report
    virtual const float* run(const int64_t* labels, const float* u_B680, float cfg, float top_p, int64_t* ids_B680) = 0;
};

std::unique_ptr<Engine> make_ort_engine(const Bundle& bundle, const Options& options);
std::unique_ptr<Engine> make_trt_engine(const Bundle& bundle, const Options& options);

// ONNX initializers stored in an external file: name, element type (TensorProto enum), dims, offset, length.
struct ExternalInitializer {
    std::string name, location;
    int data_type = 0;
    std::vector<int64_t> dims;
    uint64_t offset = 0, length = 0;
};
std::vector<ExternalInitializer> external_initializers(const std::string& onnx_path);

}  // namespace actvar
