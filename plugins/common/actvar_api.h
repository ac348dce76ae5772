/* Shared by every public header of libactvar_plugins: the CUDA runtime types and the export macro. */
#ifndef ACTVAR_API_H
#define ACTVAR_API_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifndef ACTVAR_API
#if defined(_WIN32)
#define ACTVAR_API
#else
#define ACTVAR_API __attribute__((visibility("default")))
#endif
#endif

#endif /* ACTVAR_API_H */
