// Small helpers over the ONNX Runtime C API (API version 29; newer runtimes answer it too).
#pragma once

#include <onnxruntime_c_api.h>

#include <algorithm>
#include <string>

#include "internal.h"

namespace actvar {

const OrtApi& ort_api();   // throws Error when the loaded runtime is older than the headers

// The first line of an OrtStatus's message (at most 400 characters); frees the status.
inline std::string ort_message(OrtStatus* st) {
    const OrtApi& api = ort_api();
    std::string msg = api.GetErrorMessage(st);
    api.ReleaseStatus(st);
    return msg.substr(0, std::min<size_t>(msg.find('\n'), 400));
}

// Turns an OrtStatus into an Error with a context line.
inline void ort_check(OrtStatus* st, const std::string& what) {
    if (st) throw Error(what + " (" + ort_message(st) + ")");
}

// The CPU implementations of the plugin lowering's custom ops (domain "actvar"), registered on a session's
// options; the domain object must outlive the sessions created with those options.
OrtCustomOpDomain* cpu_custom_op_domain();

}  // namespace actvar
