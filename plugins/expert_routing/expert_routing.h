/* ActVAR expert routing + expert FFN over slices of a dense FFN (see expert_routing/CONTRACT.md).
 * Included by actvar_plugins.h; can also be included alone. */
#ifndef ACTVAR_EXPERT_ROUTING_H
#define ACTVAR_EXPERT_ROUTING_H

#include "../common/actvar_api.h"

#ifdef __cplusplus
extern "C" {
#endif

#define ACTVAR_MAX_EXPERTS 64

/* Per-token top-k over router logits [T, N] float32 -> experts [T, top_k] int32, ascending ids,
 * ties to the lower id. 1 <= top_k <= N <= ACTVAR_MAX_EXPERTS. */
ACTVAR_API cudaError_t actvarExpertRoute(const float* logits, int32_t* experts, int T, int N, int top_k, cudaStream_t stream);

/* Bytes of device workspace actvarExpertFfn needs (a pure function of the arguments; 0 when T == 0). */
ACTVAR_API size_t actvarExpertFfnWorkspaceSize(int T, int C, int hidden, int N, int top_k, int dtype);

/* out [T, C] = sum over the top_k experts e chosen for each token of
 *     GELU_tanh(h W1_e^T + b1_e) W2_e^T  + b2,
 * W1_e = fc1_w[e*d:(e+1)*d, :], b1_e = fc1_b[e*d:(e+1)*d], W2_e = fc2_w[:, e*d:(e+1)*d], d = hidden / N.
 * h [T, C], fc1_w [hidden, C], fc1_b [hidden], fc2_w [C, hidden], fc2_b [C], out [T, C]: all of `dtype`
 * (ActvarDataType), row-major contiguous. logits [T, N] float32. experts_out [T, top_k] int32 or NULL.
 * workspace: at least actvarExpertFfnWorkspaceSize(...) bytes, 256-byte aligned. out must not overlap h. */
ACTVAR_API cudaError_t actvarExpertFfn(const void* h, const float* logits, const void* fc1_w, const void* fc1_b,
                            const void* fc2_w, const void* fc2_b, void* out, int32_t* experts_out, int T, int C,
                            int hidden, int N, int top_k, int dtype, void* workspace, size_t workspace_size,
                            cudaStream_t stream);

/* Whether actvarExpertFfn's small-T dense path and its routed path's fc2 can use cuBLASLt: 1 = opened
 * (libcublasLt.so.13), 0 = not loadable or disabled by ACTVAR_DISABLE_CUBLASLT=1 (the plugin's own kernels run
 * instead), -1 = library built without the cuBLASLt header. */
ACTVAR_API int actvarExpertFfnCublasLt(void);

/* The path actvarExpertFfn tries first for T tokens of `dtype` on the current device, from the settings it reads
 * (ACTVAR_DENSE_MAX_T, ACTVAR_MASKED_DENSE_MAX_T, ACTVAR_DISABLE_CUBLASLT, ACTVAR_DISABLE_WGMMA): 0 = dense
 * (cuBLASLt GEMMs + one routing/masking kernel), 1 = masked-dense (the plugin's own sm_90a kernels: Hopper without
 * cuBLASLt, or T between the two thresholds), 2 = routed (routing, gathered fc1, fc2). A kernel that rejects the
 * arguments (e.g. misaligned pointers) makes a call fall through to the next path (dense -> masked-dense -> routed)
 * at run time. T = 0 reports the choice a call would make, though such a call returns at once. -1 for an unknown
 * dtype or T < 0. Host-only: no GPU needed (without one, 1 is never returned). */
ACTVAR_API int actvarExpertFfnPath(int T, int dtype);

#ifdef __cplusplus
}
#endif
#endif
