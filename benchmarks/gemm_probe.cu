// Probe of the expert-FFN GEMMs in isolation (Hopper): times the launchers of plugins/expert_routing directly,
// so that one GEMM variant can be measured without the rest of the FFN. Not part of the library or the tests.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DACTVAR_HAVE_SM90A --expt-relaxed-constexpr \
//        -Iplugins/common -Iplugins/expert_routing benchmarks/gemm_probe.cu \
//        plugins/expert_routing/gemm_sm90.cu plugins/expert_routing/gemm_sm90_ws.cu -o /tmp/gemm_probe
//   ACTVAR_FC1_CFG=4 /tmp/gemm_probe C T [experts top_k]
// With -DACTVAR_WS_TRACE (the library sources compiled with it too) each line of the warp-specialised kernel is
// followed by its per-tile cycle breakdown (main loop, waits for full stages, epilogue) from the last launch.
//
// Prints one line per GEMM: fc1 over gathered rows (routed; also with the zeros of the unchosen slices written by its
// producer), fc1 over the same row counts but contiguous rows,
// both with GELU and without, and the dense fc2; time (CUDA events, median of 9 batches of 10) and TFLOP/s.
// Compiled with -DACTVAR_HAVE_CUBLASLT (plus plugins/expert_routing/dense_lt.cu, -ldl, the cuBLASLt header on the
// include path and libcublasLt.so.13 on the loader path at run time) it adds cuBLASLt's GEMMs of the same useful FLOPs.
// PROBE_SECONDS=s: sustained mode for the power-capped regime (time then follows energy): every line runs for
// s seconds after 1 s of warm-up, the list is measured forwards and then backwards (drift shows as a difference
// between the two passes), and each line adds the mean SM clock and board power (NVML, opened at run time) and the
// energy per useful FLOP relative to the first line.
#include "gemm_common.cuh"
#if defined(ACTVAR_HAVE_CUBLASLT)
#include "actvar_plugins.h"
#include "dense_lt.h"
#endif

#include <dlfcn.h>
#include <chrono>
#include <cmath>
#include <functional>
#include <string>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace actvar;
using T = __nv_bfloat16;

#define CK(x)                                                                                   \
    do {                                                                                        \
        cudaError_t e_ = (x);                                                                   \
        if (e_ != cudaSuccess) {                                                                \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            std::exit(1);                                                                       \
        }                                                                                       \
    } while (0)

[[maybe_unused]] static int gLaunches = 0;   // launches of the last timeUs call (read by the trace build)

template <class F>
float timeUs(F f) {
    gLaunches = 3 + 9 * 10;
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < 3; ++i) CK(f());
    CK(cudaDeviceSynchronize());
    std::vector<float> v;
    for (int r = 0; r < 9; ++r) {
        CK(cudaEventRecord(a));
        for (int i = 0; i < 10; ++i) CK(f());
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, a, b));
        v.push_back(ms * 100.f);  // us per call
    }
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// NVML through dlopen (no link dependency): SM clock (MHz), board power (W) and the board's energy counter (mJ).
struct Nvml {
    using Init = int (*)();
    using Handle = int (*)(unsigned, void**);
    using Clock = int (*)(void*, int, unsigned*);
    using Power = int (*)(void*, unsigned*);
    using Energy = int (*)(void*, unsigned long long*);
    Clock clock = nullptr;
    Power power = nullptr;
    Energy energy = nullptr;
    void* dev = nullptr;
    Nvml() {
        void* h = dlopen("libnvidia-ml.so.1", RTLD_NOW);
        if (!h) return;
        auto init = (Init)dlsym(h, "nvmlInit_v2");
        auto byIndex = (Handle)dlsym(h, "nvmlDeviceGetHandleByIndex_v2");
        clock = (Clock)dlsym(h, "nvmlDeviceGetClockInfo");
        power = (Power)dlsym(h, "nvmlDeviceGetPowerUsage");
        energy = (Energy)dlsym(h, "nvmlDeviceGetTotalEnergyConsumption");
        int ord = 0;
        CK(cudaGetDevice(&ord));   // NVML's index order can differ; the probe runs on a one-GPU machine
        if (!init || !byIndex || !clock || !power || init() != 0 || byIndex((unsigned)ord, &dev) != 0) dev = nullptr;
    }
    bool clockMHz(double& mhz) const {
        unsigned c = 0;
        if (!dev || clock(dev, 1 /* NVML_CLOCK_SM */, &c) != 0) return false;
        mhz = c;
        return true;
    }
    bool watts(double& w) const {
        unsigned mw = 0;
        if (!dev || power(dev, &mw) != 0) return false;
        w = mw * 1e-3;
        return true;
    }
    bool energyMJ(double& mj) const {   // millijoules since the driver was loaded
        unsigned long long e = 0;
        if (!dev || !energy || energy(dev, &e) != 0) return false;
        mj = (double)e;
        return true;
    }
};

struct Sustained { double us = 0, mhz = 0, watts = 0, mj = 0; };

// Calls f back to back: 1 s of warm-up, then `seconds` measured. Batches of 10 calls, one batch always queued
// behind the one the host waits for, so the GPU does not idle while the host reads NVML. Time per call from CUDA
// events; energy per call from the board's energy counter over exactly the measured batches (read when the batch
// before the first and the last measured batch completed: the GPU ran nothing else in between); without that
// counter, mean sampled power x time per call. Clock: mean of the samples taken after each batch.
template <class F>
Sustained sustain(F f, double seconds, const Nvml& nv) {
    using Clk = std::chrono::steady_clock;
    cudaEvent_t ev[2][2];
    for (auto& e : ev) {
        CK(cudaEventCreate(&e[0]));
        CK(cudaEventCreate(&e[1]));
    }
    const auto enqueue = [&](int slot) {
        CK(cudaEventRecord(ev[slot][0]));
        for (int i = 0; i < 10; ++i) CK(f());
        CK(cudaEventRecord(ev[slot][1]));
    };
    const auto t0 = Clk::now();
    const auto since = [&] { return std::chrono::duration<double>(Clk::now() - t0).count(); };
    Sustained r;
    int clocks = 0, powers = 0;
    double calls = 0, ms = 0, e0 = 0, e1 = 0, w0 = 0, w1 = 0;
    bool measuring = false, energyOk = true;
    int k = 0;
    enqueue(0);
    for (;; ++k) {
        enqueue((k + 1) & 1);
        CK(cudaEventSynchronize(ev[k & 1][1]));
        const double now = since();
        if (!measuring) {
            if (now >= 1.0) measuring = true, energyOk = nv.energyMJ(e0), w0 = now;
            continue;
        }
        float m = 0;
        CK(cudaEventElapsedTime(&m, ev[k & 1][0], ev[k & 1][1]));
        ms += m, calls += 10;
        double c = 0, w = 0;
        if (nv.clockMHz(c)) r.mhz += c, ++clocks;
        if (!energyOk && nv.watts(w)) r.watts += w, ++powers;   // (the fallback only)
        if (now >= 1.0 + seconds) break;
    }
    energyOk = energyOk && nv.energyMJ(e1);
    w1 = since();
    CK(cudaEventSynchronize(ev[(k + 1) & 1][1]));   // the batch still queued
    r.us = ms * 1e3 / calls;
    r.mhz = clocks ? r.mhz / clocks : 0.0;
    if (energyOk && e1 > e0) {
        r.mj = (e1 - e0) / calls;
        r.watts = (e1 - e0) * 1e-3 / (w1 - w0);
    } else {
        r.watts = powers ? r.watts / powers : 0.0;
        r.mj = r.watts * r.us * 1e-3;
    }
    for (auto& e : ev) {
        CK(cudaEventDestroy(e[0]));
        CK(cudaEventDestroy(e[1]));
    }
    return r;
}

__global__ void fillKernel(T* p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t x = (uint32_t)i * 2654435761u ^ seed;
        x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
        p[i] = __float2bfloat16(((x & 0xFFFF) / 65536.f - 0.5f) * 0.25f);
    }
}

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s C T [experts top_k]\n", argv[0]);
        return 2;
    }
    const int C = std::atoi(argv[1]), Tn = std::atoi(argv[2]);
    const int E = argc > 3 ? std::atoi(argv[3]) : 16, K = argc > 4 ? std::atoi(argv[4]) : 12;
    const int hidden = 4 * C, d = hidden / E;
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));

    // random routing: top-K of E uniform logits per token; per-expert ascending token lists
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> U(0.f, 1.f);
    std::vector<int32_t> lists((size_t)E * Tn), counts(E, 0);
    std::vector<float> lg(E);
    std::vector<int> ord(E);
    for (int t = 0; t < Tn; ++t) {
        for (int e = 0; e < E; ++e) lg[e] = U(rng), ord[e] = e;
        std::partial_sort(ord.begin(), ord.begin() + K, ord.end(), [&](int a, int b) { return lg[a] > lg[b]; });
        for (int j = 0; j < K; ++j) lists[(size_t)ord[j] * Tn + counts[ord[j]]++] = t;
    }
    // the tokens that did not choose e, from the back of its list (as the plugin's counting sort writes them)
    for (int e = 0; e < E; ++e) {
        std::vector<char> in(Tn, 0);
        for (int i = 0; i < counts[e]; ++i) in[lists[(size_t)e * Tn + i]] = 1;
        int r = 0;
        for (int t = 0; t < Tn; ++t)
            if (!in[t]) lists[(size_t)e * Tn + Tn - 1 - r++] = t;
    }
    const int maxM = *std::max_element(counts.begin(), counts.end());
    int64_t chosen = 0;
    for (int c : counts) chosen += c;

    T *x, *w1, *b1, *H, *w2, *b2, *out;
    int32_t *dLists, *dCounts;
    CK(cudaMalloc(&x, (size_t)Tn * C * 2));
    CK(cudaMalloc(&w1, (size_t)hidden * C * 2));
    CK(cudaMalloc(&b1, (size_t)hidden * 2));
    CK(cudaMalloc(&H, (size_t)Tn * hidden * 2));
    CK(cudaMalloc(&w2, (size_t)hidden * C * 2));
    CK(cudaMalloc(&b2, (size_t)C * 2));
    CK(cudaMalloc(&out, (size_t)Tn * C * 2));
    CK(cudaMalloc(&dLists, lists.size() * 4));
    CK(cudaMalloc(&dCounts, E * 4));
    fillKernel<<<1024, 256>>>(x, (size_t)Tn * C, 1);
    fillKernel<<<1024, 256>>>(w1, (size_t)hidden * C, 2);
    fillKernel<<<64, 256>>>(b1, hidden, 3);
    fillKernel<<<1024, 256>>>(w2, (size_t)hidden * C, 4);
    fillKernel<<<64, 256>>>(b2, C, 5);
    fillKernel<<<1024, 256>>>(H, (size_t)Tn * hidden, 6);
    CK(cudaMemcpy(dLists, lists.data(), lists.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dCounts, counts.data(), E * 4, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());

    const char* f1 = std::getenv("ACTVAR_FC1_CFG");
    const char* f2 = std::getenv("ACTVAR_FC2_CFG");
    std::printf("C=%d T=%d E=%d K=%d d=%d maxM=%d  FC1_CFG=%s FC2_CFG=%s\n", C, Tn, E, K, d, maxM, f1 ? f1 : "auto",
                f2 ? f2 : "auto");
    const double fc1Flop = 2.0 * chosen * d * C, fc2Flop = 2.0 * Tn * (double)hidden * C;

    GemmArgs<T> p1 = gemmNT(x, C, w1, C, b1, H, hidden, Tn, d, C);   // as the plugin's routed fc1
    p1.groupN = d;
    p1.rowIdx = dLists; p1.rowIdxStride = Tn;
    p1.counts = dCounts;
    GemmArgs<T> pc = p1;   // same row counts, contiguous rows 0..count-1 (TMA-capable)
    pc.rowIdx = nullptr;

    auto line = [&](const char* name, float us, double flop) {
        std::printf("%-34s %9.1f us %7.1f TFLOP/s\n", name, us, flop / us * 1e-6);
#if defined(ACTVAR_WS_TRACE)
        // the warp-specialised kernel's cycle counts of the last launch (absent for the other kernels)
        static unsigned long long tr[kWsTraceCtas][8];
        unsigned long long epi[4] = {};
        const int n = wsTraceFetch(tr, kWsTraceCtas, epi);
        double s[8] = {};
        int ctas = 0;
        for (int b = 0; b < n; ++b) {
            ctas += tr[b][0] > 0;
            for (int i = 0; i < 8; ++i) s[i] += (double)tr[b][i];
        }
        if (ctas > 0)
            std::printf("    trace: %d CTAs, %.1f tiles/CTA, per tile: main loop %.0f cyc (full-stage waits %.0f),"
                        " epilogue %.0f cyc; producer waiting %.0f %%; %.0f MHz\n",
                        ctas, s[0] / ctas, s[1] / s[0], s[2] / s[0], s[3] / s[0], 100.0 * s[4] / (s[5] > 0 ? s[5] : 1),
                        s[6] > 0 ? 1e3 * s[7] / s[6] : 0.0);
        if (ctas > 0) {   // summed over all launches of the line: per tile and launch
            const double k = 1.0 / (s[0] * gLaunches);
            std::printf("    epilogue phases per tile: arithmetic + shared stores %.0f, barrier %.0f,"
                        " shared loads + global stores %.0f, barrier %.0f cyc\n",
                        epi[0] * k, epi[1] * k, epi[2] * k, epi[3] * k);
        }
#endif
    };
    struct Variant { std::string name; std::function<cudaError_t()> f; double flop; };
    std::vector<Variant> vs;
    GemmArgs<T> pz = p1;   // + the zeros of the unchosen slices (the plugin's routed fc1)
    pz.zeroRest = true;
    vs.push_back({"fc1 routed + GELU + unchosen zeros", [&] { return launchGemmSm90<T, true>(pz, E, maxM, sms, 0); }, fc1Flop});
    vs.push_back({"fc1 routed (gathered) + GELU", [&] { return launchGemmSm90<T, true>(p1, E, maxM, sms, 0); }, fc1Flop});
    vs.push_back({"fc1 routed (gathered), no GELU", [&] { return launchGemmSm90<T, false>(p1, E, maxM, sms, 0); }, fc1Flop});
    vs.push_back({"fc1 contiguous rows + GELU", [&] { return launchGemmSm90<T, true>(pc, E, maxM, sms, 0); }, fc1Flop});
    vs.push_back({"fc1 contiguous rows, no GELU", [&] { return launchGemmSm90<T, false>(pc, E, maxM, sms, 0); }, fc1Flop});
    const GemmArgs<T> p2 = gemmNT(H, hidden, w2, hidden, b2, out, C, Tn, C, hidden);
    vs.push_back({"fc2 dense", [&] { return launchGemmSm90<T, false>(p2, 1, Tn, sms, 0); }, fc2Flop});
    // the dense fc1 (all hidden units, no routing) for reference
    const GemmArgs<T> pd = gemmNT(x, C, w1, C, b1, H, hidden, Tn, hidden, C);
    vs.push_back({"fc1 dense (all units) + GELU", [&] { return launchGemmSm90<T, true>(pd, 1, Tn, sms, 0); }, fc2Flop});
#if defined(ACTVAR_HAVE_CUBLASLT)
    // cuBLASLt: one GEMM with the routed fc1's useful FLOPs (T rows, K_w / E of the hidden units), the full fc1, fc2
    void* lws = nullptr;
    CK(cudaMalloc(&lws, kLtWorkspaceBytes));
    const int dt = ACTVAR_DTYPE_BFLOAT16, nUse = K * d;
    auto lt = [&, dt](const T* A, int lda, const T* B, int ldb, const T* bias, T* D, int ldd, int M, int N, int Kd,
                      bool gelu) {
        return [=] { return ltGemmNT(dt, A, lda, B, ldb, bias, D, ldd, M, N, Kd, gelu, lws, kLtWorkspaceBytes, 0); };
    };
    const double useFlop = 2.0 * Tn * (double)nUse * C;
    if (ltAvailable()) {
        vs.push_back({"cuBLASLt fc1, K_w/E of units, + GELU", lt(x, C, w1, C, b1, H, hidden, Tn, nUse, C, true), useFlop});
        vs.push_back({"cuBLASLt fc1, K_w/E of units, bias", lt(x, C, w1, C, b1, H, hidden, Tn, nUse, C, false), useFlop});
        vs.push_back({"cuBLASLt fc1 dense + GELU", lt(x, C, w1, C, b1, H, hidden, Tn, hidden, C, true), fc2Flop});
        vs.push_back({"cuBLASLt fc2 dense", lt(H, hidden, w2, hidden, b2, out, C, Tn, C, hidden, false), fc2Flop});
    } else {
        std::printf("(cuBLASLt not available: libcublasLt.so.13 not on the loader path)\n");
    }
#endif
    // PROBE_LINES, e.g. "0,3,7": only these lines (0-based positions in the list above, cuBLASLt lines from 7 on)
    if (const char* only = std::getenv("PROBE_LINES")) {
        std::vector<Variant> keep;
        for (const char* c = only; *c;) {
            char* end = nullptr;
            const long i = std::strtol(c, &end, 10);
            if (end == c || i < 0 || i >= (long)vs.size() || (*end && *end != ',')) {
                std::fprintf(stderr, "PROBE_LINES: expected comma-separated line numbers 0-%zu, got '%s'\n",
                             vs.size() - 1, only);
                return 2;
            }
            keep.push_back(vs[i]);
            c = *end ? end + 1 : end;
        }
        vs.swap(keep);
    }
    if (std::getenv("PROBE_ONCE")) {   // one call per line (for a profiler such as ncu)
        for (auto& v : vs) {
            CK(v.f());
            CK(cudaDeviceSynchronize());
            std::printf("ran %s\n", v.name.c_str());
        }
        return 0;
    }
    const char* secs = std::getenv("PROBE_SECONDS");
    if (!secs) {
        for (auto& v : vs) line(v.name.c_str(), timeUs(v.f), v.flop);
        return 0;
    }
    const double seconds = std::atof(secs);
    if (!(seconds > 0) || !std::isfinite(seconds)) {
        std::fprintf(stderr, "PROBE_SECONDS must be a positive number of seconds, got '%s'\n", secs);
        return 2;
    }
    const Nvml nv;
    const size_t n = vs.size();
    std::vector<Sustained> r1(n), r2(n);
    for (size_t i = 0; i < n; ++i) r1[i] = sustain(vs[i].f, seconds, nv);
    for (size_t i = n; i-- > 0;) r2[i] = sustain(vs[i].f, seconds, nv);
    std::printf("sustained %.1f s per line, two passes (forwards, backwards); mJ/call from the board's energy counter\n"
                "(else mean power x time per call); relative = energy per useful FLOP / the first line's\n", seconds);
    std::printf("%-38s %9s %9s %7s %6s %6s %8s %6s\n", "GEMM", "us pass1", "us pass2", "TFLOP/s", "MHz", "W",
                "mJ/call", "rel");
    double ref = 0;
    for (size_t i = 0; i < n; ++i) {
        const double us = 0.5 * (r1[i].us + r2[i].us), mhz = 0.5 * (r1[i].mhz + r2[i].mhz);
        const double w = 0.5 * (r1[i].watts + r2[i].watts), mj = 0.5 * (r1[i].mj + r2[i].mj);
        const double perFlop = mj / vs[i].flop;
        if (i == 0) ref = perFlop;
        std::printf("%-38s %9.1f %9.1f %7.1f %6.0f %6.0f %8.2f %6.3f\n", vs[i].name.c_str(), r1[i].us, r2[i].us,
                    vs[i].flop / us * 1e-6, mhz, w, mj, ref > 0 ? perFlop / ref : 0.0);
    }
    return 0;
}
