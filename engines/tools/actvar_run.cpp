// actvar-run: generate images from a bundle in C++.
//   actvar-run --bundle DIR --classes 1,2 --seed S [--cfg C --top-p P] [--backend onnxruntime|tensorrt]
//              [--device cpu|cuda] [--no-cuda-graphs] [--custom-op-library LIB] [--plugins LIB] --out grid.png
//              [--raw images.npy] [--ids ids.npy] [--iters N [--warmup W]]
// --ids writes the sampled ids (images x 680, int64). --iters N times N generations after W untimed ones (default
// 2: CUDA graphs are captured and lazy set-up done there) and prints one JSON line last: the median ms per
// generation of the whole request, in this process (no start-up or session creation). On CUDA a line on stderr
// says which graphs run as CUDA graphs.
// Bad input or a bad bundle: one "Error: ..." line on stderr, exit code 1.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "actvar/runtime.h"

namespace {
const char* kUsage =
    "usage: actvar-run --bundle DIR --classes 1,2 --seed S [--cfg 1.5] [--top-p 0.96] "
    "[--backend onnxruntime|tensorrt] [--device cpu|cuda] [--no-cuda-graphs] [--custom-op-library LIB] [--plugins LIB] "
    "--out grid.png [--raw images.npy] [--ids ids.npy] [--iters N [--warmup W]]";

uint64_t parse_u64(const std::string& s, const char* opt) {
    char* end = nullptr;
    errno = 0;
    const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
    if (s.empty() || s[0] == '-' || *end || errno) throw actvar::Error(std::string("invalid ") + opt + " '" + s + "': expected 0 .. 2^64-1");
    return v;
}

float parse_float(const std::string& s, const char* opt) {
    char* end = nullptr;
    const float v = std::strtof(s.c_str(), &end);
    if (s.empty() || *end) throw actvar::Error(std::string("invalid ") + opt + " '" + s + "': expected a number");
    return v;
}

int run(int argc, char** argv) {
    std::map<std::string, std::string> a = {{"--cfg", "1.5"}, {"--top-p", "0.96"}, {"--backend", "onnxruntime"},
                                            {"--device", "cpu"}};
    const char* known[] = {"--bundle", "--classes", "--seed", "--cfg", "--top-p", "--backend", "--device",
                           "--custom-op-library", "--plugins", "--out", "--raw", "--ids", "--iters", "--warmup"};
    bool cuda_graphs = true;
    for (int i = 1; i < argc; ++i) {
        const std::string k = argv[i];
        if (k == "-h" || k == "--help") { std::puts(kUsage); return 0; }
        if (k == "--no-cuda-graphs") { cuda_graphs = false; continue; }
        bool ok = false;
        for (const char* n : known) ok |= k == n;
        if (!ok) throw actvar::Error("unknown option '" + k + "' (" + kUsage + ")");
        if (i + 1 >= argc) throw actvar::Error(k + " needs a value");
        a[k] = argv[++i];
    }
    for (const char* req : {"--bundle", "--classes", "--seed", "--out"})
        if (!a.count(req)) throw actvar::Error(std::string("missing ") + req + " (" + kUsage + ")");
    std::vector<int64_t> classes;
    std::stringstream ss(a["--classes"]);
    for (std::string t; std::getline(ss, t, ',');) {
        const uint64_t c = parse_u64(t, "--classes");
        if (c >= 1000) throw actvar::Error("invalid --classes '" + a["--classes"] + "': ImageNet ids are 0..999");
        classes.push_back(int64_t(c));
    }
    if (classes.empty()) throw actvar::Error("--classes is empty");
    actvar::Options opt;
    const std::string& be = a["--backend"], &dev = a["--device"];
    if (be != "onnxruntime" && be != "tensorrt") throw actvar::Error("invalid --backend '" + be + "': onnxruntime or tensorrt");
    if (dev != "cpu" && dev != "cuda") throw actvar::Error("invalid --device '" + dev + "': cpu or cuda");
    opt.backend = be == "tensorrt" ? actvar::Backend::TensorRT : actvar::Backend::OnnxRuntime;
    opt.device = dev == "cuda" ? actvar::Device::Cuda : actvar::Device::Cpu;
    opt.custom_op_library = a["--custom-op-library"];
    opt.trt_plugin_library = a["--plugins"];
    opt.cuda_graphs = cuda_graphs;
    const uint64_t seed = parse_u64(a["--seed"], "--seed");
    const float cfg = parse_float(a["--cfg"], "--cfg"), top_p = parse_float(a["--top-p"], "--top-p");
    if (!(top_p >= 0.0f && top_p <= 1.0f)) throw actvar::Error("invalid --top-p: expected 0 .. 1");

    const uint64_t iters = a.count("--iters") ? parse_u64(a["--iters"], "--iters") : 0;
    const uint64_t warmup = a.count("--warmup") ? parse_u64(a["--warmup"], "--warmup") : 2;
    if (a.count("--warmup") && !iters) throw actvar::Error("--warmup needs --iters");

    auto rt = actvar::Runtime::open(a["--bundle"], opt);
    if (!rt->graph_report().empty()) std::fprintf(stderr, "%s\n", rt->graph_report().c_str());
    std::vector<double> times;
    std::vector<int64_t> ids;
    std::vector<uint8_t> images;
    for (uint64_t i = 0; i < (iters ? warmup + iters : 1); ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        images = rt->generate(classes, seed, cfg, top_p, &ids);
        if (i >= (iters ? warmup : 0))
            times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    const double s = times.size() % 2 ? times[times.size() / 2] : (times[times.size() / 2 - 1] + times[times.size() / 2]) / 2;
    const int n = int(classes.size()), S = actvar::kImageSize;
    actvar::write_png_grid(a["--out"], images.data(), n, S, S);
    if (a.count("--raw")) actvar::write_npy(a["--raw"], "|u1", 1, images.data(), {n, S, S, 3});
    if (a.count("--ids")) actvar::write_npy(a["--ids"], "<i8", 8, ids.data(), {n, actvar::kTotalTokens});
    std::printf("wrote %s: %d images, %s, %.3fs (%.2f images/s%s)\n", a["--out"].c_str(), n, rt->describe().c_str(), s,
                n / s, iters ? ", median of the timed runs" : "");
    if (iters)
        std::printf("%s\n", nlohmann::json{{"images", n}, {"batch", rt->info().batch}, {"warmup", warmup}, {"iters", iters},
                                           {"median_ms", s * 1e3}, {"images_per_s", n / s}, {"runtime", rt->describe()},
                                           {"cuda_graphs", rt->graph_report()}}.dump().c_str());
    return 0;
}
}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "Error: %s\n", e.what());
        return 1;
    }
}
