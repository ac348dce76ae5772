// ActVAR token selection, gather and scatter-reconstruction kernels.
#include "../common/actvar_common.cuh"

namespace actvar {
namespace {

constexpr int kTopkThreads = 256;

// Rows with L <= 32: one warp per row. Lane i holds element i; its rank is the number of elements that
// beat it (larger key, or equal key at a lower position). Selected iff rank < K; output slot = number of
// selected lanes below it, which yields ascending positions.
__global__ void topkWarpKernel(const float* __restrict__ scores, int32_t* __restrict__ idx, int rows, int L, int K) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const bool valid = lane < L;
    const uint32_t key = valid ? orderedKey(scores[(size_t)row * L + lane]) : 0u;
    int rank = 0;
    for (int j = 0; j < L; ++j) {
        const uint32_t kj = __shfl_sync(0xFFFFFFFFu, key, j);
        rank += (kj > key) || (kj == key && j < lane);
    }
    const bool sel = valid && rank < K;
    const uint32_t ballot = __ballot_sync(0xFFFFFFFFu, sel);
    if (sel) {
        const int slot = __popc(ballot & ((1u << lane) - 1u));
        idx[(size_t)row * K + slot] = lane;
    }
}

// Rows with L > 32: one block per row; keys in shared memory; each thread owns a contiguous chunk of
// positions so that a block-wide exclusive scan of per-thread counts gives ascending output slots.
__global__ void __launch_bounds__(kTopkThreads) topkBlockKernel(const float* __restrict__ scores,
                                                              int32_t* __restrict__ idx, int L, int K) {
    extern __shared__ uint32_t keys[];
    __shared__ int warpSums[kTopkThreads / 32];
    const int row = blockIdx.x;
    const float* s = scores + (size_t)row * L;
    for (int i = threadIdx.x; i < L; i += blockDim.x) keys[i] = orderedKey(s[i]);
    __syncthreads();
    const int per = (L + blockDim.x - 1) / blockDim.x;
    const int begin = min(L, (int)threadIdx.x * per);
    const int end = min(L, begin + per);
    uint32_t selBits = 0;  // per <= 32 since L <= 8192 and blockDim = 256
    int count = 0;
    for (int i = begin; i < end; ++i) {
        const uint32_t ki = keys[i];
        int rank = 0;
        for (int j = 0; j < L; ++j) {
            const uint32_t kj = keys[j];
            rank += (kj > ki) || (kj == ki && j < i);
        }
        if (rank < K) { selBits |= 1u << (i - begin); ++count; }
    }
    // block exclusive scan of count
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int incl = count;
    for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
        if (lane >= o) incl += v;
    }
    if (lane == 31) warpSums[warp] = incl;
    __syncthreads();
    int warpOffset = 0;
    for (int w = 0; w < warp; ++w) warpOffset += warpSums[w];
    int slot = warpOffset + incl - count;
    int32_t* out = idx + (size_t)row * K;
    for (int i = begin; i < end; ++i)
        if (selBits & (1u << (i - begin))) out[slot++] = i;
}

// Row copy: dst row r <- src row r, where one side is addressed through idx.
// mode 0 (gather):  dst = x_sel row (s, k), src = x row (s, idx[s, k])
// mode 1 (scatter): dst = out row (s, idx[s, k]), src = upd row (s, k)
template <typename V, int MODE>
__global__ void rowCopyKernel(const char* __restrict__ src, char* __restrict__ dst, const int32_t* __restrict__ idx,
                              int64_t numRows /* S*K */, int K, int L, int chunksPerRow) {
    constexpr int U = 4;
    const int64_t total = numRows * chunksPerRow;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t rowBytes = (int64_t)chunksPerRow * sizeof(V);
    for (int64_t base = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; base < total; base += stride * U) {
        V v[U];
        int64_t dOff[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int64_t g = base + u * stride;
            dOff[u] = -1;
            if (g < total) {
                const int64_t r = g / chunksPerRow;
                const int c = (int)(g - r * chunksPerRow);
                const int64_t s = r / K;
                const int64_t pos = s * L + __ldg(idx + r);
                const int64_t sRow = MODE == 0 ? pos : r;
                const int64_t dRow = MODE == 0 ? r : pos;
                v[u] = __ldg(reinterpret_cast<const V*>(src + sRow * rowBytes) + c);
                dOff[u] = dRow * rowBytes + (int64_t)c * sizeof(V);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (dOff[u] >= 0) *reinterpret_cast<V*>(dst + dOff[u]) = v[u];
    }
}

template <int MODE>
cudaError_t launchRowCopy(const void* src, void* dst, const int32_t* idx, int S, int L, int K, int64_t rowBytes,
                          cudaStream_t stream) {
    const uintptr_t align = (uintptr_t)src | (uintptr_t)dst | (uintptr_t)rowBytes;
    const int64_t rows = (int64_t)S * K;
    int device = 0, sms = 132;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    auto go = [&](auto vecTag) -> cudaError_t {
        using V = decltype(vecTag);
        const int cpr = (int)(rowBytes / sizeof(V));
        const int64_t total = rows * cpr;
        const int threads = 256;
        int64_t blocks = (total + threads * 4 - 1) / (threads * 4);
        blocks = blocks < 1 ? 1 : blocks;
        const int64_t maxBlocks = (int64_t)sms * 64;
        if (blocks > maxBlocks) blocks = maxBlocks;
        rowCopyKernel<V, MODE><<<(unsigned)blocks, threads, 0, stream>>>(
            static_cast<const char*>(src), static_cast<char*>(dst), idx, rows, K, L, cpr);
        return cudaGetLastError();
    };
    if (align % 16 == 0) return go(uint4{});
    if (align % 8 == 0) return go(uint2{});
    if (align % 4 == 0) return go(uint32_t{});
    return go(uint16_t{});
}

}  // namespace
}  // namespace actvar

using namespace actvar;

extern "C" int actvarPluginsVersion(void) { return 101; }   // 101: actvarExpertFfnPath

extern "C" cudaError_t actvarTopkAscending(const float* scores, int32_t* idx, int rows, int L, int K,
                                           cudaStream_t stream) {
    if (rows < 0 || L < 1 || L > ACTVAR_TOPK_MAX_L || K < 1 || K > L) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    if (!scores || !idx) return cudaErrorInvalidValue;
    if (L <= 32) {
        const int warpsPerBlock = 8;
        topkWarpKernel<<<(rows + warpsPerBlock - 1) / warpsPerBlock, warpsPerBlock * 32, 0, stream>>>(scores, idx, rows,
                                                                                                       L, K);
    } else {
        const size_t smem = (size_t)L * sizeof(uint32_t);
        if (smem > 48 * 1024) {
            cudaError_t e = cudaFuncSetAttribute(topkBlockKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
            if (e != cudaSuccess) return e;
        }
        topkBlockKernel<<<rows, kTopkThreads, smem, stream>>>(scores, idx, L, K);
    }
    return cudaGetLastError();
}

extern "C" cudaError_t actvarTokenSelect(const float* scores, int32_t* idx, int S, int L, int K, cudaStream_t stream) {
    return actvarTopkAscending(scores, idx, S, L, K, stream);
}

extern "C" cudaError_t actvarTokenGather(const void* x, const int32_t* idx, void* x_sel, int S, int L, int K, int C,
                                         int dtype, cudaStream_t stream) {
    const size_t es = elemSize(dtype);
    if (!es || S < 0 || L < 1 || K < 1 || K > L || C < 1) return cudaErrorInvalidValue;
    if (S == 0) return cudaSuccess;
    if (!x || !idx || !x_sel) return cudaErrorInvalidValue;
    return launchRowCopy<0>(x, x_sel, idx, S, L, K, (int64_t)C * es, stream);
}

extern "C" cudaError_t actvarTokenScatter(const void* x, const int32_t* idx, const void* upd, void* out, int S, int L,
                                          int K, int C, int dtype, cudaStream_t stream) {
    const size_t es = elemSize(dtype);
    if (!es || S < 0 || L < 1 || K < 1 || K > L || C < 1) return cudaErrorInvalidValue;
    if (S == 0) return cudaSuccess;
    if (!x || !idx || !upd || !out) return cudaErrorInvalidValue;
    const int64_t rowBytes = (int64_t)C * es;
    if (out != x) {
        // out-of-place: pass-through copy of the whole sequence, then the K updated rows on top
        cudaError_t e = cudaMemcpyAsync(out, x, (size_t)S * L * rowBytes, cudaMemcpyDeviceToDevice, stream);
        if (e != cudaSuccess) return e;
    }
    return launchRowCopy<1>(upd, out, idx, S, L, K, rowBytes, stream);
}
