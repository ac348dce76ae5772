// The canonical noise (design §3.1) and the Runtime: a checked bundle plus one Engine (backend).
#include <algorithm>

#include "internal.h"

namespace actvar {

float uniform(uint64_t seed, uint64_t image, uint32_t token) {
    // all arithmetic modulo 2^64 (unsigned overflow), exactly as ACTVAR_INFERENCE.md §3.1
    const uint64_t c = image * uint64_t(kTotalTokens) + token + 1;
    uint64_t z = (seed * 0xD1B54A32D192ED03ull) ^ (c * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return float(z >> 40) * 0x1p-24f;   // < 2^24: exact in float32
}

void noise(uint64_t seed, uint64_t first_image, int n_images, float* u_out) {
    for (int b = 0; b < n_images; ++b)
        for (int t = 0; t < kTotalTokens; ++t) u_out[size_t(b) * kTotalTokens + t] = uniform(seed, first_image + b, t);
}

namespace {
class RuntimeImpl final : public Runtime {
public:
    RuntimeImpl(Bundle bundle, std::unique_ptr<Engine> engine)
        : bundle_(std::move(bundle)), engine_(std::move(engine)), u_(size_t(bundle_.info.batch) * kTotalTokens) {}

    const BundleInfo& info() const override { return bundle_.info; }
    std::string describe() const override { return engine_->describe(); }
    std::string graph_report() const override { return engine_->graph_report(); }

    void run_batch(const int64_t* labels, uint64_t seed, uint64_t first_image, float cfg, float top_p,
                   uint8_t* images_out, int64_t* ids_out) override {
        const int B = bundle_.info.batch, HW = kImageSize * kImageSize;
        for (int b = 0; b < B; ++b)
            if (labels[b] < 0 || labels[b] >= 1000)
                throw Error("class " + std::to_string(labels[b]) + " is not an ImageNet id (0..999)");
        noise(seed, first_image, B, u_.data());
        const float* image = engine_->run(labels, u_.data(), cfg, top_p, ids_out);
        // NCHW float -> NHWC uint8 as actvar_export.images.to_uint8: clamp to [0, 1], x 255 in float32, round half
        // to even like torch.round (adding and subtracting 1.5 * 2^23 rounds a float below 2^22 to an integer in the
        // default rounding mode, as std::nearbyint, in a loop the compiler vectorises)
        auto to_u8 = [](float v) {
            const float x = std::min(std::max(v, 0.0f), 1.0f) * 255.0f;
            return uint8_t((x + 0x1.8p23f) - 0x1.8p23f);
        };
        for (int b = 0; b < B; ++b) {
            const float* r = image + size_t(b) * 3 * HW;
            uint8_t* o = images_out + size_t(b) * 3 * HW;
            for (int i = 0; i < HW; ++i) {
                o[3 * i] = to_u8(r[i]);
                o[3 * i + 1] = to_u8(r[HW + i]);
                o[3 * i + 2] = to_u8(r[2 * HW + i]);
            }
        }
    }

private:
    Bundle bundle_;
    std::unique_ptr<Engine> engine_;
    std::vector<float> u_;   // allocated once
};
}  // namespace

std::unique_ptr<Runtime> Runtime::open(const std::string& bundle_dir, const Options& options) {
    Bundle b = Bundle::open(bundle_dir, options.verify_digests);
    std::unique_ptr<Engine> e = options.backend == Backend::TensorRT ? make_trt_engine(b, options)
                                                                     : make_ort_engine(b, options);
    return std::make_unique<RuntimeImpl>(std::move(b), std::move(e));
}

std::vector<uint8_t> Runtime::generate(const std::vector<int64_t>& classes, uint64_t seed, float cfg, float top_p,
                                       std::vector<int64_t>* ids_out) {
    const int B = info().batch;
    const size_t per = size_t(kImageSize) * kImageSize * 3;
    std::vector<uint8_t> out(classes.size() * per), chunk(size_t(B) * per);
    std::vector<int64_t> labels(B), ids(size_t(B) * kTotalTokens);
    if (ids_out) ids_out->resize(classes.size() * kTotalTokens);
    for (size_t first = 0; first < classes.size(); first += B) {
        const size_t n = std::min(classes.size() - first, size_t(B));
        for (int b = 0; b < B; ++b) labels[b] = classes[first + std::min(size_t(b), n - 1)];   // pad with the last
        run_batch(labels.data(), seed, first, cfg, top_p, chunk.data(), ids_out ? ids.data() : nullptr);
        std::copy(chunk.begin(), chunk.begin() + n * per, out.begin() + first * per);
        if (ids_out) std::copy(ids.begin(), ids.begin() + n * kTotalTokens, ids_out->begin() + first * kTotalTokens);
    }
    return out;
}

}  // namespace actvar
