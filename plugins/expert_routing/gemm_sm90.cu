// Hopper (sm_90a) GEMM for the expert FFN: wgmma.mma_async with operands in 128-byte-swizzled shared memory.
// Compiled for sm_90a only (see CMakeLists.txt); the portable mma.sync / SIMT kernels cover other GPUs.
//
// CTA: 256 threads = 2 warpgroups; tile 128 (M) x BN (N) x 64 (K); warpgroup w computes rows [64w, 64w+64).
// Loads: every thread issues 16-byte cp.async for A and B (A rows gathered through rowIdx on the fly) into a
// ring of kStages 128-byte-swizzled stages. Each K step: wait for the stage, proxy fence, barrier, issue the
// loads PD steps ahead, 4 wgmma (k16 each) on the current stage, commit, then either keep one wgmma group in
// flight (KEEP1, PD = kStages - 2) or drain it (PD = kStages - 1; with 3 stages two CTAs fit on an SM).
// Epilogue: + bias, optional GELU(tanh), optional expert mask, staged through shared memory into 16-byte
// row chunks of D[rowIdx[m]]; or fp32 partials for split-K.
// Grid: x = group + groups * nTile (all experts of one token range run together), y = mTile, z = K slice.
#include "sm90_util.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "gemm_sm90.cu must be compiled for sm_90a only"
#endif

namespace actvar {
namespace {
using namespace sm90;

constexpr int kThreads = 256;

template <int BN, int kStages>
constexpr int smemBytes() { return kStages * (kBM + BN) * kBK * 2 + BN * 2 + 1024; }  // + bias, alignment slack

template <typename T, int BN, int kStages, bool GELU, bool KEEP1 = true>
__global__ void __launch_bounds__(kThreads, (BN == 128 && kStages == 3) ? 2 : 1) gemmWgmmaKernel(GemmArgs<T> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int A_BYTES = kBM * kBK * 2, B_BYTES = BN * kBK * 2, STAGE = A_BYTES + B_BYTES;
    constexpr int A_CH = kBM * 8 / kThreads;   // 16-byte chunks per thread
    constexpr int B_CH = BN * 8 / kThreads;
    constexpr int NACC = BN / 2;
    extern __shared__ unsigned char smemRaw[];
    const uint32_t sbase = ((uint32_t)__cvta_generic_to_shared(smemRaw) + 1023u) & ~1023u;

    // grid: x = group + groups * nTile (the groups of one token range run together, so gathered A rows and
    // the H rows of one m-tile are shared through L2), y = mTile, z = K slice (split-K) or 0
    gridDependencyWait();     // the previous kernel's outputs (routing, H) are complete
    gridDependencyLaunch();
    const int groups = p.kSplit > 1 ? 1 : p.numGroups;
    const int g = blockIdx.x % groups;
    const int M = p.counts ? p.counts[g] : p.M;
    const int m0 = blockIdx.y * kBM, n0 = (blockIdx.x / groups) * BN;
    if (m0 >= M) return;
    const int32_t* rowIdx = p.rowIdx ? p.rowIdx + g * p.rowIdxStride : nullptr;
    const T* Bg = p.B + (int64_t)g * p.groupN * p.ldb;
    const int tid = threadIdx.x;
    const int ch = tid & 7;          // 16-byte chunk within a 128-byte row
    const int r0 = tid >> 3;         // first row this thread loads (then every 32 rows)

    const T* aSrc[A_CH];
    bool aOk[A_CH];
#pragma unroll
    for (int i = 0; i < A_CH; ++i) {
        const int m = m0 + r0 + 32 * i;
        aOk[i] = m < M;
        const int64_t ar = aOk[i] ? (rowIdx ? rowIdx[m] : m) : 0;
        aSrc[i] = p.A + ar * p.lda + ch * 8;
    }
    const T* bSrc = Bg + (int64_t)(n0 + r0) * p.ldb + ch * 8;
    const int64_t bStep = 32 * p.ldb;
    const int bRowsLeft = p.N - n0 - r0;     // B row r0 + 32i valid iff 32i < bRowsLeft
    // swizzled destination offset of (row, chunk): row*128 + ((chunk ^ (row & 7)) << 4); row & 7 == r0 & 7
    const uint32_t dOff = (uint32_t)r0 * 128u + (uint32_t)((ch ^ (r0 & 7)) << 4);

    // the epilogue's bias columns (after the stages) and output rows, requested now (sm90_util.cuh)
    const uint32_t biasSmem = sbase + kStages * STAGE;
    if (p.kSplit <= 1) prefetchBias<T, BN>(biasSmem, p.bias + (int64_t)g * p.groupN, n0, p.N, tid);
    const EpiRows rows = epiRows(tid & 127, m0 + (tid >> 7) * 64, M, rowIdx);

    const int KT = p.K / kBK;
    auto loadStage = [&](int kt) {
        const uint32_t st = sbase + (uint32_t)(kt % kStages) * STAGE;
        const int64_t ko = (int64_t)kt * kBK;
#pragma unroll
        for (int i = 0; i < A_CH; ++i) cpAsync16(st + dOff + i * 32 * 128, aSrc[i] + ko, aOk[i]);
#pragma unroll
        for (int i = 0; i < B_CH; ++i) {
            const bool ok = 32 * i < bRowsLeft;
            cpAsync16(st + A_BYTES + dOff + i * 32 * 128, ok ? bSrc + i * bStep + ko : p.B, ok);
        }
    };

    float acc[NACC];
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.f;

    // KEEP1: one wgmma group stays in flight, prefetch distance PD = kStages - 2 (stages hold k-tiles kt-1, which
    // wgmma may still read, kt, kt+1, kt+2); else every step drains wgmma and PD = kStages - 1.
    constexpr int PD = KEEP1 ? kStages - 2 : kStages - 1;
    const int kt0 = p.kSplit > 1 ? (int)((int64_t)blockIdx.z * KT / p.kSplit) : 0;
    const int kt1 = p.kSplit > 1 ? (int)((int64_t)(blockIdx.z + 1) * KT / p.kSplit) : KT;
#pragma unroll
    for (int s = 0; s < PD; ++s) {
        if (kt0 + s < kt1) loadStage(kt0 + s);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    const int wg = tid >> 7;
    for (int kt = kt0; kt < kt1; ++kt) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(PD - 1));
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        if (kt + PD < kt1) loadStage(kt + PD);
        asm volatile("cp.async.commit_group;\n" ::);
        const uint32_t st = sbase + (uint32_t)(kt % kStages) * STAGE;
        const uint64_t da = smemDesc(st + wg * 64 * 128);
        const uint64_t db = smemDesc(st + A_BYTES);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int k = 0; k < kBK / 16; ++k) wgmmaStep<T, BN>(acc, da + 2 * k, db + 2 * k);  // +32 bytes per k16
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        if (KEEP1) asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        else asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    asm volatile("cp.async.wait_group 0;\n" ::);

    // epilogue. Accumulator layout of m64nNk16: thread (warp w of the warpgroup, lane l) holds for each
    // n8 block j: rows 16w + l/4 (regs 4j, 4j+1) and +8 (regs 4j+2, 4j+3), columns 8j + 2(l%4) + {0,1}.
    const int wl = (tid & 127) >> 5, lane = tid & 31;
    if (p.kSplit > 1) {  // fp32 partial sums of this K slice (no groups, identity rows)
        float* P = p.partial + (int64_t)blockIdx.z * p.M * p.N;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m0 + wg * 64 + wl * 16 + (lane >> 2) + 8 * h;
            if (m >= M) continue;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int n = n0 + 8 * j + 2 * (lane & 3);
                if (n >= p.N) continue;
                *reinterpret_cast<float2*>(P + (int64_t)m * p.N + n) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            }
        }
        return;
    }
    // staged epilogue (sm90_util.cuh): the stages are free once every cp.async has landed and all warps left
    // the main loop; warpgroup wg stages its 64 rows in the first 8 KB (16 KB) of stage 0.
    __syncthreads();
    epilogueBlock64<T, BN, GELU>(p, acc, sbase + wg * 8192, tid & 127, m0 + wg * 64, M, rowIdx, rows, biasSmem,
                                 p.D + (int64_t)g * p.groupN, n0);
#endif
}

template <typename T, int BN, int S, bool GELU, bool KEEP1 = true>
cudaError_t launchBn(const GemmArgs<T>& p, int groups, int maxM, cudaStream_t stream) {
    auto kern = gemmWgmmaKernel<T, BN, S, GELU, KEEP1>;
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smemBytes<BN, S>());
    if (e != cudaSuccess) return e;
    GemmArgs<T> q = p;
    q.numGroups = p.kSplit > 1 ? 1 : groups;
    dim3 grid(q.numGroups * ((p.N + BN - 1) / BN), (maxM + kBM - 1) / kBM, p.kSplit > 1 ? p.kSplit : 1);
    return launchKernel(kern, grid, dim3(kThreads), smemBytes<BN, S>(), stream, p.pdl, q);
}

}  // namespace

template <typename T, bool GELU>
cudaError_t launchGemmSm90(const GemmArgs<T>& p, int groups, int maxM, int numSms, cudaStream_t stream,
                           bool* restZeroed) {
    const bool ok = p.K % kBK == 0 && p.lda % 8 == 0 && p.ldb % 8 == 0 && p.N % 2 == 0 && p.groupN % 2 == 0 &&
                    (uintptr_t)p.A % 16 == 0 && (uintptr_t)p.B % 16 == 0 && (uintptr_t)p.D % 4 == 0 && (uintptr_t)p.bias % 4 == 0 &&
                    p.ldd % 2 == 0 && ((int64_t)p.groupN * p.ldb) % 8 == 0 && p.K > 0 &&
                    (p.kSplit <= 1 || (groups == 1 && !p.rowIdx && !p.counts && p.partial && !GELU)) &&
                    (!p.rowMask || (p.maskCols % 2 == 0 && p.kSplit <= 1));
    if (!ok) return cudaErrorNotSupported;
    const int64_t tiles256 = (int64_t)groups * ((maxM + kBM - 1) / kBM) * ((p.N + 255) / 256);
    // tile config: ACTVAR_FC1_CFG / ACTVAR_FC2_CFG (GELU = fc1) = 0 auto, 1: 128x256 4 stages,
    // 2: 128x128 4 stages, 3: 128x128 3 stages (two CTAs per SM), 4: as 3 with prefetch distance 2 and
    // no wgmma group kept in flight, 8: 128x128 6 stages, 9: 128x64 4 stages, 10: 128x64 8 stages -- for measurements
    int cfg = gemmCfgOverride(GELU);
    if (p.kSplit > 1 && cfg == 1) cfg = 2;
    // Grids smaller than the GPU are latency-bound (each k-step waits for its loads): more CTAs and deeper
    // prefetch. 8: 128x128, 6 stages (prefetch 4) for split-K; 9: 128x64, 4 stages, two CTAs per SM, for fc1;
    // 10: 128x64, 8 stages (prefetch 6) when those tiles fit in one wave of one CTA per SM.
    // 11-14: warp-specialised TMA kernels (11: cooperative 128x256, 12: ping-pong 128x128, 6 stages,
    // 14: cooperative 128x192; gathered A only with GELU).
    const int64_t tiles128 = (int64_t)groups * ((maxM + kBM - 1) / kBM) * ((p.N + 127) / 128) * std::max(p.kSplit, 1);
    if (cfg == 0 && p.kSplit > 1) cfg = 8;
    // Grids that fill the GPU: the warp-specialised TMA kernel (gemm_sm90_ws.cu), cooperative 128 x 256 tiles
    // (128 x 192 for un-gathered A when N is a multiple of 192 but not of 256), for fc2 and for the routed fc1
    // (gathered rows through its cp.async producer). The masked-dense fc1 stays on this file's kernels
    // (plugins/NOTES.md, v10-v13).
    if (cfg == 0 && tiles128 >= numSms && !p.rowMask && (GELU || !p.rowIdx))
        cfg = !p.rowIdx && p.N % 256 != 0 && p.N % 192 == 0 ? 14 : 11;
    if (cfg == 11 || cfg == 12 || cfg == 14) {
        const cudaError_t e = launchGemmSm90Ws<T, GELU>(p, groups, maxM, numSms, cfg, stream, restZeroed);
        if (e != cudaErrorNotSupported) return e;
        cfg = 0;
    }
    if (cfg == 0 && GELU && tiles128 < numSms) cfg = 2 * tiles128 <= numSms ? 10 : 9;   // 10: one wave of 1 CTA/SM
    if (cfg == 0 && GELU) cfg = 4;  // fc1 (short K = C): two CTAs per SM overlap one's epilogue with the other's MMAs
    if (cfg == 0) {
        // BN = 256 when it fills the chip and does not waste more than an eighth of the columns
        const int n256 = (p.N + 255) / 256 * 256, n128 = (p.N + 127) / 128 * 128;
        cfg = (p.kSplit <= 1 && tiles256 >= numSms && n256 * 8 <= n128 * 9) ? 1 : 2;
    }
    if (cfg == 8) return launchBn<T, 128, 6, GELU>(p, groups, maxM, stream);
    if (cfg == 9) return launchBn<T, 64, 4, GELU>(p, groups, maxM, stream);
    if (cfg == 10) return launchBn<T, 64, 8, GELU>(p, groups, maxM, stream);
    if (cfg == 1) return launchBn<T, 256, 4, GELU>(p, groups, maxM, stream);
    if (cfg == 3) return launchBn<T, 128, 3, GELU>(p, groups, maxM, stream);
    if (cfg == 4) return launchBn<T, 128, 3, GELU, false>(p, groups, maxM, stream);
    return launchBn<T, 128, 4, GELU>(p, groups, maxM, stream);
}

template cudaError_t launchGemmSm90<__half, true>(const GemmArgs<__half>&, int, int, int, cudaStream_t, bool*);
template cudaError_t launchGemmSm90<__half, false>(const GemmArgs<__half>&, int, int, int, cudaStream_t, bool*);
template cudaError_t launchGemmSm90<__nv_bfloat16, true>(const GemmArgs<__nv_bfloat16>&, int, int, int, cudaStream_t, bool*);
template cudaError_t launchGemmSm90<__nv_bfloat16, false>(const GemmArgs<__nv_bfloat16>&, int, int, int, cudaStream_t, bool*);

}  // namespace actvar
