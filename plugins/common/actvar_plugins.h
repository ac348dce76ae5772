/* ActVAR plugin library: common definitions of the C API (libactvar_plugins.so).
 * All launchers are asynchronous on the given stream, take raw device pointers, and return
 * cudaSuccess, cudaErrorInvalidValue for arguments outside the contract, or the launch error. */
#ifndef ACTVAR_PLUGINS_H
#define ACTVAR_PLUGINS_H

#include "actvar_api.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of activation / weight tensors. Scores and router logits are always float32,
 * indices always int32. */
typedef enum {
    ACTVAR_DTYPE_FLOAT32 = 0,
    ACTVAR_DTYPE_FLOAT16 = 1,
    ACTVAR_DTYPE_BFLOAT16 = 2
} ActvarDataType;

/* Library version, major*10000 + minor*100 + patch. */
ACTVAR_API int actvarPluginsVersion(void);

#ifdef __cplusplus
}
#endif

#include "../token_scatter/token_scatter.h"
#include "../expert_routing/expert_routing.h"

#endif
