// Internal: dense GEMMs through cuBLASLt for the expert FFN's small-T path (dense_lt.cpp).
//
// cuBLASLt is not linked: libcublasLt.so.13 is opened at run time (the copy a framework such as PyTorch or
// TensorRT already loaded, else the one on the loader path). Without it, or when the library was built
// without the cuBLASLt header (ACTVAR_HAVE_CUBLASLT undefined), every call returns cudaErrorNotSupported and
// the caller uses the plugin's own kernels.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace actvar {

// Workspace cuBLASLt may use per call (part of the expert FFN workspace).
constexpr size_t kLtWorkspaceBytes = 8u << 20;

// D[M, N] = epi(A[M, K] B[N, K]^T + bias[N]), row-major with leading dimensions lda, ldb, ldd (elements);
// dtype ACTVAR_DTYPE_FLOAT16 or ACTVAR_DTYPE_BFLOAT16, fp32 accumulation; epi = GELU (tanh form) when gelu.
cudaError_t ltGemmNT(int dtype, const void* A, int64_t lda, const void* B, int64_t ldb, const void* bias, void* D,
                     int64_t ldd, int M, int N, int K, bool gelu, void* workspace, size_t workspaceBytes,
                     cudaStream_t stream);

// True when cuBLASLt could be opened and ACTVAR_DISABLE_CUBLASLT is not set to a non-zero value.
bool ltAvailable();

}  // namespace actvar
