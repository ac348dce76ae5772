/* ActVAR token selection / gather / scatter-reconstruction (see token_scatter/CONTRACT.md).
 * Included by actvar_plugins.h; can also be included alone. */
#ifndef ACTVAR_TOKEN_SCATTER_H
#define ACTVAR_TOKEN_SCATTER_H

#include "../common/actvar_api.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Per-row top-K with the ActVAR tie rule, result in ascending position order.
 * scores [rows, L] float32, idx [rows, K] int32. 1 <= K <= L <= ACTVAR_TOPK_MAX_L. */
#define ACTVAR_TOPK_MAX_L 8192
ACTVAR_API cudaError_t actvarTopkAscending(const float* scores, int32_t* idx, int rows, int L, int K,
                                cudaStream_t stream);

/* Token selection: idx [S, K] int32 = ascending positions of the K highest scores [S, L]. */
ACTVAR_API cudaError_t actvarTokenSelect(const float* scores, int32_t* idx, int S, int L, int K, cudaStream_t stream);

/* Gather: x [S, L, C] -> x_sel [S, K, C], x_sel[s, k, :] = x[s, idx[s, k], :]. dtype: ActvarDataType. */
ACTVAR_API cudaError_t actvarTokenGather(const void* x, const int32_t* idx, void* x_sel, int S, int L, int K, int C,
                              int dtype, cudaStream_t stream);

/* Scatter-reconstruction: out [S, L, C] = x with rows idx[s, :] replaced by upd [S, K, C].
 * out == x (in place) writes only the K selected rows of each sequence; otherwise out must not overlap
 * x or upd, and every element of out is written. */
ACTVAR_API cudaError_t actvarTokenScatter(const void* x, const int32_t* idx, const void* upd, void* out, int S, int L,
                               int K, int C, int dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
