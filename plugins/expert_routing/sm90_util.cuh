// Internal: helpers shared by the sm_90a GEMM kernels (gemm_sm90.cu, gemm_sm90_ws.cu).
#pragma once
#include "gemm_common.cuh"
#include "wgmma_ops.cuh"

namespace actvar {
namespace sm90 {

// Tile rows and K step of both Hopper kernels: A tiles of 128 rows; each stage holds 64 K-columns = one
// 128-byte swizzle row per matrix row (the layout smemDesc describes).
constexpr int kBM = 128, kBK = 64;

__device__ __forceinline__ void cpAsync16(uint32_t smem, const void* gmem, bool valid) {
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(bytes));
}

// 4-byte copy (fp16 / bf16 pairs of the bias); zeros when !valid.
__device__ __forceinline__ void cpAsync4(uint32_t smem, const void* gmem, bool valid) {
    const int bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(bytes));
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smemDesc(uint32_t addr) {
    uint64_t d = 0;
    d |= (uint64_t)((addr & 0x3FFFF) >> 4);
    d |= (uint64_t)1 << 16;              // leading byte offset (unused for swizzled K-major)
    d |= (uint64_t)(1024 >> 4) << 32;    // stride byte offset
    d |= (uint64_t)1 << 62;              // SWIZZLE_128B
    return d;
}

template <typename T> struct Pack;
template <> struct Pack<__half> {
    __device__ __forceinline__ static uint32_t pair(float x, float y) {
        __half2 v = __floats2half2_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Pack<__nv_bfloat16> {
    __device__ __forceinline__ static uint32_t pair(float x, float y) {
        __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

template <typename T, int BN>
__device__ __forceinline__ void wgmmaStep(float* acc, uint64_t da, uint64_t db) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        if constexpr (BN == 256) wgmmaM64N256K16Bf16(acc, da, db);
        else if constexpr (BN == 224) wgmmaM64N224K16Bf16(acc, da, db);
        else if constexpr (BN == 192) wgmmaM64N192K16Bf16(acc, da, db);
        else if constexpr (BN == 128) wgmmaM64N128K16Bf16(acc, da, db);
        else wgmmaM64N64K16Bf16(acc, da, db);
    } else {
        if constexpr (BN == 256) wgmmaM64N256K16F16(acc, da, db);
        else if constexpr (BN == 224) wgmmaM64N224K16F16(acc, da, db);
        else if constexpr (BN == 192) wgmmaM64N192K16F16(acc, da, db);
        else if constexpr (BN == 128) wgmmaM64N128K16F16(acc, da, db);
        else wgmmaM64N64K16F16(acc, da, db);
    }
}


// Epilogue of one warpgroup's 64 x BN block of wgmma accumulators, staged through shared memory so that the
// global stores are 16-byte row chunks instead of the accumulator layout's scattered 4-byte pairs.
// m64nBNk16 accumulators: thread t (warp w = t / 32, lane l) holds for each n8 block j rows 16w + l/4
// (regs 4j, 4j+1) and 16w + l/4 + 8 (regs 4j+2, 4j+3), columns 8j + 2(l%4) + {0,1}.
// Each warp stages only its own 16 rows (2 KB of the warpgroup's 8 KB buffer `stg`), so the staging needs no
// barrier beyond __syncwarp (plugins/NOTES.md, v26). Per 64 columns q: compute(q, pk) fills the thread's 16
// packed pairs (pk[2 jj + h]: n8 block 8q + jj, row h; arithmetic and its own loads only), written as four
// 8 x 8 matrices per stmatrix.x4 (16-byte chunks XOR-swizzled by row: neither phase has bank conflicts), read
// back row-wise as 16-byte chunks (all four loads before the first store) and handed to store(i, col, chunk)
// (i: which of its 4 rows, rows 16w + 4i + l/8 of the block: epiRows).
#if defined(ACTVAR_WS_TRACE)
namespace {
// Probe builds only: the epilogue's phases in cycles, summed over a launch by thread 128 of each CTA (the first
// consumer warpgroup of the warp-specialised kernel): [0] arithmetic + shared stores, [1] the first warp sync,
// [2] shared loads + global stores, [3] the second warp sync (read by wsTraceFetch, gemm_sm90_ws.cu).
__device__ unsigned long long gEpiTrace[4];
}  // namespace
#define EPI_TRACE(...) __VA_ARGS__
#else
#define EPI_TRACE(...)
#endif

template <int BN, class Compute, class Store>
__device__ __forceinline__ void stagedEpilogue64(uint32_t stg, int t, Compute compute, Store store) {
    static_assert(BN % 64 == 0, "column chunks of 64");
    const int lane = t & 31;
    const uint32_t wbuf = stg + (uint32_t)(t >> 5) * 2048u;   // this warp's 16 rows x 128 bytes
    // stmatrix: lane 8k + i addresses row i + 8 (k & 1) of matrix k, which is n8 block 2s + (k >> 1) of the
    // s-th x4 (registers pk[4s .. 4s + 3] = matrices 0 .. 3)
    const int mi = lane & 7, mk = lane >> 3;
    const uint32_t sRowAddr = wbuf + (uint32_t)(mi + 8 * (mk & 1)) * 128u;
#pragma unroll
    for (int q = 0; q < BN / 64; ++q) {
        EPI_TRACE(const long long c0 = clock64();)
        uint32_t pk[16];
        compute(q, pk);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            const uint32_t a = sRowAddr + ((uint32_t)((2 * s + (mk >> 1)) ^ mi) << 4);
            asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(a),
                         "r"(pk[4 * s]), "r"(pk[4 * s + 1]), "r"(pk[4 * s + 2]), "r"(pk[4 * s + 3])
                         : "memory");
        }
        EPI_TRACE(const long long c1 = clock64();)
        __syncwarp();
        EPI_TRACE(const long long c2 = clock64();)
        uint4 v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = 4 * i + (lane >> 3), c = lane & 7;
            const uint32_t a = wbuf + (uint32_t)row * 128u + ((uint32_t)(c ^ (row & 7)) << 4);
            asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(v[i].x), "=r"(v[i].y), "=r"(v[i].z), "=r"(v[i].w)
                         : "r"(a)
                         : "memory");
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) store(i, 64 * q + 8 * (lane & 7), v[i]);
        EPI_TRACE(const long long c3 = clock64();)
        __syncwarp();   // the buffer is reused by the next chunk
        EPI_TRACE(if (threadIdx.x == 128) {
            atomicAdd(&gEpiTrace[0], (unsigned long long)(c1 - c0));
            atomicAdd(&gEpiTrace[1], (unsigned long long)(c2 - c1));
            atomicAdd(&gEpiTrace[2], (unsigned long long)(c3 - c2));
            atomicAdd(&gEpiTrace[3], (unsigned long long)(clock64() - c3));
        })
    }
}

// Writes the 8 columns [n, n + 8) of one output row from a staged chunk: one 16-byte store when the chunk is
// whole and aligned, else the valid column pairs one by one (N and the row starts are even).
template <typename T>
__device__ __forceinline__ void storeChunk8(T* dst, int n, int N, uint4 v) {
    if (n + 8 <= N && ((uintptr_t)dst & 15) == 0) {
        *reinterpret_cast<uint4*>(dst) = v;
        return;
    }
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k)
        if (n + 2 * k < N) *reinterpret_cast<uint32_t*>(dst + 2 * k) = w[k];
}

// GELU(tanh) of a packed pair in fp16x2 / bf16x2 arithmetic on the pre-activation rounded to T (as the unfused
// FFN rounds fc1's output before its GELU): g = h + h tanh(x (c0 + c1 x^2)), h = x / 2. As many tanh as the float32
// form (sm_90 issues two MUFU.TANH per pair) but half the polynomial instructions and no conversion after the
// packing (plugins/NOTES.md, v26). Overflow of x^2 in fp16 gives u = +-inf, tanh = +-1, g = x or 0: the right limits.
#define ACTVAR_GELU_X2_PTX(ty)                                                                           \
    "{\n.reg .b32 x2, w, u, t, h;\n"                                                                     \
    "mul.rn." ty " x2, %1, %1;\n"                                                                        \
    "fma.rn." ty " w, x2, %3, %2;\n"                                                                     \
    "mul.rn." ty " u, %1, w;\n"                                                                          \
    "tanh.approx." ty " t, u;\n"                                                                         \
    "mul.rn." ty " h, %1, %4;\n"                                                                         \
    "fma.rn." ty " %0, h, t, h;\n}\n"
template <typename T>
__device__ __forceinline__ uint32_t geluPacked(uint32_t x) {
    uint32_t g;
    if constexpr (std::is_same<T, __nv_bfloat16>::value)   // c0 = 0.79788, c1 = 0.044715 c0, 0.5 as bf16 pairs
        asm(ACTVAR_GELU_X2_PTX("bf16x2") : "=r"(g) : "r"(x), "r"(0x3F4C3F4Cu), "r"(0x3D123D12u), "r"(0x3F003F00u));
    else                                                    // the same as fp16 pairs
        asm(ACTVAR_GELU_X2_PTX("f16x2") : "=r"(g) : "r"(x), "r"(0x3A623A62u), "r"(0x28912891u), "r"(0x38003800u));
    return g;
}
#undef ACTVAR_GELU_X2_PTX

// A packed pair of fp16 / bf16 values as two floats.
template <typename T>
__device__ __forceinline__ float2 unpackPair(uint32_t v) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));
    } else {
        __half2 h = *reinterpret_cast<__half2*>(&v);
        return __half22float2(h);
    }
}

// The epilogue's global inputs of a tile, requested before its main loop so that their latency hides behind the
// MMAs instead of stalling each 64-column chunk of the epilogue (plugins/NOTES.md, v20):
// prefetchBias: the tile's bias columns [n0, n0 + BN) (zeros from N on) copied into shared memory at dst
// (BN * 2 bytes) by the threads t < BN / 2 of a warpgroup; visible to the warpgroup after cp.async.wait_all and a
// barrier. epiRows: the output rows of the 4 staged rows 16 (t / 32) + 4 i + (t % 32) / 8 of a 64-row block
// (-1 past M).
template <typename T, int BN>
__device__ __forceinline__ void prefetchBias(uint32_t dst, const T* bias, int n0, int N, int t) {
    if (t < BN / 2) {
        const int n = n0 + 2 * t;
        cpAsync4(dst + 4 * t, n < N ? bias + n : bias, n < N);
    }
}
struct EpiRows {
    int32_t row[4];
};
__device__ __forceinline__ EpiRows epiRows(int t, int mb, int M, const int32_t* rowIdx) {
    EpiRows r;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = mb + 16 * (t >> 5) + 4 * i + ((t & 31) >> 3);
        r.row[i] = m < M ? (rowIdx ? __ldg(rowIdx + m) : m) : -1;
    }
    return r;
}

// The GEMM epilogue of one warpgroup's 64-row block (tile rows mb .. mb + 63, of which rows < M exist):
// + bias, optional GELU, optional expert mask (p.rowMask, p.maskCols), written through stagedEpilogue64 to
// D[rows.row[i]] (epiRows: rowIdx[m] for gathered rows, else m). D is already offset to the group's columns,
// biasSmem holds the tile's bias columns (prefetchBias, complete). The rows' mask bits are turned into one keep
// bit per n8 block up front.
template <typename T, int BN, bool GELU>
__device__ __forceinline__ void epilogueBlock64(const GemmArgs<T>& p, const float* acc, uint32_t stg, int t, int mb,
                                                int M, const int32_t* rowIdx, const EpiRows& rows, uint32_t biasSmem,
                                                T* D, int n0) {
    constexpr int NJ = BN / 8;
    static_assert(NJ <= 32, "one keep bit per n8 block in 32 bits");
    const int wl = t >> 5, lane = t & 31, c2 = 2 * (lane & 3);
    // expert mask: bit j of keepJ[h] = column pair (n0 + 8j + c2, +1) of row h kept (one expert: maskCols even)
    uint32_t keepJ[2] = {~0u, ~0u};
    if (p.rowMask) {
        unsigned long long keep[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = mb + wl * 16 + (lane >> 2) + 8 * h;
            keep[h] = m < M ? __ldg(p.rowMask + (rowIdx ? __ldg(rowIdx + m) : m)) : ~0ull;
        }
        int e = (n0 + c2) / p.maskCols, nextB = (e + 1) * p.maskCols;
        keepJ[0] = keepJ[1] = 0u;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int n = n0 + 8 * j + c2;
            while (n >= nextB) { ++e; nextB += p.maskCols; }
            if (e < 64) {   // (columns beyond the last expert are never stored)
                keepJ[0] |= (uint32_t)((keep[0] >> e) & 1ull) << j;
                keepJ[1] |= (uint32_t)((keep[1] >> e) & 1ull) << j;
            }
        }
    }
    auto compute = [&](int q, uint32_t(&pk)[16]) {
        uint32_t bpair[8];
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
            const uint32_t a = biasSmem + (uint32_t)(64 * q + 8 * jj + c2) * 2u;
            asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(bpair[jj]) : "r"(a) : "memory");
        }
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
            const int j = 8 * q + jj;
            const float2 b = unpackPair<T>(bpair[jj]);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                uint32_t x = Pack<T>::pair(acc[4 * j + 2 * h] + b.x, acc[4 * j + 2 * h + 1] + b.y);
                if (GELU) x = geluPacked<T>(x);
                pk[2 * jj + h] = ((keepJ[h] >> j) & 1u) ? x : 0u;   // columns >= N: never stored
            }
        }
    };
    auto store = [&](int i, int col, uint4 v) {
        if (rows.row[i] >= 0) storeChunk8(D + (int64_t)rows.row[i] * p.ldd + n0 + col, n0 + col, p.N, v);
    };
    stagedEpilogue64<BN>(stg, t, compute, store);
}

}  // namespace sm90
}  // namespace actvar
