// Built with -DACTVAR_WITH_TENSORRT=OFF.
#include "internal.h"

namespace actvar {
std::unique_ptr<Engine> make_trt_engine(const Bundle&, const Options&) {
    throw Error("this actvar runtime was built without the TensorRT backend (-DACTVAR_WITH_TENSORRT=OFF)");
}
}  // namespace actvar
