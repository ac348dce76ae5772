// Shared device helpers for the ActVAR plugins (internal header, not part of the C API).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <utility>

#include "actvar_plugins.h"

namespace actvar {

// Order-preserving map float -> uint32 (larger float -> larger key).
// -0.0 is folded onto +0.0 (they compare equal, as in torch.sort) and every NaN maps to the
// largest key (torch.sort(descending=True) puts NaN first, i.e. treats it as the largest value).
__device__ __forceinline__ uint32_t orderedKey(float f) {
    if (f != f) return 0xFFFFFFFFu;
    if (f == 0.0f) f = 0.0f;
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Integer setting from the environment (atoi of the value), dflt when unset.
inline int envInt(const char* name, int dflt) {
    const char* v = std::getenv(name);
    return v ? std::atoi(v) : dflt;
}

__host__ __device__ __forceinline__ size_t alignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

inline size_t elemSize(int dtype) {
    switch (dtype) {
        case ACTVAR_DTYPE_FLOAT32: return 4;
        case ACTVAR_DTYPE_FLOAT16: return 2;
        case ACTVAR_DTYPE_BFLOAT16: return 2;
        default: return 0;
    }
}

template <typename T> struct Cvt;
template <> struct Cvt<float> {
    __device__ __forceinline__ static float toF(float v) { return v; }
    __device__ __forceinline__ static float fromF(float v) { return v; }
};
template <> struct Cvt<__half> {
    __device__ __forceinline__ static float toF(__half v) { return __half2float(v); }
    __device__ __forceinline__ static __half fromF(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
    __device__ __forceinline__ static float toF(__nv_bfloat16 v) { return __bfloat162float(v); }
    __device__ __forceinline__ static __nv_bfloat16 fromF(float v) { return __float2bfloat16_rn(v); }
};

// GELU, tanh approximation (torch.nn.functional.gelu(approximate="tanh")).
__device__ __forceinline__ float geluTanh(float x) {
    const float k0 = 0.7978845608028654f;  // sqrt(2/pi)
    const float k1 = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(k0 * (x + k1 * x * x * x)));
}

// Same with the hardware tanh approximation (max relative error about 2^-11): used only where the result is
// rounded to fp16 / bf16 (2^-11 / 2^-8 relative), never on the float32 path.
__device__ __forceinline__ float geluTanhFast(float x) {
    const float k0 = 0.7978845608028654f;
    const float k1 = 0.044715f;
    const float u = k0 * (x + k1 * x * x * x);
    float t;
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(u));
    return 0.5f * x * (1.0f + t);
}

// Programmatic dependent launch (Hopper+): a kernel launched with launchKernel(..., pdl = true) may be scheduled
// while the previous kernel of the stream is still running; it must call gridDependencyWait() before it reads
// or writes anything that kernel touches. gridDependencyLaunch() lets the next such kernel be scheduled early.
// Both are no-ops on older GPUs and for kernels launched without the attribute.
__device__ __forceinline__ void gridDependencyWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void gridDependencyLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

template <typename... KArgs, typename... Args>
cudaError_t launchKernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                         Args&&... args) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace actvar
