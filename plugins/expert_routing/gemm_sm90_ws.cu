// Hopper (sm_90a) warp-specialised persistent GEMM fed by the Tensor Memory Accelerator (TMA).
// Same contract as gemm_sm90.cu (GemmArgs, no split-K); used for grids that fill the GPU.
//
// 384 threads = 3 warpgroups.
//   warpgroup 0, producer (40 registers): one thread issues every load of the CTA's tiles into a ring of kStages
//     128-byte-swizzled stages, one TMA box for A and one for B per stage; the stage's "full" mbarrier counts
//     the bytes (expect_tx), no thread waits for a copy to land.
//     GATHER (A rows through rowIdx: fc1 of the routed path; 96 registers): the 128 producer threads load A with
//     16-byte cp.async, each thread's arrival on "full" made by the hardware once its copies have landed
//     (cp.async.mbarrier.arrive.noinc); B still by TMA. (Gathered rows as 1-row TMA boxes were correct but
//     3-6x slower: TMA issue rate; plugins/NOTES.md, v10.) CL = 2 (the cooperative gathered fc1): clusters of
//     two CTAs take the two m-tiles of one (expert, n-tile) unit and share its B tile, each loading half of it by
//     TMA multicast into both; a stage is then free once the consumers of both CTAs released it (remote
//     mbarrier arrivals), so the two rings advance in step (plugins/NOTES.md, v29). With p.zeroRest they also
//     zero the group's other rows (the tail of rowIdx) in the tile's columns, as asynchronous bulk copies of a
//     zeroed shared-memory row (plugins/NOTES.md, v24).
//   warpgroups 1, 2, consumers (232 registers): before a tile's main loop, copy its bias columns into shared
//     memory and load its output rows (the epilogue then never waits for global memory: plugins/NOTES.md, v20);
//     wgmma on the stages, release each stage ("empty" mbarrier) once the wgmma group that read it has retired,
//     then the epilogue (bias, GELU, mask), staged through an 8 KB shared buffer per consumer into 16-byte row
//     chunks (sm90_util.cuh). In the cooperative gathered kernel a group's last n-tile of <= 224 columns runs
//     its main loop with m64n224 (narrowLast; plugins/NOTES.md, v36).
//     COOP: both consumers work on every 128 x BN tile (rows 64c..64c+63); else ping-pong: consumers take
//     alternate 128 x BN tiles, so one's epilogue overlaps the other's MMAs.
// Units L of CL m-tiles each (CTA rank r of a cluster takes m-tile CL * mUnit + r): L = (mUnit * groups + group) *
// nTiles + nTile, or for grouped GEMMs with large weights in bands of m-units (see unitAt), cluster c taking
// L = c, c + clusters, ...; the m-tiles per group follow the largest group's row count (read on the device);
// units whose first m-tile lies beyond a group's row count are skipped by all roles alike (an empty second m-tile
// still takes part: zero rows, no stores), so the ring position of step k of the CTA's j-th non-empty unit is
// j * KT + k for everybody. Ping-pong ordering ("turn" barriers): an mbarrier parity wait is only meaningful one
// phase ahead, so the consumer of tile j + 1 starts waiting on stages only after the consumer of tile j has
// acquired its last stage (see plugins/NOTES.md, v8).
#include "sm90_util.cuh"

#include <cuda.h>
#include <cudaTypedefs.h>

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "gemm_sm90_ws.cu must be compiled for sm_90a only"
#endif

namespace actvar {
namespace {
using namespace sm90;

constexpr int kWsThreads = 384;
constexpr int64_t kBandMinBBytes = 16 << 20;   // B operand size from which grouped GEMMs walk banded (launchTmaWs)

// Shared memory: the stages (1024-byte aligned), per consumer warpgroup an 8 KB staging buffer and two 512-byte
// bias buffers (alternate tiles), a 512-byte row of zeros (the source of the gathered producer's zero stores), then
// the mbarriers.
template <int BN, int kStages>
constexpr int wsSmemBytes() {
    return 1024 + kStages * (kBM + BN) * kBK * 2 + 2 * (8192 + 1024) + 512 + 8 * (2 * kStages + 2);
}

#if defined(ACTVAR_WS_TRACE)
// Probe builds only (benchmarks/gemm_probe.cu, -DACTVAR_WS_TRACE): cycle counts per CTA of the last launch.
// [0] tiles, [1] main-loop cycles, [2] of which waiting for full stages, [3] epilogue cycles (first consumer
// warpgroup), [4] producer cycles waiting for empty stages, [5] producer cycles in all, [6] first consumer's
// span in ns (globaltimer), [7] its span in cycles.
__device__ unsigned long long gWsTrace[kWsTraceCtas][8];
#define WS_TRACE(...) __VA_ARGS__
#else
#define WS_TRACE(...)
#endif

__device__ __forceinline__ void mbarInit(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarArrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarExpectTx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ uint64_t globalTimerNs() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// Waits for the phase of the given parity to complete. A wait longer than about 10 s is a protocol error:
// trap, so that the launch fails with an error instead of hanging the GPU.
__device__ __forceinline__ void mbarWait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0, spins = 0;
    uint64_t t0 = 0;
    for (;;) {
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
        if (done) return;
        if ((++spins & 1023u) == 0) {
            const uint64_t t = globalTimerNs();
            if (t0 == 0) t0 = t;
            else if (t - t0 > 10000000000ull) asm volatile("trap;");
        }
    }
}
// 2-D TMA load of the box at (c0 = column, c1 = row) into shared memory; completes bytes on `bar`.
__device__ __forceinline__ void tmaLoad2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

// Asynchronous bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from shared to global
// memory, in the thread's current bulk group.
__device__ __forceinline__ void bulkStore(void* dst, uint32_t src, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes)
                 : "memory");
}

// Arrival on the mbarrier at the same shared-memory offset in CTA `rank` of the cluster.
__device__ __forceinline__ void mbarArriveRemote(uint32_t bar, uint32_t rank) {
    asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
                 "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar), "r"(rank)
                 : "memory");
}
// As tmaLoad2d, but the box lands at the same offset in every CTA of ctaMask, each one's `bar` counting its bytes.
__device__ __forceinline__ void tmaLoad2dMulticast(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar,
                                                   uint16_t ctaMask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;\n"
        ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(ctaMask)
        : "memory");
}
__device__ __forceinline__ void clusterSync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void cpAsyncArriveNoinc(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

template <typename T, int BN, int kStages, bool GELU, bool COOP, bool GATHER, int CL>
__global__ void __launch_bounds__(kWsThreads, 1)
    gemmTmaWsKernel(GemmArgs<T> p, const __grid_constant__ CUtensorMap mapA, const __grid_constant__ CUtensorMap mapB,
                    int groups, int mTilesBound, int nTiles, int band, bool narrowLast) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int A_BYTES = kBM * kBK * 2, B_BYTES = BN * kBK * 2, STAGE = A_BYTES + B_BYTES;
    static_assert(kStages >= 2, "need at least 2 stages");
    static_assert(CL == 1 || (CL == 2 && GATHER && COOP), "clusters: the cooperative gathered kernel only");
    extern __shared__ unsigned char smemRaw[];
    __shared__ int sCount[ACTVAR_MAX_EXPERTS];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smemRaw);
    const uint32_t sbase = (raw + 1023u) & ~1023u;   // stages, 1024-byte aligned (128B swizzle atoms)
    const uint32_t stgBase = sbase + kStages * STAGE, biasBase = stgBase + 2 * 8192;
    const uint32_t zeroRow = biasBase + 2048;
    const uint32_t bars = zeroRow + 512;  // full[s] at bars + 8s, empty[s] at + 8(kStages + s), turn[c] at + 8(2 kStages + c)
    const int tid = threadIdx.x, wg = tid >> 7;
    if (tid < groups) sCount[tid] = p.counts ? p.counts[tid] : p.M;
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) {
            mbarInit(bars + 8 * s, GATHER ? 129 : 1);   // the expect_tx arrival (+ 128 cp.async arrivals)
            mbarInit(bars + 8 * (kStages + s), (COOP ? 8 : 4) * CL);   // one lane per consuming warp (of the cluster)
        }
        mbarInit(bars + 8 * (2 * kStages), 4);
        mbarInit(bars + 8 * (2 * kStages + 1), 4);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (GATHER && p.zeroRest && tid >= 32 && tid < 64) {   // the zero row, visible to the bulk copies (async proxy)
        asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(zeroRow + (tid - 32) * 16), "r"(0) : "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    if constexpr (CL > 1) clusterSync();   // the peer's barriers are initialised before anyone arrives on them
    else __syncthreads();
    const int KT = p.K / kBK;
    // m-tiles per group from the largest group's row count (on the device, in sCount), not the host's bound (the
    // routed fc1 passes T: a quarter of the units would lie beyond every group's rows and unbalance the CTAs' walks;
    // plugins/NOTES.md v37). Both CTAs of a cluster read the same counts, so they walk the same units.
    int mTiles = mTilesBound;
    if (p.counts) {
        int mx = 0;
        for (int g = 0; g < groups; ++g) mx = max(mx, sCount[g]);
        mTiles = max(1, min(mTilesBound, (mx + kBM - 1) / kBM));
    }
    // work units: CL consecutive m-tiles of one (group, n-tile), CTA rank r of a cluster taking m-tile CL * mu + r;
    // with CL = 2 the two CTAs share the B tile (each loads half of it and multicasts it to both)
    const int crank = CL > 1 ? (int)(blockIdx.x % CL) : 0, cid = blockIdx.x / CL, ncl = gridDim.x / CL;
    const int total = (mTiles + CL - 1) / CL * groups * nTiles;
    struct Unit {
        int nt, g, mt;   // n-tile, group, this CTA's m-tile
        bool empty;      // skipped by every role: the unit's first m-tile lies beyond the group's rows
    };
    // band > 0 (grouped GEMMs): bands of `band` m-units, within a band the m-units fastest, then n-tile, then group,
    // so that the CTAs running together share few B tiles and a band's A rows stay in L2 while every (group, n-tile)
    // passes over them; band = 0: (group, n-tile) fastest, m-units slowest
    const int mUnits = (mTiles + CL - 1) / CL, combos = groups * nTiles;
    const auto unitAt = [&](int L) {
        Unit u;
        int mu, c;
        if (band > 0) {
            const int b = L / (band * combos), m0 = b * band, len = min(band, mUnits - m0);
            const int i = L - m0 * combos;
            mu = m0 + i % len, c = i / len;
        } else {
            mu = L / combos, c = L % combos;
        }
        u.nt = c % nTiles;
        u.g = c / nTiles;
        u.mt = mu * CL + crank;
        u.empty = (u.mt - crank) * kBM >= sCount[u.g];
        return u;
    };

    if (wg == 0) {
        // ---------------- producer ----------------
        // the ring from the producer's side: wait until stage pos % kStages is free; its buffer and "full" barrier
        WS_TRACE(const long long pStart = clock64(); long long pWait = 0;)
        const auto acquireStage = [&](int pos, uint32_t& st, uint32_t& full) {
            const int s = pos % kStages;
            WS_TRACE(const long long tw = clock64();)
            mbarWait(bars + 8 * (kStages + s), ((pos / kStages) & 1) ^ 1);
            WS_TRACE(pWait += clock64() - tw;)
            st = sbase + (uint32_t)s * STAGE;
            full = bars + 8 * s;
        };
        const auto traceDone = [&] {   // the producer's totals, by thread 0
            WS_TRACE(if (tid == 0 && blockIdx.x < kWsTraceCtas) {
                gWsTrace[blockIdx.x][4] = pWait;
                gWsTrace[blockIdx.x][5] = clock64() - pStart;
            })
        };
        if constexpr (GATHER) {
            asm volatile("setmaxnreg.dec.sync.aligned.u32 96;\n" ::: "memory");
            const int ch = tid & 7, r0 = tid >> 3;   // 16-byte chunk ch of rows r0 + 16 i
            const uint32_t dOff = (uint32_t)r0 * 128u + (uint32_t)((ch ^ (r0 & 7)) << 4);
            if (tid == 0) asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&mapB)) : "memory");
            int pos = 0;
            for (int L = cid; L < total; L += ncl) {
                const Unit u = unitAt(L);
                const int nt = u.nt, g = u.g, mt = u.mt;
                const int M = sCount[g], m0 = mt * kBM, n0 = nt * BN;
                const int32_t* rowIdx = p.rowIdx + g * p.rowIdxStride;
                // p.zeroRest: this tile's share of the zeros of the group's other rows (rowIdx's tail), by bulk
                // copies of the zero row: issued after the tile's first loads (or alone for an empty tile)
                const auto zeros = [&] {
                    const int rest = p.M - M, per = (rest + mTiles - 1) / mTiles;
                    const int r1 = min(rest, (mt + 1) * per);
                    const uint32_t bytes = (uint32_t)min(BN, p.N - n0) * (uint32_t)sizeof(T);
                    T* Dg = p.D + (int64_t)g * p.groupN + n0;
                    for (int r = mt * per + tid; r < r1; r += 128)
                        bulkStore(Dg + (int64_t)__ldg(rowIdx + p.M - 1 - r) * p.ldd, zeroRow, bytes);
                    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
                };
                if (u.empty) {   // (its own m-tile may be empty in a non-empty unit: zero rows, no stores)
                    if (p.zeroRest && n0 < p.N) zeros();
                    continue;
                }
                const T* aRow[kBM / 16];
                uint32_t aOk = 0;
#pragma unroll
                for (int i = 0; i < kBM / 16; ++i) {
                    const int m = m0 + r0 + 16 * i;
                    aOk |= (m < M ? 1u : 0u) << i;
                    aRow[i] = p.A + (int64_t)(m < M ? __ldg(rowIdx + m) : 0) * p.lda + ch * 8;
                }
                const int bRow = g * p.groupN + n0;
                for (int kt = 0; kt < KT; ++kt, ++pos) {
                    uint32_t st, full;
                    acquireStage(pos, st, full);
                    if (tid == 0) {
                        mbarExpectTx(full, B_BYTES);
                        if constexpr (CL > 1)   // this CTA's BN / CL rows of B, into every CTA of the cluster
                            tmaLoad2dMulticast(st + A_BYTES + crank * (B_BYTES / CL), &mapB, kt * kBK,
                                               bRow + crank * (BN / CL), full, (uint16_t)((1u << CL) - 1));
                        else
                            tmaLoad2d(st + A_BYTES, &mapB, kt * kBK, bRow, full);
                    }
#pragma unroll
                    for (int i = 0; i < kBM / 16; ++i)
                        cpAsync16(st + dOff + i * 2048, aRow[i] + kt * kBK, (aOk >> i) & 1u);
                    cpAsyncArriveNoinc(full);
                    if (kt == 0 && p.zeroRest && n0 < p.N) zeros();
                }
            }
            asm volatile("cp.async.wait_all;\n" ::: "memory");
            asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");   // the zero stores (and their reads of zeroRow)
            traceDone();
            if constexpr (CL > 1) clusterSync();   // no CTA leaves while its peer may still write to it
            return;
        }
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (tid != 0) return;
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&mapA)) : "memory");
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&mapB)) : "memory");
        int pos = 0;
        for (int L = cid; L < total; L += ncl) {
            const Unit u = unitAt(L);
            if (u.empty) continue;
            const int m0 = u.mt * kBM, n0 = u.nt * BN, g = u.g;
            const int bRow = g * p.groupN + n0;
            for (int kt = 0; kt < KT; ++kt, ++pos) {
                uint32_t st, full;
                acquireStage(pos, st, full);
                mbarExpectTx(full, STAGE);
                tmaLoad2d(st, &mapA, kt * kBK, m0, full);
                tmaLoad2d(st + A_BYTES, &mapB, kt * kBK, bRow, full);
            }
        }
        traceDone();
        return;
    }

    // ---------------- consumers ----------------
    if constexpr (GATHER) asm volatile("setmaxnreg.inc.sync.aligned.u32 200;\n" ::: "memory");
    else asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1, t = tid & 127;
    const int lane = tid & 31;
    const uint32_t myTurn = bars + 8 * (2 * kStages + cw), otherTurn = bars + 8 * (2 * kStages + 1 - cw);
    const uint32_t stg = stgBase + cw * 8192;
    int ord = 0, turns = 0, mine = 0;
    // a stage is free once every consuming warp of the cluster has released it (the peer's multicast writes into it)
    const auto release = [crank](uint32_t empty) {
        mbarArrive(empty);
        if constexpr (CL > 1) mbarArriveRemote(empty, (uint32_t)(crank ^ 1));
    };
    WS_TRACE(const long long cStart = clock64(); const uint64_t nsStart = globalTimerNs();
             long long cMain = 0, cFull = 0, cEpi = 0, cTiles = 0; const bool tr = tid == 128;)
    for (int L = cid; L < total; L += ncl) {
        const Unit u = unitAt(L);
        if (u.empty) continue;
        const int g = u.g, M = sCount[g], m0 = u.mt * kBM, n0 = u.nt * BN;
        if (!COOP && (ord & 1) != cw) { ++ord; continue; }
        const int pos0 = ord++ * KT;
        if (!COOP && pos0 > 0) mbarWait(myTurn, (turns++) & 1);   // the previous tile has acquired its last stage
        constexpr int NSUB = COOP ? 1 : 2;      // 64-row sub-tiles of this consumer
        const int rowBase = COOP ? 64 * cw : 0;
        // the epilogue's bias columns and output rows, requested before the main loop (sm90_util.cuh)
        const int32_t* rowIdx = GATHER ? p.rowIdx + g * p.rowIdxStride : nullptr;
        // bias buffers alternate between this consumer's tiles: the barrier before tile j's epilogue orders
        // every read of tile j - 1's bias before tile j + 1's prefetch overwrites it
        const uint32_t biasSmem = biasBase + cw * 1024 + (mine++ & 1) * 512;
        prefetchBias<T, BN>(biasSmem, p.bias + (int64_t)g * p.groupN, n0, p.N, t);
        EpiRows rows[NSUB];
#pragma unroll
        for (int u = 0; u < NSUB; ++u) rows[u] = epiRows(t, m0 + rowBase + 64 * u, M, rowIdx);
        float acc[NSUB][BN / 2];
#pragma unroll
        for (int u = 0; u < NSUB; ++u)
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) acc[u][i] = 0.f;
        WS_TRACE(const long long t0 = clock64();)
        // the main loop, with the wgmma width a compile-time constant (a branch between the wgmmas of one
        // k-step would make ptxas serialise them: warning C7519)
        const auto mainLoop = [&](auto bnw) {
            constexpr int BW = decltype(bnw)::value;
            for (int kt = 0; kt < KT; ++kt) {
                const int pos = pos0 + kt, s = pos % kStages;
                WS_TRACE(const long long tw = clock64();)
                mbarWait(bars + 8 * s, (pos / kStages) & 1);
                WS_TRACE(if (tr) cFull += clock64() - tw;)
                if (GATHER) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // cp.async -> wgmma
                if (!COOP && kt == KT - 1 && lane == 0) mbarArrive(otherTurn);
                const uint32_t st = sbase + (uint32_t)s * STAGE;
                const uint64_t db = smemDesc(st + A_BYTES);
                asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
                for (int k = 0; k < kBK / 16; ++k)
#pragma unroll
                    for (int u = 0; u < NSUB; ++u)
                        wgmmaStep<T, BW>(acc[u], smemDesc(st + (rowBase + 64 * u) * 128) + 2 * k, db + 2 * k);
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                if (kt > 0 && lane == 0) release(bars + 8 * (kStages + (pos - 1) % kStages));
            }
        };
        if constexpr (BN == 256 && GATHER && COOP) {
            // a last n-tile of at most 224 columns (C = 1920: expert slices of 480 = 256 + 224) multiplies only
            // those (m64n224: 6.7 % fewer MACs at d30; plugins/NOTES.md v36); columns 224-255 keep their zeros and
            // lie beyond the group's N, so the epilogue does not store them
            if (narrowLast && p.N - n0 <= 224) mainLoop(std::integral_constant<int, 224>{});
            else mainLoop(std::integral_constant<int, BN>{});
        } else {
            mainLoop(std::integral_constant<int, BN>{});
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        if (lane == 0) release(bars + 8 * (kStages + (pos0 + KT - 1) % kStages));
        WS_TRACE(const long long t1 = clock64(); if (tr) { cMain += t1 - t0; ++cTiles; })

        // epilogue (sm90_util.cuh), staged through this consumer's buffer, one 64-row block at a time
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cw) : "memory");   // the bias columns are in shared memory
#pragma unroll
        for (int u = 0; u < NSUB; ++u)
            epilogueBlock64<T, BN, GELU>(p, acc[u], stg, t, m0 + rowBase + 64 * u, M, rowIdx, rows[u], biasSmem,
                                         p.D + (int64_t)g * p.groupN, n0);
        WS_TRACE(if (tr) cEpi += clock64() - t1;)
    }
    WS_TRACE(if (tr && blockIdx.x < kWsTraceCtas) {
        unsigned long long* o = gWsTrace[blockIdx.x];
        o[0] = cTiles; o[1] = cMain; o[2] = cFull; o[3] = cEpi;
        o[6] = globalTimerNs() - nsStart; o[7] = clock64() - cStart;
    })
    if constexpr (CL > 1) clusterSync();
#endif
}

#if defined(ACTVAR_WS_TRACE)
}  // namespace
int wsTraceFetch(unsigned long long (*out)[8], int maxCtas, unsigned long long* epi) {
    const int n = std::min(maxCtas, kWsTraceCtas);
    static unsigned long long zeros[kWsTraceCtas][8];
    if (cudaMemcpyFromSymbol(out, gWsTrace, sizeof(unsigned long long) * 8 * n) != cudaSuccess ||
        cudaMemcpyFromSymbol(epi, gEpiTrace, sizeof(unsigned long long) * 4) != cudaSuccess ||
        cudaMemcpyToSymbol(gEpiTrace, zeros, sizeof(unsigned long long) * 4) != cudaSuccess)
        return -1;
    return cudaMemcpyToSymbol(gWsTrace, zeros, sizeof(zeros)) == cudaSuccess ? n : -1;
}
namespace {
#endif

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encodeTiled() {
    static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void* f = nullptr;
        cudaDriverEntryPointQueryResult q{};
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
                cudaSuccess || q != cudaDriverEntryPointSuccess)
            f = nullptr;
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
    }();
    return fn;
}

// Row-major [rows, cols] matrix with leading dimension ld (elements); boxes of 64 columns x boxRows rows,
// 128-byte swizzle (the layout smemDesc describes); out-of-range rows read as zeros.
template <typename T>
bool makeMap(CUtensorMap* map, const T* base, int64_t rows, int64_t cols, int64_t ld, int boxRows) {
    const auto fn = encodeTiled();
    if (!fn) return false;
    const CUtensorMapDataType dt = std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                   : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)ld * sizeof(T)};
    const cuuint32_t box[2] = {(cuuint32_t)kBK, (cuuint32_t)boxRows};
    const cuuint32_t elemStrides[2] = {1, 1};
    return fn(map, dt, 2, const_cast<T*>(base), dims, strides, box, elemStrides, CU_TENSOR_MAP_INTERLEAVE_NONE,
              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// the gathered cooperative fc1's last n-tiles of <= 224 columns use m64n224 (ACTVAR_FC1_N224=0: m64n256 throughout)
bool narrowLastTiles() {
    static const bool v = envInt("ACTVAR_FC1_N224", 1) != 0;
    return v;
}
template <typename T, int BN, int S, bool GELU, bool COOP, bool GATHER = false, int CL = 1>
cudaError_t launchTmaWs(const GemmArgs<T>& p, int groups, int maxM, int numSms, cudaStream_t stream) {
    CUtensorMap mapA, mapB;
    const int64_t rowsB = (int64_t)(groups - 1) * p.groupN + p.N;
    if (!makeMap<T>(&mapA, p.A, p.M, p.K, p.lda, kBM) || !makeMap<T>(&mapB, p.B, rowsB, p.K, p.ldb, BN / CL))
        return cudaErrorNotSupported;
    auto kern = gemmTmaWsKernel<T, BN, S, GELU, COOP, GATHER, CL>;
    constexpr int smem = wsSmemBytes<BN, S>();
    static_assert(smem + 64 <= 227 * 1024, "shared memory of the warp-specialised kernel");
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    // (mTiles from the host's bound maxM: the grid and the band clamp are sized for it; the kernel walks only the
    // m-tiles of the largest group's row count, so with a loose bound some persistent CTAs may find no unit)
    const int mTiles = (maxM + kBM - 1) / kBM, nTiles = (p.N + BN - 1) / BN;
    // Grouped GEMMs (fc1 of the routed path) whose B operand (every group's weights) takes a third of the L2 or more
    // walk their units in bands of 8 m-units: with (group, n-tile) fastest the CTAs of one wave cycle through all of
    // B and the output stream evicts it (d30: 29.5 MB of W1; fc1 read 1.18 GB from DRAM for 0.12 GB of operands),
    // banded 0.60 GB and 2.6-3.7 % less energy per call; with a B that stays in L2 (d16: 8.4 MB) banding costs 1-3 %
    // (plugins/NOTES.md, v33). ACTVAR_FC1_BAND=n forces bands of n m-units (0: never).
    static const int bandEnv = envInt("ACTVAR_FC1_BAND", -1);
    const int64_t bBytes = rowsB * p.K * (int64_t)sizeof(T);
    const int band = std::min(groups <= 1 ? 0 : bandEnv >= 0 ? bandEnv : bBytes >= kBandMinBBytes ? 8 : 0,
                              (mTiles + CL - 1) / CL);   // (a band of all m-units walks them the same way)
    const int64_t units = (int64_t)(mTiles + CL - 1) / CL * groups * nTiles;
    if constexpr (CL == 1) {
        const int grid = (int)std::min<int64_t>(units, numSms);
        kern<<<grid, kWsThreads, smem, stream>>>(p, mapA, mapB, groups, mTiles, nTiles, band, narrowLastTiles());
        return cudaGetLastError();
    } else {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = CL;
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.blockDim = dim3(kWsThreads);
        cfg.dynamicSmemBytes = smem;
        cfg.stream = stream;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        cfg.gridDim = dim3(numSms / CL * CL);
        static int clusters = -1;   // co-resident clusters (GPCs need not hold an even number of SMs)
        if (clusters < 0) {
            int n = 0;
            if (cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess) {
                (void)cudaGetLastError();
                n = 0;
            }
            clusters = n;
        }
        if (clusters == 0) return cudaErrorNotSupported;   // the caller launches single CTAs
        cfg.gridDim = dim3((unsigned)(CL * std::min<int64_t>(units, clusters)));
        return cudaLaunchKernelEx(&cfg, kern, p, mapA, mapB, groups, mTiles, nTiles, band, narrowLastTiles());
    }
}

}  // namespace

// cfg: 11 = cooperative 128 x 256, 4 stages; 12 = ping-pong 128 x 128, 6 stages; 14 = cooperative 128 x 192,
// 5 stages (for N a multiple of 192 but not of 256, e.g. C = 1920). Gathered rows (rowIdx) only with GELU (fc1):
// ping-pong for cfg 12, else cooperative 128 x 256. Launched as an ordinary (not programmatic dependent) kernel.
// cudaErrorNotSupported outside the kernel's contract (split-K, misaligned, > 2^31 elements, no driver entry
// point), so that the caller can fall back.
template <typename T, bool GELU>
cudaError_t launchGemmSm90Ws(const GemmArgs<T>& p, int groups, int maxM, int numSms, int cfg, cudaStream_t stream,
                             bool* restZeroed) {
    const bool ok = p.kSplit <= 1 && (!p.rowIdx || GELU) && p.K % kBK == 0 && p.K > 0 && p.lda % 8 == 0 && p.ldb % 8 == 0 &&
                    (uintptr_t)p.A % 16 == 0 && (uintptr_t)p.B % 16 == 0 && (uintptr_t)p.D % 4 == 0 && (uintptr_t)p.bias % 4 == 0 &&
                    p.N % 2 == 0 && p.groupN % 2 == 0 && p.ldd % 2 == 0 && groups <= ACTVAR_MAX_EXPERTS &&
                    (!p.rowMask || p.maskCols % 2 == 0) && (int64_t)p.M * p.lda < ((int64_t)1 << 31) &&
                    (int64_t)maxM * p.ldd < ((int64_t)1 << 31) && (int64_t)p.M * p.ldd < ((int64_t)1 << 31);
    if (!ok) return cudaErrorNotSupported;
    if constexpr (GELU) {   // fc1 over gathered rows (the routed path): cp.async producer for A
        if (p.rowIdx) {
            // the zeros of p.zeroRest: whole 16-byte-aligned row pieces of at most 512 bytes
            GemmArgs<T> q = p;
            q.zeroRest = p.zeroRest && p.rowIdxStride == p.M && (uintptr_t)p.D % 16 == 0 &&
                         (p.ldd * sizeof(T)) % 16 == 0 && (p.groupN * sizeof(T)) % 16 == 0 &&
                         (p.N * sizeof(T)) % 16 == 0;
            // cooperative 128 x 256 tiles in clusters of two CTAs sharing B (ACTVAR_FC1_CLUSTER=1, or no room for
            // clusters: single CTAs)
            static const bool pairs = envInt("ACTVAR_FC1_CLUSTER", 2) == 2;
            cudaError_t e = cudaErrorNotSupported;
            if (cfg == 12) e = launchTmaWs<T, 128, 6, GELU, false, true>(q, groups, maxM, numSms, stream);
            else if (pairs) e = launchTmaWs<T, 256, 4, GELU, true, true, 2>(q, groups, maxM, numSms, stream);
            if (e == cudaErrorNotSupported && cfg != 12)
                e = launchTmaWs<T, 256, 4, GELU, true, true>(q, groups, maxM, numSms, stream);
            if (e == cudaSuccess && restZeroed) *restZeroed = q.zeroRest;
            return e;
        }
    }
    if (cfg == 12) return launchTmaWs<T, 128, 6, GELU, false>(p, groups, maxM, numSms, stream);
    if (cfg == 14) return launchTmaWs<T, 192, 5, GELU, true>(p, groups, maxM, numSms, stream);
    return launchTmaWs<T, 256, 4, GELU, true>(p, groups, maxM, numSms, stream);
}

template cudaError_t launchGemmSm90Ws<__half, true>(const GemmArgs<__half>&, int, int, int, int, cudaStream_t, bool*);
template cudaError_t launchGemmSm90Ws<__half, false>(const GemmArgs<__half>&, int, int, int, int, cudaStream_t, bool*);
template cudaError_t launchGemmSm90Ws<__nv_bfloat16, true>(const GemmArgs<__nv_bfloat16>&, int, int, int, int, cudaStream_t, bool*);
template cudaError_t launchGemmSm90Ws<__nv_bfloat16, false>(const GemmArgs<__nv_bfloat16>&, int, int, int, int, cudaStream_t, bool*);

}  // namespace actvar
