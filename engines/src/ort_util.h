// Small helpers over the ONNX Runtime C API (API version 29; newer runtimes answer it too).
#pragma once

#include <onnxruntime_c_api.h>

#include <string>

#include "internal.h"

namespace actvar {

const OrtApi& ort_api();   // throws Error when the loaded runtime is older than the headers

// Turns an OrtStatus into an Error with a context line; frees the status.
inline void ort_check(OrtStatus* st, const std::string& what) {
    if (!st) return;
    const OrtApi& api = ort_api();
    std::string msg = api.GetErrorMessage(st);
    api.ReleaseStatus(st);
    const size_t nl = msg.find('\n');
    throw Error(what + " (" + msg.substr(0, nl == std::string::npos ? 400 : std::min<size_t>(nl, 400)) + ")");
}

// The CPU implementations of the plugin lowering's custom ops (domain "actvar"), registered on a session's
// options; the domain object must outlive the sessions created with those options.
OrtCustomOpDomain* cpu_custom_op_domain();

}  // namespace actvar
