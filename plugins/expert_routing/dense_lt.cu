// Dense GEMMs through cuBLASLt, opened at run time (see dense_lt.h). Host code only.
#include "dense_lt.h"

#include "actvar_common.cuh"

#if defined(ACTVAR_HAVE_CUBLASLT)
#include <cublasLt.h>
#include <dlfcn.h>

#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace actvar {
namespace {

struct LtApi {
    decltype(&cublasLtCreate) create = nullptr;
    decltype(&cublasLtMatmul) matmul = nullptr;
    decltype(&cublasLtMatmulDescCreate) descCreate = nullptr;
    decltype(&cublasLtMatmulDescSetAttribute) descSet = nullptr;
    decltype(&cublasLtMatrixLayoutCreate) layoutCreate = nullptr;
    decltype(&cublasLtMatmulPreferenceCreate) prefCreate = nullptr;
    decltype(&cublasLtMatmulPreferenceSetAttribute) prefSet = nullptr;
    decltype(&cublasLtMatmulPreferenceDestroy) prefDestroy = nullptr;
    decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
    bool ok = false;
};

const LtApi& api() {
    static const LtApi a = [] {
        LtApi l;
        if (envInt("ACTVAR_DISABLE_CUBLASLT", 0) != 0) return l;
        void* h = dlopen("libcublasLt.so.13", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);   // a framework's copy
        if (!h) h = dlopen("libcublasLt.so.13", RTLD_NOW | RTLD_LOCAL);
        if (!h) return l;
        bool all = true;
        auto sym = [&](auto& fn, const char* name) {
            fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
            all = all && fn != nullptr;
        };
        sym(l.create, "cublasLtCreate");
        sym(l.matmul, "cublasLtMatmul");
        sym(l.descCreate, "cublasLtMatmulDescCreate");
        sym(l.descSet, "cublasLtMatmulDescSetAttribute");
        sym(l.layoutCreate, "cublasLtMatrixLayoutCreate");
        sym(l.prefCreate, "cublasLtMatmulPreferenceCreate");
        sym(l.prefSet, "cublasLtMatmulPreferenceSetAttribute");
        sym(l.prefDestroy, "cublasLtMatmulPreferenceDestroy");
        sym(l.heuristic, "cublasLtMatmulAlgoGetHeuristic");
        l.ok = all;
        return l;
    }();
    return a;
}

// One plan per (device, shape, dtype, epilogue): descriptors and the heuristic's first algorithm, made once
// and kept for the process (a few hundred bytes each). The bias pointer is a descriptor attribute, so setting
// it and enqueueing the matmul happen under the plan's lock.
struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool ok = false;
    std::mutex lock;
};
using PlanKey = std::tuple<int, int, int64_t, int64_t, int64_t, int, int, int, bool, size_t, uint32_t>;

// Largest power of two (<= 256) dividing the address: cuBLASLt's heuristic otherwise assumes 256-byte aligned
// buffers and may pick an algorithm that faults on a view.
uint32_t alignOf(const void* p) {
    uint32_t a = 256;
    while (a > 1 && (reinterpret_cast<uintptr_t>(p) % a) != 0) a >>= 1;
    return a;
}

std::mutex gMutex;
std::map<int, cublasLtHandle_t> gHandles;
std::map<PlanKey, Plan> gPlans;

}  // namespace

bool ltAvailable() { return api().ok; }

cudaError_t ltGemmNT(int dtype, const void* A, int64_t lda, const void* B, int64_t ldb, const void* bias, void* D,
                     int64_t ldd, int M, int N, int K, bool gelu, void* workspace, size_t workspaceBytes,
                     cudaStream_t stream) {
    const LtApi& L = api();
    if (!L.ok || M <= 0 || N <= 0 || K <= 0) return cudaErrorNotSupported;
    cudaDataType_t dt;
    if (dtype == ACTVAR_DTYPE_FLOAT16) dt = CUDA_R_16F;
    else if (dtype == ACTVAR_DTYPE_BFLOAT16) dt = CUDA_R_16BF;
    else return cudaErrorNotSupported;
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return cudaErrorNotSupported;

    Plan* plan = nullptr;
    cublasLtHandle_t handle = nullptr;
    {
        std::lock_guard<std::mutex> g(gMutex);
        auto hit = gHandles.find(device);
        if (hit == gHandles.end()) {
            if (L.create(&handle) != CUBLAS_STATUS_SUCCESS) return cudaErrorNotSupported;
            gHandles[device] = handle;
        } else {
            handle = hit->second;
        }
        const uint32_t alA = alignOf(B), alB = alignOf(A), alD = alignOf(D);   // in cuBLAS's roles
        const PlanKey key{device, dtype, lda, ldb, ldd, M, N, K, gelu, workspaceBytes,
                          alA | (alB << 9) | (alD << 18)};
        auto pit = gPlans.find(key);
        if (pit == gPlans.end()) {
            Plan& p = gPlans[key];
            // Row-major D[M, N] = A B^T is column-major D^T[N, M] = op(B^T) op(A^T): cuBLAS's "A" is B^T
            // (column-major K x N, transposed), its "B" is A^T (column-major K x M), m = N, n = M, k = K.
            const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
            const cublasLtEpilogue_t epi = gelu ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
            bool ok = L.descCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
                      L.descSet(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof(tA)) == CUBLAS_STATUS_SUCCESS &&
                      L.descSet(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof(tB)) == CUBLAS_STATUS_SUCCESS &&
                      L.descSet(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)) == CUBLAS_STATUS_SUCCESS &&
                      L.descSet(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)) ==
                          CUBLAS_STATUS_SUCCESS &&
                      L.layoutCreate(&p.a, dt, K, N, ldb) == CUBLAS_STATUS_SUCCESS &&
                      L.layoutCreate(&p.b, dt, K, M, lda) == CUBLAS_STATUS_SUCCESS &&
                      L.layoutCreate(&p.d, dt, N, M, ldd) == CUBLAS_STATUS_SUCCESS;
            cublasLtMatmulPreference_t pref = nullptr;
            if (ok && L.prefCreate(&pref) == CUBLAS_STATUS_SUCCESS) {
                const uint64_t wsMax = workspaceBytes;
                cublasLtMatmulHeuristicResult_t res{};
                int found = 0;
                ok = L.prefSet(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsMax, sizeof(wsMax)) ==
                         CUBLAS_STATUS_SUCCESS &&
                     L.prefSet(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &alA, sizeof(alA)) ==
                         CUBLAS_STATUS_SUCCESS &&
                     L.prefSet(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &alB, sizeof(alB)) ==
                         CUBLAS_STATUS_SUCCESS &&
                     L.prefSet(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &alD, sizeof(alD)) ==
                         CUBLAS_STATUS_SUCCESS &&
                     L.prefSet(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &alD, sizeof(alD)) ==
                         CUBLAS_STATUS_SUCCESS &&
                     L.heuristic(handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &res, &found) ==
                         CUBLAS_STATUS_SUCCESS &&
                     found > 0;
                if (ok) p.algo = res.algo;
                L.prefDestroy(pref);
            } else {
                ok = false;
            }
            p.ok = ok;   // (a failed plan stays cached as failed: the caller falls back every time, cheaply)
            plan = &p;
        } else {
            plan = &pit->second;
        }
    }
    if (!plan->ok) return cudaErrorNotSupported;
    const float alpha = 1.f, beta = 0.f;
    std::lock_guard<std::mutex> g(plan->lock);
    if (L.descSet(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)) != CUBLAS_STATUS_SUCCESS)
        return cudaErrorUnknown;
    const cublasStatus_t s = L.matmul(handle, plan->desc, &alpha, B, plan->a, A, plan->b, &beta, D, plan->d, D,
                                      plan->d, &plan->algo, workspace, workspaceBytes, stream);
    if (s != CUBLAS_STATUS_SUCCESS) return cudaErrorUnknown;
    return cudaGetLastError();
}

}  // namespace actvar

#else  // built without the cuBLASLt header

namespace actvar {
bool ltAvailable() { return false; }
cudaError_t ltGemmNT(int, const void*, int64_t, const void*, int64_t, const void*, void*, int64_t, int, int, int, bool,
                     void*, size_t, cudaStream_t) {
    return cudaErrorNotSupported;
}
}  // namespace actvar

#endif
