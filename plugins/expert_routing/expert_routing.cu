// ActVAR expert routing and expert FFN on slices of the dense FFN weights.
//
// Pipeline (all on one stream, no host synchronisation):
//  1. route:  per-token top-k over logits -> experts [T, k] (ascending ids, ties to the lower id) and the
//             per-token 64-bit membership mask
//  2. count:  per-chunk (256 tokens) expert counts (fused into 1 when N <= 16)
//  3. lists:  stable counting sort: lists[e, :counts[e]] = the tokens that chose e, ascending; the tokens that
//             did not, from the back
//  4. fc1:    grouped GEMM over (expert, tile of its chosen tokens): A rows gathered on the fly from h,
//             B = rows [e*d, (e+1)*d) of fc1_w (a pointer offset, no copy), epilogue + b1, GELU(tanh),
//             stored at H[token, e*d + j] (un-permuted on the fly, token order)
//  5. zero:   H[token, e*d : (e+1)*d] = 0 for the unchosen (token, expert) pairs: by fc1's producer (asynchronous
//             bulk copies of a zeroed shared-memory row) where the warp-specialised Hopper kernel runs, else a pass
//  6. fc2:    out = H fc2_w^T + b2 (one GEMM over the masked hidden activations; b2 added once); on Hopper with
//             few output tiles: split-K into fp32 partials + a reduction kernel that adds b2
#include <cstdlib>

#include "dense_lt.h"
#include "gemm_common.cuh"

namespace actvar {
namespace {

// ------------------------------------------------------------------------------------------------
// routing helpers
// ------------------------------------------------------------------------------------------------
// Tokens are processed in chunks of 256 (one block each). Pass 1: per-chunk expert counts from the
// membership bits (routeBitsKernel).
constexpr int kChunk = 256;
using WarpCounts = int[kChunk / 32][ACTVAR_MAX_EXPERTS];

// warpCnt[warp][e] = how many of the warp's tokens have bit e in their membership mask b, then a block barrier.
__device__ __forceinline__ void countWarpMembers(unsigned long long b, int N, WarpCounts& warpCnt) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int e = 0; e < N; ++e) {
        const unsigned bal = __ballot_sync(0xFFFFFFFFu, (b >> e) & 1ull);
        if (lane == 0) warpCnt[warp][e] = __popc(bal);
    }
    __syncthreads();
}

// The block's chunk of kChunk tokens: chunkCounts[chunk, e] = its tokens that chose expert e.
__device__ __forceinline__ void writeChunkCounts(unsigned long long b, int N, int32_t* __restrict__ chunkCounts) {
    __shared__ WarpCounts warpCnt;
    countWarpMembers(b, N, warpCnt);
    if (threadIdx.x < N) {
        int c = 0;
        for (int w = 0; w < kChunk / 32; ++w) c += warpCnt[w][threadIdx.x];
        chunkCounts[blockIdx.x * N + threadIdx.x] = c;
    }
}

__global__ void __launch_bounds__(kChunk) expertCountKernel(const unsigned long long* __restrict__ bits,
                                                            int32_t* __restrict__ chunkCounts, int T, int N) {
    const int t = blockIdx.x * kChunk + threadIdx.x;
    writeChunkCounts(t < T ? bits[t] : 0ull, N, chunkCounts);
}

// Pass 2: stable counting sort: lists[e, :counts[e]] = the tokens that chose e, ascending, and lists[e, T - 1 - r]
// = the r-th token that did not choose e (the complement, from the back: fc1 zeroes those rows' slices). The
// block's offsets (chosen tokens of earlier chunks) are summed by all 256 threads, 256 / N partial sums per expert.
__global__ void __launch_bounds__(kChunk) expertListsKernel(const unsigned long long* __restrict__ bits,
                                                            const int32_t* __restrict__ chunkCounts,
                                                            int32_t* __restrict__ lists, int32_t* __restrict__ counts,
                                                            int T, int N, int numChunks) {
    __shared__ WarpCounts warpCnt;
    __shared__ int offs[ACTVAR_MAX_EXPERTS], tots[ACTVAR_MAX_EXPERTS];
    const int t = blockIdx.x * kChunk + threadIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x < N) offs[threadIdx.x] = tots[threadIdx.x] = 0;
    __syncthreads();
    {
        const int parts = kChunk / N, e = threadIdx.x % N, part = threadIdx.x / N;
        if (part < parts) {
            int o = 0;
            for (int c = part; c < blockIdx.x; c += parts) o += chunkCounts[c * N + e];
            if (o) atomicAdd(&offs[e], o);
            if (blockIdx.x == 0) {
                int tot = 0;
                for (int c = part; c < numChunks; c += parts) tot += chunkCounts[c * N + e];
                if (tot) atomicAdd(&tots[e], tot);
            }
        }
    }
    const unsigned long long b = t < T ? bits[t] : 0ull;
    countWarpMembers(b, N, warpCnt);
    if (blockIdx.x == 0 && threadIdx.x < N) counts[threadIdx.x] = tots[threadIdx.x];
    for (int e = 0; e < N; ++e) {
        const bool chosen = (b >> e) & 1ull;
        const unsigned bal = __ballot_sync(0xFFFFFFFFu, chosen);
        if (t < T) {
            int pos = offs[e] + __popc(bal & ((1u << lane) - 1u));   // tokens before t that chose e
            for (int w = 0; w < warp; ++w) pos += warpCnt[w][e];
            lists[(size_t)e * T + (chosen ? pos : T - 1 - (t - pos))] = t;
        }
    }
}

// Routing for N <= 16 experts, one thread per token (the logits row in registers): expert e's rank = number of
// experts with a larger key, or an equal key and a lower id (ties to the lower id, as actvarTopkAscending);
// writes the chosen ids ascending and the membership mask, and, per block of kChunk tokens, the expert counts
// (pass 1 of the counting sort).
constexpr int kRouteMaxN = 16;
__global__ void __launch_bounds__(kChunk) routeCountKernel(const float* __restrict__ logits,
                                                           int32_t* __restrict__ experts,
                                                           unsigned long long* __restrict__ bits,
                                                           int32_t* __restrict__ chunkCounts, int T, int N, int k) {
    const int t = blockIdx.x * kChunk + threadIdx.x;
    unsigned b = 0;
    if (t < T) {
        uint32_t key[kRouteMaxN];
#pragma unroll
        for (int e = 0; e < kRouteMaxN; ++e) key[e] = e < N ? orderedKey(logits[(size_t)t * N + e]) : 0u;
        int n = 0;
#pragma unroll
        for (int e = 0; e < kRouteMaxN; ++e) {
            int r = 0;
#pragma unroll
            for (int j = 0; j < kRouteMaxN; ++j)
                r += j < N && (key[j] > key[e] || (key[j] == key[e] && j < e));
            if (e < N && r < k) {
                b |= 1u << e;
                experts[(size_t)t * k + n++] = e;
            }
        }
        bits[t] = b;
    }
    writeChunkCounts(b, N, chunkCounts);
}

// Routing of token t by one warp: lane l holds the order-preserving keys of experts l and l + 32; expert e's
// rank = number of experts with a larger key, or an equal key and a lower id (ties to the lower id, as
// actvarTopkAscending). Writes the chosen ids ascending to experts[t, :k]; returns the membership mask.
__device__ __forceinline__ unsigned long long routeTokenWarp(const float* __restrict__ logits,
                                                             int32_t* __restrict__ experts, int t, int N, int k) {
    const int lane = threadIdx.x & 31;
    const float* row = logits + (size_t)t * N;
    const uint32_t k0 = lane < N ? orderedKey(row[lane]) : 0u, k1 = lane + 32 < N ? orderedKey(row[lane + 32]) : 0u;
    int r0 = 0, r1 = 0;
    for (int j = 0; j < N; ++j) {
        const uint32_t kj = __shfl_sync(0xFFFFFFFFu, j < 32 ? k0 : k1, j & 31);
        r0 += (kj > k0) || (kj == k0 && j < lane);
        r1 += (kj > k1) || (kj == k1 && j < lane + 32);
    }
    const unsigned lo = __ballot_sync(0xFFFFFFFFu, lane < N && r0 < k);
    const unsigned hi = __ballot_sync(0xFFFFFFFFu, lane + 32 < N && r1 < k);
    const unsigned below = (1u << lane) - 1u;
    if ((lo >> lane) & 1u) experts[(size_t)t * k + __popc(lo & below)] = lane;
    if ((hi >> lane) & 1u) experts[(size_t)t * k + __popc(lo) + __popc(hi & below)] = lane + 32;
    return (unsigned long long)lo | ((unsigned long long)hi << 32);
}

// Routing in one pass, one warp per token (small T, and N > 16): the chosen ids and the membership mask.
__global__ void routeBitsKernel(const float* __restrict__ logits, int32_t* __restrict__ experts,
                                unsigned long long* __restrict__ bits, int T, int N, int k) {
    gridDependencyWait();
    gridDependencyLaunch();
    const int t = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (t >= T) return;
    const unsigned long long b = routeTokenWarp(logits, experts, t, N, k);
    if (lane == 0) bits[t] = b;
}

// Dense path (after a dense fc1 over all hidden units): routing as routeBitsKernel, one warp per token, then the
// warp zeroes the token's unchosen slices H[t, e*d : (e+1)*d] (vectors of V, sliceBytes % sizeof(V) == 0).
template <typename V>
__global__ void routeZeroKernel(const float* __restrict__ logits, int32_t* __restrict__ experts,
                                char* __restrict__ H, int T, int N, int k, int64_t ldhBytes, int64_t sliceBytes) {
    const int t = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (t >= T) return;
    unsigned long long off = ~routeTokenWarp(logits, experts, t, N, k);
    if (N < 64) off &= (1ull << N) - 1ull;
    const int nv = (int)(sliceBytes / (int64_t)sizeof(V));
    const V z{};
    while (off) {
        const int e = __ffsll((long long)off) - 1;
        off &= off - 1ull;
        V* dst = reinterpret_cast<V*>(H + (int64_t)t * ldhBytes + (int64_t)e * sliceBytes);
        for (int c = lane; c < nv; c += 32) dst[c] = z;
    }
}

// Zeros in H[t, e*d : (e+1)*d] for the (token, expert) pairs not chosen (fc1 writes the chosen ones):
// T * (N - k) slices, each nv vectors; consecutive threads write consecutive vectors of one slice.
template <typename V>
__global__ void zeroUnchosenKernel(const unsigned long long* __restrict__ bits, char* __restrict__ H, int T, int N,
                                   int unchosen, int64_t ldhBytes, int64_t sliceBytes) {
    const int nv = (int)(sliceBytes / sizeof(V));
    const int64_t total = (int64_t)T * unchosen * nv;
    const V z{};
    for (int64_t f = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; f < total; f += (int64_t)gridDim.x * blockDim.x) {
        const int64_t job = f / nv;
        const int c = (int)(f - job * nv);
        const int t = (int)(job / unchosen);
        int r = (int)(job - (int64_t)t * unchosen);
        const unsigned long long notChosen = ~bits[t];
        int e = 0;
        for (; e < N; ++e)
            if ((notChosen >> e) & 1ull) {
                if (r == 0) break;
                --r;
            }
        reinterpret_cast<V*>(H + (int64_t)t * ldhBytes + (int64_t)e * sliceBytes)[c] = z;
    }
}

// ------------------------------------------------------------------------------------------------
// GEMM  D[rowD(m), colOff + n] = epi( sum_k A[rowA(m), k] * B[n, k] + bias[n] )   ("NT": both K-contiguous)
// grouped over blockIdx.z: group g shifts B rows, bias and the D column offset by g*groupN, uses
// rowIdx + g*rowIdxStride for the rows and counts[g] for M.
// ------------------------------------------------------------------------------------------------

// Portable SIMT fallback (float32 path and shapes the tensor-core path does not take): 64x64 tile,
// 256 threads, 4x4 outputs per thread, fp32 accumulation.
template <typename T, bool GELU>
__global__ void __launch_bounds__(256) gemmSimtKernel(GemmArgs<T> p) {
    constexpr int BM = 64, BN = 64, BK = 16;
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const int g = blockIdx.z;
    const int M = p.counts ? p.counts[g] : p.M;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    if (m0 >= M) return;
    const int32_t* rowIdx = p.rowIdx ? p.rowIdx + g * p.rowIdxStride : nullptr;
    const T* B = p.B + (int64_t)g * p.groupN * p.ldb;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < p.K; k0 += BK) {
        for (int i = threadIdx.x; i < BM * BK; i += 256) {
            const int r = i / BK, c = i % BK;
            const int m = m0 + r, k = k0 + c;
            float v = 0.f;
            if (m < M && k < p.K) {
                const int64_t ar = rowIdx ? rowIdx[m] : m;
                v = Cvt<T>::toF(p.A[ar * p.lda + k]);
            }
            As[c][r] = v;
            const int n = n0 + r;
            float w = 0.f;
            if (n < p.N && k < p.K) w = Cvt<T>::toF(B[(int64_t)n * p.ldb + k]);
            Bs[c][r] = w;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) { a[i] = As[kk][ty * 4 + i]; b[i] = Bs[kk][tx * 4 + i]; }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    const T* bias = p.bias + (int64_t)g * p.groupN;
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m >= M) continue;
        const int64_t dr = rowIdx ? rowIdx[m] : m;
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx * 4 + j;
            if (n >= p.N) continue;
            float v = acc[i][j] + Cvt<T>::toF(bias[n]);
            if (GELU) v = geluTanh(v);
            p.D[dr * p.ldd + (int64_t)g * p.groupN + n] = Cvt<T>::fromF(v);
        }
    }
}

// Tensor-core path (fp16 / bf16 inputs, fp32 accumulation): mma.sync m16n8k16, ldmatrix, 3-stage cp.async
// pipeline. CTA tile 128 x BN x 32, 8 warps as 2 (M) x 4 (N), warp tile 64 x BN/4.
// Requirements (checked by the launcher): K % 32 == 0, lda/ldb multiples of 8 elements, 16-byte aligned
// A and B, N even.
template <typename T> struct MmaType;
template <> struct MmaType<__half> { static constexpr bool bf16 = false; };
template <> struct MmaType<__nv_bfloat16> { static constexpr bool bf16 = true; };

__device__ __forceinline__ void cpAsync16(uint32_t smem, const void* gmem, bool valid) {
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrixX4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

template <typename T> __device__ __forceinline__ uint32_t packPair(float x, float y);
template <> __device__ __forceinline__ uint32_t packPair<__half>(float x, float y) {
    __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t packPair<__nv_bfloat16>(float x, float y) {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
}

constexpr int kMmaBM = 128, kMmaBK = 32, kMmaStages = 3, kMmaThreads = 256, kSmemLd = kMmaBK + 8;

template <int BN>
constexpr int mmaSmemBytes() { return kMmaStages * (kMmaBM + BN) * kSmemLd * 2; }

template <typename T, int BN, bool GELU>
__global__ void __launch_bounds__(kMmaThreads, 1) gemmMmaKernel(GemmArgs<T> p) {
    constexpr int BM = kMmaBM, BK = kMmaBK, S = kMmaStages, LD = kSmemLd;
    constexpr int WN = BN / 4, NT = WN / 8;  // n8 tiles per warp
    constexpr int A_CHUNKS = BM * BK / 8 / kMmaThreads;  // 16-byte chunks per thread
    constexpr int B_CHUNKS = BN * BK / 8 / kMmaThreads;
    extern __shared__ __align__(16) unsigned char smemRaw[];
    T* sA = reinterpret_cast<T*>(smemRaw);
    T* sB = sA + S * BM * LD;

    const int g = blockIdx.z;
    const int M = p.counts ? p.counts[g] : p.M;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    if (m0 >= M) return;
    const int32_t* rowIdx = p.rowIdx ? p.rowIdx + g * p.rowIdxStride : nullptr;
    const T* Bg = p.B + (int64_t)g * p.groupN * p.ldb;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;

    // per-thread source rows (fixed over the K loop)
    const T* aSrc[A_CHUNKS];
    bool aOk[A_CHUNKS];
    uint32_t aDst[A_CHUNKS];
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
        const int c = tid + i * kMmaThreads;
        const int r = c / (BK / 8), kc = c % (BK / 8);
        const int m = m0 + r;
        aOk[i] = m < M;
        const int64_t ar = aOk[i] ? (rowIdx ? rowIdx[m] : m) : 0;
        aSrc[i] = p.A + ar * p.lda + kc * 8;
        aDst[i] = (uint32_t)__cvta_generic_to_shared(sA + r * LD + kc * 8);
    }
    const T* bSrc[B_CHUNKS];
    bool bOk[B_CHUNKS];
    uint32_t bDst[B_CHUNKS];
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
        const int c = tid + i * kMmaThreads;
        const int r = c / (BK / 8), kc = c % (BK / 8);
        const int n = n0 + r;
        bOk[i] = n < p.N;
        bSrc[i] = Bg + (int64_t)(bOk[i] ? n : 0) * p.ldb + kc * 8;
        bDst[i] = (uint32_t)__cvta_generic_to_shared(sB + r * LD + kc * 8);
    }
    const int KT = p.K / BK;
    auto loadStage = [&](int kt) {
        const int st = kt % S;
        const int64_t ko = (int64_t)kt * BK;
#pragma unroll
        for (int i = 0; i < A_CHUNKS; ++i) cpAsync16(aDst[i] + st * BM * LD * 2, aSrc[i] + ko, aOk[i]);
#pragma unroll
        for (int i = 0; i < B_CHUNKS; ++i) cpAsync16(bDst[i] + st * BN * LD * 2, bSrc[i] + ko, bOk[i]);
    };

    float acc[4][NT][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < KT) loadStage(s);
        cpAsyncCommit();
    }
    // ldmatrix lane addressing
    const int aRow = lane & 15, aCol = (lane >> 4) * 8;
    const int bRow = (lane & 7) + ((lane >> 4) << 3), bCol = ((lane >> 3) & 1) * 8;
    const uint32_t sABase = (uint32_t)__cvta_generic_to_shared(sA) + ((wm * 64 + aRow) * LD + aCol) * 2;
    const uint32_t sBBase = (uint32_t)__cvta_generic_to_shared(sB) + ((wn * WN + bRow) * LD + bCol) * 2;

    for (int kt = 0; kt < KT; ++kt) {
        cpAsyncWait<S - 2>();
        __syncthreads();
        if (kt + S - 1 < KT) loadStage(kt + S - 1);
        cpAsyncCommit();
        const int st = kt % S;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[4][4], bf[NT][2];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                ldmatrixX4(sABase + (st * BM * LD + i * 16 * LD + kk) * 2, af[i][0], af[i][1], af[i][2], af[i][3]);
#pragma unroll
            for (int j = 0; j < NT; j += 2)
                ldmatrixX4(sBBase + (st * BN * LD + j * 8 * LD + kk) * 2, bf[j][0], bf[j][1], bf[j + 1][0],
                           bf[j + 1][1]);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma16816<MmaType<T>::bf16>(acc[i][j], af[i], bf[j]);
        }
    }
    cpAsyncWait<0>();

    // epilogue: + bias, optional GELU, store pairs
    const T* bias = p.bias + (int64_t)g * p.groupN;
    T* D = p.D + (int64_t)g * p.groupN;
    const int gr = lane >> 2, gc = (lane & 3) * 2;
    float bv[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int n = n0 + wn * WN + j * 8 + gc;
        bv[j][0] = n < p.N ? Cvt<T>::toF(bias[n]) : 0.f;
        bv[j][1] = n + 1 < p.N ? Cvt<T>::toF(bias[n + 1]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m0 + wm * 64 + i * 16 + gr + h * 8;
            if (m >= M) continue;
            const int64_t dr = rowIdx ? rowIdx[m] : m;
            T* drow = D + dr * p.ldd;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int n = n0 + wn * WN + j * 8 + gc;
                if (n >= p.N) continue;
                float v0 = acc[i][j][2 * h] + bv[j][0];
                float v1 = acc[i][j][2 * h + 1] + bv[j][1];
                if (GELU) { v0 = geluTanhFast(v0); v1 = geluTanhFast(v1); }
                *reinterpret_cast<uint32_t*>(drow + n) = packPair<T>(v0, v1);
            }
        }
    }
}

#if defined(ACTVAR_HAVE_SM90A)
// The sm_90a kernels run on compute capability 9.0 only; ACTVAR_DISABLE_WGMMA=1 forces the portable path.
bool useWgmma() {
    static const bool disabled = [] {
        const char* v = std::getenv("ACTVAR_DISABLE_WGMMA");
        return v && v[0] && v[0] != '0';
    }();
    if (disabled) return false;
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return major == 9 && minor == 0;
}
#endif

// Token counts up to which the dense paths run (0 disables a path): the cuBLASLt dense path up to
// ACTVAR_DENSE_MAX_T (default 4096: on the H100, measured with alternating replays, it is faster than the routed
// path at d16 with 4064 tokens (1.10x vs 1.02x the dense FFN; at d30 the two are within 0.02) and slower from 6144
// tokens on, docs/benchmarks.md), the plugin's own masked-dense kernels (Hopper without cuBLASLt) up to
// ACTVAR_MASKED_DENSE_MAX_T (default 512).
int denseMaxTokens() {
    static const int v = envInt("ACTVAR_DENSE_MAX_T", 4096);
    return v;
}
#if defined(ACTVAR_HAVE_SM90A)
int maskedDenseMaxTokens() {
    static const int v = envInt("ACTVAR_MASKED_DENSE_MAX_T", 512);
    return v;
}
#endif

// The first two branches of expertFfnImpl, also reported by actvarExpertFfnPath (es: element size; float32 never
// takes them): the cuBLASLt dense path, then the masked-dense path on Hopper.
bool denseLtFirst(int T, size_t es) { return es == 2 && T <= denseMaxTokens() && ltAvailable(); }
#if defined(ACTVAR_HAVE_SM90A)
bool maskedDenseFirst(int T, size_t es) { return es == 2 && T <= maskedDenseMaxTokens() && useWgmma(); }
#endif

// ACTVAR_ZERO_PASS=1: the unchosen slices of H zeroed by the separate pass even where fc1 could (measurements).
bool zeroPassForced() {
    static const bool v = envInt("ACTVAR_ZERO_PASS", 0) != 0;
    return v;
}
// The routed path's fc2 (a dense GEMM over the masked H) through cuBLASLt when it is available, unless a tile
// configuration of the plugin's own kernel is forced (ACTVAR_FC2_CFG): cuBLAS's kernel is up to 16 % faster at
// C = 1920 and equal at C = 1024 (plugins/NOTES.md, v28).
bool fc2ByCublasLt() { return gemmCfgOverride(false) == 0 && ltAvailable(); }

// *restZeroed (if given) is set when the kernel also honoured p.zeroRest (the sm_90a warp-specialised one only).
template <typename T, bool GELU>
cudaError_t launchGemm(const GemmArgs<T>& p, int groups, int maxM, cudaStream_t stream, int numSms,
                       bool* restZeroed = nullptr) {
    bool mmaOk = false;
#if defined(ACTVAR_HAVE_SM90A)
    if constexpr (!std::is_same<T, float>::value) {
        if (useWgmma()) {
            const cudaError_t e = launchGemmSm90<T, GELU>(p, groups, maxM, numSms, stream, restZeroed);
            if (e != cudaErrorNotSupported) return e;
        }
    }
#endif
    if constexpr (!std::is_same<T, float>::value) {
        mmaOk = p.K % kMmaBK == 0 && p.lda % 8 == 0 && p.ldb % 8 == 0 && p.ldd % 2 == 0 && p.N % 2 == 0 &&
                ((uintptr_t)p.A % 16 == 0) && ((uintptr_t)p.B % 16 == 0) && ((uintptr_t)p.D % 4 == 0) &&
                ((int64_t)p.groupN * p.ldb) % 8 == 0 && p.groupN % 2 == 0;
    }
    if (mmaOk) {
        if constexpr (!std::is_same<T, float>::value) {
            // BN = 256 when the grid still fills the chip, else BN = 128 (twice the CTAs)
            const int64_t tiles256 = (int64_t)groups * ((maxM + kMmaBM - 1) / kMmaBM) * ((p.N + 255) / 256);
            if (tiles256 >= numSms) {
                constexpr int BN = 256;
                auto kern = gemmMmaKernel<T, BN, GELU>;
                cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, mmaSmemBytes<BN>());
                if (e != cudaSuccess) return e;
                dim3 grid((p.N + BN - 1) / BN, (maxM + kMmaBM - 1) / kMmaBM, groups);
                kern<<<grid, kMmaThreads, mmaSmemBytes<BN>(), stream>>>(p);
            } else {
                constexpr int BN = 128;
                auto kern = gemmMmaKernel<T, BN, GELU>;
                cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, mmaSmemBytes<BN>());
                if (e != cudaSuccess) return e;
                dim3 grid((p.N + BN - 1) / BN, (maxM + kMmaBM - 1) / kMmaBM, groups);
                kern<<<grid, kMmaThreads, mmaSmemBytes<BN>(), stream>>>(p);
            }
            return cudaGetLastError();
        }
    }
    dim3 grid((p.N + 63) / 64, (maxM + 63) / 64, groups);
    gemmSimtKernel<T, GELU><<<grid, 256, 0, stream>>>(p);
    return cudaGetLastError();
}

// out[m, n] = sum_s partial[s, m, n] + bias[n] (pairs of columns; C even)
template <typename T>
__global__ void splitReduceKernel(const float* __restrict__ partial, const T* __restrict__ bias, T* __restrict__ out,
                                  int M, int N, int split) {
    gridDependencyWait();
    const int64_t pairs = (int64_t)M * N / 2, plane = (int64_t)M * N;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t off = 2 * i;
        const int n = (int)(off % N);
        float2 acc = make_float2(Cvt<T>::toF(bias[n]), Cvt<T>::toF(bias[n + 1]));
        for (int s = 0; s < split; ++s) {
            const float2 v = *reinterpret_cast<const float2*>(partial + s * plane + off);
            acc.x += v.x;
            acc.y += v.y;
        }
        out[off] = Cvt<T>::fromF(acc.x);
        out[off + 1] = Cvt<T>::fromF(acc.y);
    }
}

struct WsLayout {
    size_t experts, bits, counts, chunkCounts, lists, hidden, partial, lt, total;
};
WsLayout wsLayout(int T, int C, int hidden, int N, int top_k, size_t es) {
    WsLayout w{};
    size_t off = 0;
    auto take = [&](size_t bytes) { size_t o = off; off += alignUp(bytes, 256); return o; };
    w.experts = take((size_t)T * top_k * sizeof(int32_t));
    w.bits = take((size_t)T * sizeof(unsigned long long));
    w.counts = take((size_t)N * sizeof(int32_t));
    w.chunkCounts = take((size_t)((T + kChunk - 1) / kChunk) * N * sizeof(int32_t));
    w.lists = take((size_t)N * T * sizeof(int32_t));
    w.hidden = take((size_t)T * hidden * es);
    const int split = es == 2 ? fc2SplitK(T, C, hidden) : 1;
    w.partial = take(split > 1 ? (size_t)split * T * C * sizeof(float) : 0);
    w.lt = take(es == 2 ? kLtWorkspaceBytes : 0);   // cuBLASLt's workspace (dense small-T path)
    w.total = off;
    return w;
}

// fc1 + b1 + GELU (gelu) or fc2 + b2 as one cuBLASLt GEMM: D[M, N] = epi(A[M, K] B[N, K]^T + bias); fp16/bf16 only.
template <typename T>
cudaError_t ltGemm(const T* A, int64_t lda, const T* B, int64_t ldb, const T* bias, T* D, int64_t ldd, int M, int N,
                   int K, bool gelu, void* lws, cudaStream_t stream) {
    const int dt = std::is_same<T, __half>::value ? ACTVAR_DTYPE_FLOAT16 : ACTVAR_DTYPE_BFLOAT16;
    return ltGemmNT(dt, A, lda, B, ldb, bias, D, ldd, M, N, K, gelu, lws, kLtWorkspaceBytes, stream);
}

// fc2 over the masked hidden activations + b2: one cuBLASLt GEMM when its workspace lws is given (fp16/bf16) and it
// takes the shape; else the plugin's GEMM, on Hopper with few output tiles split-K into fp32 partials and a
// reduction kernel that adds b2.
template <typename T>
cudaError_t launchFc2(const T* w2, const T* b2, T* out, const T* H, int Tn, int C, int hidden, float* partial,
                      int sms, cudaStream_t stream, void* lws, bool pdl = false) {
    if constexpr (!std::is_same<T, float>::value) {
        if (lws) {
            const cudaError_t e = ltGemm(H, hidden, w2, hidden, b2, out, C, Tn, C, hidden, false, lws, stream);
            if (e != cudaErrorNotSupported) return e;
        }
    }
    const GemmArgs<T> p2 = gemmNT(H, hidden, w2, hidden, b2, out, C, Tn, C, hidden);
#if defined(ACTVAR_HAVE_SM90A)
    if constexpr (!std::is_same<T, float>::value) {
        const int split = fc2SplitK(Tn, C, hidden);
        if (split > 1 && useWgmma()) {
            GemmArgs<T> ps = p2;
            ps.kSplit = split;
            ps.partial = partial;
            ps.pdl = pdl;
            const cudaError_t e = launchGemmSm90<T, false>(ps, 1, Tn, sms, stream);
            if (e == cudaSuccess) {
                const int64_t pairs = (int64_t)Tn * C / 2;
                const int blocks = (int)std::min<int64_t>((pairs + 255) / 256, (int64_t)sms * 8);
                return launchKernel(splitReduceKernel<T>, dim3(blocks), dim3(256), 0, stream, pdl,
                                    (const float*)ps.partial, b2, out, Tn, C, split);
            }
            if (e != cudaErrorNotSupported) return e;
        }
    }
#endif
    return launchGemm<T, false>(p2, 1, Tn, stream, sms);
}

template <typename T>
cudaError_t expertFfnImpl(const T* h, const float* logits, const T* w1, const T* b1, const T* w2, const T* b2, T* out,
                          int32_t* expertsOut, int Tn, int C, int hidden, int N, int k, char* ws, cudaStream_t stream) {
    const WsLayout L = wsLayout(Tn, C, hidden, N, k, sizeof(T));
    int32_t* experts = expertsOut ? expertsOut : reinterpret_cast<int32_t*>(ws + L.experts);
    auto* bits = reinterpret_cast<unsigned long long*>(ws + L.bits);
    auto* counts = reinterpret_cast<int32_t*>(ws + L.counts);
    auto* lists = reinterpret_cast<int32_t*>(ws + L.lists);
    T* H = reinterpret_cast<T*>(ws + L.hidden);
    auto* partial = reinterpret_cast<float*>(ws + L.partial);
    const int d = hidden / N;
    int device = 0, sms = 132;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);

    cudaError_t e = cudaSuccess;
    const int64_t sliceBytes = (int64_t)d * sizeof(T), ldhBytes = (int64_t)hidden * sizeof(T);
    char* Hb = reinterpret_cast<char*>(H);
    const bool v16 = sliceBytes % 16 == 0 && ldhBytes % 16 == 0;
    // Small and medium T, any GPU with cuBLASLt: dense path. fc1 + b1 + GELU over all hidden units and fc2 + b2 as cuBLASLt
    // GEMMs with fused epilogues; between them one kernel routes (one warp per token) and zeroes each token's
    // unchosen slices of H. Three launches, like the dense FFN (whose middle one, GELU, reads and writes all of
    // H; this one writes a quarter). Same result as the routed path up to fp32 summation order.
    if constexpr (!std::is_same<T, float>::value) {
        if (denseLtFirst(Tn, sizeof(T))) {
            void* lws = ws + L.lt;
            e = ltGemm(h, C, w1, C, b1, H, hidden, Tn, hidden, C, true, lws, stream);
            if (e == cudaSuccess) {
                const dim3 grid((Tn + 7) / 8), block(256);
                if (v16)
                    routeZeroKernel<uint4><<<grid, block, 0, stream>>>(logits, experts, Hb, Tn, N, k, ldhBytes,
                                                                        sliceBytes);
                else
                    routeZeroKernel<T><<<grid, block, 0, stream>>>(logits, experts, Hb, Tn, N, k, ldhBytes,
                                                                    sliceBytes);
                if ((e = cudaGetLastError()) != cudaSuccess) return e;
                return launchFc2(w2, b2, out, H, Tn, C, hidden, partial, sms, stream, lws);   // H is complete
            }
            if (e != cudaErrorNotSupported) return e;
        }
    }
#if defined(ACTVAR_HAVE_SM90A)
    // Small T (launch- and latency-bound), Hopper without cuBLASLt: masked-dense path. Routing in one kernel, fc1 over all hidden units
    // with GELU and the (token, expert) mask applied in the epilogue (unchosen slices become exact zeros), fc2
    // as in the routed path. Same result as the routed path, 3-4 launches instead of 7; it spends the 25 %
    // of fc1 FLOPs that routing would save, which at these sizes costs less than the routing kernels.
    if constexpr (!std::is_same<T, float>::value) {
        if (maskedDenseFirst(Tn, sizeof(T))) {
            // the four kernels are programmatic dependents of their predecessors (launch latency overlapped)
            e = launchKernel(routeBitsKernel, dim3((Tn + 7) / 8), dim3(256), 0, stream, true, (const float*)logits,
                             experts, bits, Tn, N, k);
            if (e != cudaSuccess) return e;
            GemmArgs<T> pm = gemmNT(h, C, w1, C, b1, H, hidden, Tn, hidden, C);
            pm.rowMask = bits; pm.maskCols = d;
            pm.pdl = true;
            e = launchGemmSm90<T, true>(pm, 1, Tn, sms, stream);
            if (e == cudaSuccess) return launchFc2(w2, b2, out, H, Tn, C, hidden, partial, sms, stream, nullptr, true);
            if (e != cudaErrorNotSupported) return e;   // else: the routed path below (routing is redone)
        }
    }
#endif
    {
        const int numChunks = (Tn + kChunk - 1) / kChunk;
        auto* chunkCounts = reinterpret_cast<int32_t*>(ws + L.chunkCounts);
        if (N <= kRouteMaxN) {
            routeCountKernel<<<numChunks, kChunk, 0, stream>>>(logits, experts, bits, chunkCounts, Tn, N, k);
        } else {
            routeBitsKernel<<<(Tn + 7) / 8, 256, 0, stream>>>(logits, experts, bits, Tn, N, k);
            if ((e = cudaGetLastError()) != cudaSuccess) return e;
            expertCountKernel<<<numChunks, kChunk, 0, stream>>>(bits, chunkCounts, Tn, N);
        }
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
        expertListsKernel<<<numChunks, kChunk, 0, stream>>>(bits, chunkCounts, lists, counts, Tn, N, numChunks);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }

    // fc1 + b1 + GELU over each expert's chosen tokens, written to H in token order
    GemmArgs<T> p1 = gemmNT(h, C, w1, C, b1, H, hidden, Tn, d, C);
    p1.groupN = d;
    p1.rowIdx = lists; p1.rowIdxStride = Tn;
    p1.counts = counts;
    // zeros for the unchosen (token, expert) slices of H (disjoint from what fc1 writes): by fc1's producer where
    // that kernel runs (the complements in the back of `lists`), else by a separate pass (ACTVAR_ZERO_PASS=1 forces it)
    p1.zeroRest = k < N && !zeroPassForced();
    bool zeroed = false;
    if ((e = launchGemm<T, true>(p1, N, Tn, stream, sms, &zeroed)) != cudaSuccess) return e;
    if (k < N && !zeroed) {
        const int64_t vecs = (int64_t)Tn * (N - k) * (sliceBytes / (v16 ? 16 : (int64_t)sizeof(T)));
        const int blocks = (int)std::min<int64_t>((vecs + 255) / 256, (int64_t)sms * 16);
        if (v16)
            zeroUnchosenKernel<uint4><<<blocks, 256, 0, stream>>>(bits, Hb, Tn, N, N - k, ldhBytes, sliceBytes);
        else
            zeroUnchosenKernel<T><<<blocks, 256, 0, stream>>>(bits, Hb, Tn, N, N - k, ldhBytes, sliceBytes);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }

    return launchFc2(w2, b2, out, H, Tn, C, hidden, partial, sms, stream, fc2ByCublasLt() ? ws + L.lt : nullptr);
}

}  // namespace
}  // namespace actvar

using namespace actvar;

extern "C" cudaError_t actvarExpertRoute(const float* logits, int32_t* experts, int T, int N, int top_k,
                                         cudaStream_t stream) {
    if (T < 0 || N < 1 || N > ACTVAR_MAX_EXPERTS || top_k < 1 || top_k > N) return cudaErrorInvalidValue;
    return actvarTopkAscending(logits, experts, T, N, top_k, stream);
}

extern "C" int actvarExpertFfnCublasLt(void) {
#if defined(ACTVAR_HAVE_CUBLASLT)
    return ltAvailable() ? 1 : 0;
#else
    return -1;
#endif
}

extern "C" int actvarExpertFfnPath(int T, int dtype) {
    const size_t es = elemSize(dtype);
    if (!es || T < 0) return -1;
    if (denseLtFirst(T, es)) return 0;
#if defined(ACTVAR_HAVE_SM90A)
    if (maskedDenseFirst(T, es)) return 1;
#endif
    return 2;
}

extern "C" size_t actvarExpertFfnWorkspaceSize(int T, int C, int hidden, int N, int top_k, int dtype) {
    const size_t es = elemSize(dtype);
    if (T <= 0 || !es || N < 1 || hidden < 1 || top_k < 1) return 0;
    return wsLayout(T, C, hidden, N, top_k, es).total;
}

extern "C" cudaError_t actvarExpertFfn(const void* h, const float* logits, const void* fc1_w, const void* fc1_b,
                                       const void* fc2_w, const void* fc2_b, void* out, int32_t* experts_out, int T,
                                       int C, int hidden, int N, int top_k, int dtype, void* workspace,
                                       size_t workspace_size, cudaStream_t stream) {
    const size_t es = elemSize(dtype);
    if (!es || T < 0 || C < 1 || N < 1 || N > ACTVAR_MAX_EXPERTS || hidden < N || hidden % N || top_k < 1 ||
        top_k > N)
        return cudaErrorInvalidValue;
    if (T == 0) return cudaSuccess;
    if (!h || !logits || !fc1_w || !fc1_b || !fc2_w || !fc2_b || !out || !workspace) return cudaErrorInvalidValue;
    if ((uintptr_t)workspace % 256 || workspace_size < actvarExpertFfnWorkspaceSize(T, C, hidden, N, top_k, dtype))
        return cudaErrorInvalidValue;
    char* ws = static_cast<char*>(workspace);
    switch (dtype) {
        case ACTVAR_DTYPE_FLOAT32:
            return expertFfnImpl<float>((const float*)h, logits, (const float*)fc1_w, (const float*)fc1_b,
                                        (const float*)fc2_w, (const float*)fc2_b, (float*)out, experts_out, T, C,
                                        hidden, N, top_k, ws, stream);
        case ACTVAR_DTYPE_FLOAT16:
            return expertFfnImpl<__half>((const __half*)h, logits, (const __half*)fc1_w, (const __half*)fc1_b,
                                         (const __half*)fc2_w, (const __half*)fc2_b, (__half*)out, experts_out, T, C,
                                         hidden, N, top_k, ws, stream);
        case ACTVAR_DTYPE_BFLOAT16:
            return expertFfnImpl<__nv_bfloat16>((const __nv_bfloat16*)h, logits, (const __nv_bfloat16*)fc1_w,
                                                (const __nv_bfloat16*)fc1_b, (const __nv_bfloat16*)fc2_w,
                                                (const __nv_bfloat16*)fc2_b, (__nv_bfloat16*)out, experts_out, T, C,
                                                hidden, N, top_k, ws, stream);
        default:
            return cudaErrorInvalidValue;
    }
}
