// Internal: arguments of the expert-FFN GEMMs, shared by the portable and the sm_90a kernels.
#pragma once
#include "../common/actvar_common.cuh"

namespace actvar {

// D[rowD(m), g*groupN + n] = epi( sum_k A[rowA(m), k] * B[g*groupN + n, k] + bias[g*groupN + n] )
// ("NT": A and B both K-contiguous). Grouped over blockIdx.z = g; rowA = rowD = rowIdx[g*rowIdxStride + m]
// (identity if rowIdx is null); M of group g = counts[g] (p.M if counts is null).
template <typename T>
struct GemmArgs {
    const T* A; int64_t lda;
    const T* B; int64_t ldb;
    const T* bias;
    T* D; int64_t ldd;
    int M, N, K;
    int groupN;                 // per-group shift of B rows / bias / D columns (0 if not grouped)
    const int32_t* rowIdx;      // nullptr: identity rows
    int64_t rowIdxStride;       // per-group stride of rowIdx
    const int32_t* counts;      // nullptr: M rows per group
    int kSplit;                 // > 1: split K over blockIdx.z, write fp32 partials (sm_90a path, no groups)
    float* partial;             // [kSplit, M, N] fp32 when kSplit > 1
    const unsigned long long* rowMask;  // sm_90a path only, optional: D[m, n] = 0 unless bit n / maskCols of
    int maskCols;                       // rowMask[m] is set (masked-dense fc1: experts own maskCols hidden units)
    bool zeroRest;              // request: also zero D[row, g*groupN + n] for the rows NOT in group g, listed from the
                                // back of rowIdx + g*rowIdxStride (entry M - 1 - r, r < M - counts[g]; needs
                                // rowIdxStride == M); honoured only by the sm_90a warp-specialised gathered kernel,
                                // which says so through the launchers' restZeroed
    bool pdl;                   // sm_90a path: launch as a programmatic dependent of the previous kernel
    int numGroups;              // set by the sm_90a launcher
    int mTiles;                 // set by the sm_90a launcher
};

// The plain GEMM D[M, N] = A[M, K] B[N, K]^T + bias[N] (row-major, leading dimensions in elements), no groups;
// callers add groups, gathered rows, masks or split-K on the copy.
template <typename T>
GemmArgs<T> gemmNT(const T* A, int64_t lda, const T* B, int64_t ldb, const T* bias, T* D, int64_t ldd, int M, int N,
                   int K) {
    GemmArgs<T> p{};
    p.A = A; p.lda = lda;
    p.B = B; p.ldb = ldb;
    p.bias = bias;
    p.D = D; p.ldd = ldd;
    p.M = M; p.N = N; p.K = K;
    return p;
}

// Split-K policy of the output GEMM (fc2), a pure function of the shape so that the workspace size can be
// queried without a device: split when the 128 x 128 tiles cannot fill a 132-SM GPU.
inline int fc2SplitK(int T, int C, int hidden) {
    const int64_t tiles = (int64_t)((T + 127) / 128) * ((C + 127) / 128);
    int s = (int)(132 / (tiles > 0 ? tiles : 1));
    const int maxByK = hidden / 512;   // keep >= 8 k-tiles of 64 per slice
    if (s > 8) s = 8;
    if (s > maxByK) s = maxByK;
    return s < 2 ? 1 : s;
}

#if defined(ACTVAR_HAVE_SM90A)
// Hopper (sm_90a) wgmma path, defined in gemm_sm90.cu. Returns cudaErrorNotSupported when the shape or
// alignment is outside what it handles (the caller then falls back to the portable kernels).
// *restZeroed (if given) is set when the launched kernel honoured p.zeroRest.
template <typename T, bool GELU>
cudaError_t launchGemmSm90(const GemmArgs<T>& p, int groups, int maxM, int numSms, cudaStream_t stream,
                           bool* restZeroed = nullptr);
// Warp-specialised, TMA-fed persistent variant (gemm_sm90_ws.cu); cfg 11, 12, 14 pick the tiling. Same fallback rule.
template <typename T, bool GELU>
cudaError_t launchGemmSm90Ws(const GemmArgs<T>& p, int groups, int maxM, int numSms, int cfg, cudaStream_t stream,
                             bool* restZeroed = nullptr);
#if defined(ACTVAR_WS_TRACE)
// Probe builds only: the warp-specialised kernel's per-CTA cycle counts of its last launch (gemm_sm90_ws.cu),
// copied to out[0 .. n) and reset, and its epilogue's phases summed since the previous fetch (epi[4],
// sm90_util.cuh); returns n (<= maxCtas), -1 on a CUDA error.
constexpr int kWsTraceCtas = 256;
int wsTraceFetch(unsigned long long (*out)[8], int maxCtas, unsigned long long* epi);
#endif
#endif

// The tile configuration of the plugin's own GEMM forced through ACTVAR_FC1_CFG (gelu) / ACTVAR_FC2_CFG, 0 = automatic
// (the values: gemm_sm90.cu, launchGemmSm90).
inline int gemmCfgOverride(bool gelu) {
    static const int cfgEnv[2] = {envInt("ACTVAR_FC2_CFG", 0), envInt("ACTVAR_FC1_CFG", 0)};
    return cfgEnv[gelu ? 1 : 0];
}

}  // namespace actvar
