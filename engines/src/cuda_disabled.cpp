// Built without the CUDA toolkit (or with -DACTVAR_WITH_CUDA=OFF): the ONNX Runtime backend runs on the CPU only.
#include "cuda_device.h"
#include "internal.h"

namespace actvar {
std::unique_ptr<CudaDevice> open_cuda_device(int) {
    throw Error("--device cuda: this actvar runtime was built without the CUDA toolkit (-DACTVAR_WITH_CUDA=OFF or no "
                "CUDA toolkit found): rebuild with it, or use --device cpu");
}
}  // namespace actvar
