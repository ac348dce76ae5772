/* ONNX Runtime custom-op library (libactvar_ort_ops.so): ActVarTokenScatter and ActVarExpertFFN of the `actvar`
 * domain as CUDAExecutionProvider kernels, running the launchers of libactvar_plugins (actvar::kernels).
 *
 * C API only (no link to libonnxruntime): ONNX Runtime calls RegisterCustomOps(options, api_base) when the library is
 * registered (SessionOptions.register_custom_ops_library); the library asks api_base for OrtApi version 29.
 * Kernels run on the session's CUDA stream (KernelContext_GetGPUComputeStream), take the expert FFN's workspace from
 * the execution provider's allocator (KernelContext_GetScratchBuffer: stream-ordered, from the arena), never
 * synchronise and report errors as OrtStatus. Attributes are checked when ONNX Runtime creates the kernel. */
#include <onnxruntime_c_api.h>

#include "actvar_plugins.h"

#include <climits>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr uint32_t kOrtApi = 29;   // OrtApi version requested from the runtime (1.29 and later answer it)
constexpr const char* kDomain = "actvar";
constexpr const char* kProvider = "CUDAExecutionProvider";
constexpr const char* kPluginVersion = "1";
const OrtApi* gApi = nullptr;

OrtStatus* error(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
    return gApi->CreateStatus(code, msg.c_str());
}

#define ACTVAR_ORT_RETURN(expr)            \
    do {                                   \
        if (OrtStatus* _s = (expr)) return _s; \
    } while (0)

int actvarDtype(ONNXTensorElementDataType t) {
    switch (t) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return ACTVAR_DTYPE_FLOAT32;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return ACTVAR_DTYPE_FLOAT16;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return ACTVAR_DTYPE_BFLOAT16;
        default: return -1;
    }
}

// Shape of an input tensor (a reference into the OrtValue: nothing allocated).
struct Shape {
    const int64_t* d = nullptr;
    size_t rank = 0;
    int64_t operator[](size_t i) const { return d[i]; }
};

OrtStatus* inputShape(OrtKernelContext* ctx, size_t i, const OrtValue** v, Shape* s) {
    ACTVAR_ORT_RETURN(gApi->KernelContext_GetInput(ctx, i, v));
    ONNXTensorElementDataType t;
    return gApi->GetTensorElementTypeAndShapeDataReference(*v, &t, &s->d, &s->rank);
}

std::string dims(const Shape& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.rank; ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
}

bool fitsInt(int64_t v) { return v >= 0 && v <= INT_MAX; }

OrtStatus* cudaStatus(const std::string& node, const char* fn, cudaError_t e) {
    if (e == cudaSuccess) return nullptr;
    return error(node + ": " + fn + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")",
                 e == cudaErrorInvalidValue ? ORT_INVALID_ARGUMENT : ORT_RUNTIME_EXCEPTION);
}

// ---- attributes (read once, at kernel creation) ----
OrtStatus* nodeName(const OrtKernelInfo* info, const char* op, std::string* out) {
    size_t n = 0;
    ACTVAR_ORT_RETURN(gApi->KernelInfo_GetNodeName(info, nullptr, &n));
    std::string name(n, '\0');
    ACTVAR_ORT_RETURN(gApi->KernelInfo_GetNodeName(info, name.data(), &n));
    name.resize(n && name[n - 1] == '\0' ? n - 1 : n);
    *out = std::string(op) + " node '" + name + "'";
    return nullptr;
}

// A string attribute; `present` false (and no error) when the node lacks it.
OrtStatus* stringAttr(const OrtKernelInfo* info, const char* name, std::string* out, bool* present) {
    size_t n = 0;
    if (OrtStatus* s = gApi->KernelInfoGetAttribute_string(info, name, nullptr, &n)) {
        gApi->ReleaseStatus(s);
        *present = false;
        return nullptr;
    }
    std::string v(n, '\0');
    ACTVAR_ORT_RETURN(gApi->KernelInfoGetAttribute_string(info, name, v.data(), &n));
    v.resize(n && v[n - 1] == '\0' ? n - 1 : n);
    *out = v;
    *present = true;
    return nullptr;
}

OrtStatus* intAttr(const OrtKernelInfo* info, const std::string& node, const char* name, int64_t* out) {
    if (OrtStatus* s = gApi->KernelInfoGetAttribute_int64(info, name, out)) {
        gApi->ReleaseStatus(s);
        return error(node + ": integer attribute " + name + " missing");
    }
    return nullptr;
}

// plugin_version must be "1"; plugin_namespace, a TensorRT notion, must be empty when present.
OrtStatus* checkPluginAttrs(const OrtKernelInfo* info, const std::string& node) {
    std::string v;
    bool present = false;
    ACTVAR_ORT_RETURN(stringAttr(info, "plugin_version", &v, &present));
    if (!present) return error(node + ": attribute plugin_version missing (this library implements version 1)");
    if (v != kPluginVersion)
        return error(node + ": plugin_version '" + v + "' is not implemented (this library implements version 1)");
    ACTVAR_ORT_RETURN(stringAttr(info, "plugin_namespace", &v, &present));
    if (present && !v.empty()) return error(node + ": plugin_namespace '" + v + "' is not served (only \"\")");
    return nullptr;
}

OrtStatus* stream(OrtKernelContext* ctx, const std::string& node, cudaStream_t* s) {
    void* p = nullptr;
    ACTVAR_ORT_RETURN(gApi->KernelContext_GetGPUComputeStream(ctx, &p));
    if (!p) return error(node + ": no CUDA compute stream (the op runs only on CUDAExecutionProvider)", ORT_FAIL);
    *s = static_cast<cudaStream_t>(p);
    return nullptr;
}

struct Kernel {
    std::string node;
    virtual ~Kernel() = default;
    virtual OrtStatus* compute(OrtKernelContext* ctx) = 0;
};

// ---- ActVarTokenScatter: out [S, L, C] = x with rows idx [S, K] (int32) replaced by upd [S, K, C] ----
struct TokenScatter final : Kernel {
    int dtype;
    explicit TokenScatter(int dt) : dtype(dt) {}

    OrtStatus* compute(OrtKernelContext* ctx) override {
        const OrtValue *x, *idx, *upd;
        Shape sx, si, su;
        ACTVAR_ORT_RETURN(inputShape(ctx, 0, &x, &sx));
        ACTVAR_ORT_RETURN(inputShape(ctx, 1, &idx, &si));
        ACTVAR_ORT_RETURN(inputShape(ctx, 2, &upd, &su));
        if (sx.rank != 3 || si.rank != 2 || su.rank != 3 || si[0] != sx[0] || su[0] != sx[0] || su[1] != si[1] ||
            su[2] != sx[2])
            return error(node + ": shapes x " + dims(sx) + ", idx " + dims(si) + ", upd " + dims(su) +
                         " are not x [S, L, C], idx [S, K], upd [S, K, C]");
        const int64_t S = sx[0], L = sx[1], C = sx[2], K = si[1];
        if (!fitsInt(S) || !fitsInt(L) || !fitsInt(C) || K > L)
            return error(node + ": shapes x " + dims(sx) + ", idx " + dims(si) + " outside the kernel's range");
        OrtValue* out;
        ACTVAR_ORT_RETURN(gApi->KernelContext_GetOutput(ctx, 0, sx.d, 3, &out));
        if (S * L * C == 0) return nullptr;
        const void *px, *pi, *pu;
        void* po;
        ACTVAR_ORT_RETURN(gApi->GetTensorData(x, &px));
        ACTVAR_ORT_RETURN(gApi->GetTensorData(idx, &pi));
        ACTVAR_ORT_RETURN(gApi->GetTensorData(upd, &pu));
        ACTVAR_ORT_RETURN(gApi->GetTensorMutableData(out, &po));
        cudaStream_t st;
        ACTVAR_ORT_RETURN(stream(ctx, node, &st));
        // po == px when ONNX Runtime let the output reuse x (declared may-inplace): only the K rows are written
        return cudaStatus(node, "actvarTokenScatter",
                          actvarTokenScatter(px, static_cast<const int32_t*>(pi), pu, po, (int)S, (int)L, (int)K,
                                             (int)C, dtype, st));
    }
};

// ---- ActVarExpertFFN: (h [T, C], router [T, N] f32, fc1_w, fc1_b, fc2_w, fc2_b) -> (out [T, C], experts [T, k]) ----
struct ExpertFfn final : Kernel {
    int dtype, N, topK;
    OrtAllocator* alloc = nullptr;   // the execution provider's device allocator (frees the scratch buffers)
    ExpertFfn(int dt, int n, int k) : dtype(dt), N(n), topK(k) {}
    ~ExpertFfn() override {
        if (alloc) gApi->ReleaseAllocator(alloc);
    }

    OrtStatus* compute(OrtKernelContext* ctx) override {
        const OrtValue* v[6];
        Shape s[6];
        for (size_t i = 0; i < 6; ++i) ACTVAR_ORT_RETURN(inputShape(ctx, i, &v[i], &s[i]));
        const Shape &h = s[0], &r = s[1], &w1 = s[2], &b1 = s[3], &w2 = s[4], &b2 = s[5];
        if (h.rank != 2 || r.rank != 2 || w1.rank != 2 || b1.rank != 1 || w2.rank != 2 || b2.rank != 1 ||
            r[0] != h[0] || w1[1] != h[1] || b1[0] != w1[0] || w2[0] != h[1] || w2[1] != w1[0] || b2[0] != h[1])
            return error(node + ": shapes h " + dims(h) + ", router " + dims(r) + ", fc1_w " + dims(w1) + ", fc1_b " +
                         dims(b1) + ", fc2_w " + dims(w2) + ", fc2_b " + dims(b2) +
                         " are not h [T, C], router [T, N], fc1_w [H, C], fc1_b [H], fc2_w [C, H], fc2_b [C]");
        const int64_t T = h[0], C = h[1], hidden = w1[0];
        if (r[1] != N) return error(node + ": router has " + std::to_string(r[1]) + " columns, num_experts is " +
                                    std::to_string(N));
        if (!fitsInt(T) || !fitsInt(C) || !fitsInt(hidden) || C == 0 || hidden % N != 0)
            return error(node + ": hidden " + std::to_string(hidden) + " / C " + std::to_string(C) +
                         " / T " + std::to_string(T) + " outside the kernel's range (hidden a multiple of num_experts " +
                         std::to_string(N) + ")");
        OrtValue *out, *experts;
        const int64_t outDims[2] = {T, C}, expDims[2] = {T, topK};
        ACTVAR_ORT_RETURN(gApi->KernelContext_GetOutput(ctx, 0, outDims, 2, &out));
        ACTVAR_ORT_RETURN(gApi->KernelContext_GetOutput(ctx, 1, expDims, 2, &experts));
        if (T == 0) return nullptr;
        const void* p[6];
        for (size_t i = 0; i < 6; ++i) ACTVAR_ORT_RETURN(gApi->GetTensorData(v[i], &p[i]));
        void *po, *pe;
        ACTVAR_ORT_RETURN(gApi->GetTensorMutableData(out, &po));
        ACTVAR_ORT_RETURN(gApi->GetTensorMutableData(experts, &pe));
        cudaStream_t st;
        ACTVAR_ORT_RETURN(stream(ctx, node, &st));

        // workspace: stream-ordered from the provider's arena, 256-byte aligned as the launcher requires
        const size_t ws = actvarExpertFfnWorkspaceSize((int)T, (int)C, (int)hidden, N, topK, dtype);
        void* raw = nullptr;
        ACTVAR_ORT_RETURN(gApi->KernelContext_GetScratchBuffer(ctx, alloc->Info(alloc), ws + 256, &raw));
        if (!raw) return error(node + ": no workspace of " + std::to_string(ws) + " bytes", ORT_FAIL);
        void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw) + 255) & ~uintptr_t(255));
        const cudaError_t e = actvarExpertFfn(p[0], static_cast<const float*>(p[1]), p[2], p[3], p[4], p[5], po,
                                              static_cast<int32_t*>(pe), (int)T, (int)C, (int)hidden, N, topK, dtype,
                                              aligned, ws, st);
        alloc->Free(alloc, raw);   // the arena hands it out again only in stream order
        return cudaStatus(node, "actvarExpertFfn", e);
    }
};

// ---- the OrtCustomOp descriptors: one per (op, element type) ----
struct OpDef : OrtCustomOp {
    using Make = OrtStatus* (*)(const OpDef&, const OrtKernelInfo*, const std::string&, Kernel**);
    using Infer = OrtStatus*(ORT_API_CALL*)(const OrtCustomOp*, OrtShapeInferContext*);
    const char* name;
    ONNXTensorElementDataType type;   // element type of the activations and weights
    std::vector<ONNXTensorElementDataType> ins, outs;
    Make make;
};

const OpDef& def(const OrtCustomOp* op) { return *static_cast<const OpDef*>(op); }

// ---- shape inference (graph load): ONNX Runtime plans the outputs' memory from it, and lets ActVarTokenScatter's
// output take x's buffer only when it knows their shapes are equal ----
OrtStatus* ORT_API_CALL inferScatter(const OrtCustomOp*, OrtShapeInferContext* ctx) {
    OrtTensorTypeAndShapeInfo* x = nullptr;   // owned by the context
    if (OrtStatus* s = gApi->ShapeInferContext_GetInputTypeShape(ctx, 0, &x)) {
        gApi->ReleaseStatus(s);               // no shape known: nothing to infer
        return nullptr;
    }
    return gApi->ShapeInferContext_SetOutputTypeShape(ctx, 0, x);   // out: x's type and shape
}

OrtStatus* ORT_API_CALL inferExpertFfn(const OrtCustomOp*, OrtShapeInferContext* ctx) {
    OrtTensorTypeAndShapeInfo* h = nullptr;   // owned by the context
    if (OrtStatus* s = gApi->ShapeInferContext_GetInputTypeShape(ctx, 0, &h)) {
        gApi->ReleaseStatus(s);
        return nullptr;
    }
    ACTVAR_ORT_RETURN(gApi->ShapeInferContext_SetOutputTypeShape(ctx, 0, h));   // out: h's type and shape [T, C]
    size_t rank = 0;
    ACTVAR_ORT_RETURN(gApi->GetDimensionsCount(h, &rank));
    if (rank != 2) return nullptr;
    const OrtOpAttr* attr = nullptr;
    if (OrtStatus* s = gApi->ShapeInferContext_GetAttribute(ctx, "top_k", &attr)) {
        gApi->ReleaseStatus(s);   // kernel creation reports the missing attribute
        return nullptr;
    }
    int64_t topk = 0;
    size_t got = 0;
    ACTVAR_ORT_RETURN(gApi->ReadOpAttr(attr, ORT_OP_ATTR_INT, &topk, sizeof(topk), &got));
    int64_t d[2];
    const char* sym[2] = {nullptr, ""};
    ACTVAR_ORT_RETURN(gApi->GetDimensions(h, d, 2));
    ACTVAR_ORT_RETURN(gApi->GetSymbolicDimensions(h, sym, 2));
    OrtTensorTypeAndShapeInfo* e = nullptr;   // experts: int32 [T, top_k]
    ACTVAR_ORT_RETURN(gApi->CreateTensorTypeAndShapeInfo(&e));
    const int64_t ed[2] = {d[0], topk};
    const char* esym[2] = {sym[0] ? sym[0] : "", ""};
    OrtStatus* s = gApi->SetTensorElementType(e, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32);
    if (!s) s = gApi->SetDimensions(e, ed, 2);
    if (!s) s = gApi->SetSymbolicDimensions(e, esym, 2);
    if (!s) s = gApi->ShapeInferContext_SetOutputTypeShape(ctx, 1, e);
    gApi->ReleaseTensorTypeAndShapeInfo(e);
    return s;
}

OrtStatus* makeScatter(const OpDef& d, const OrtKernelInfo*, const std::string&, Kernel** k) {
    *k = new TokenScatter(actvarDtype(d.type));
    return nullptr;
}

OrtStatus* makeExpertFfn(const OpDef& d, const OrtKernelInfo* info, const std::string& node, Kernel** k) {
    int64_t n = 0, topk = 0;
    ACTVAR_ORT_RETURN(intAttr(info, node, "num_experts", &n));
    ACTVAR_ORT_RETURN(intAttr(info, node, "top_k", &topk));
    if (n < 1 || n > ACTVAR_MAX_EXPERTS)
        return error(node + ": num_experts = " + std::to_string(n) + " outside [1, " +
                     std::to_string(ACTVAR_MAX_EXPERTS) + "]");
    if (topk < 1 || topk > n)
        return error(node + ": top_k = " + std::to_string(topk) + " outside [1, num_experts = " + std::to_string(n) +
                     "]");
    auto kern = std::make_unique<ExpertFfn>(actvarDtype(d.type), (int)n, (int)topk);
    ACTVAR_ORT_RETURN(gApi->KernelInfoGetAllocator(info, OrtMemTypeDefault, &kern->alloc));
    *k = kern.release();
    return nullptr;
}

OrtStatus* ORT_API_CALL createKernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** out) {
    const OpDef& d = def(op);
    std::string node;
    ACTVAR_ORT_RETURN(nodeName(info, d.name, &node));
    ACTVAR_ORT_RETURN(checkPluginAttrs(info, node));
    Kernel* k = nullptr;
    try {
        ACTVAR_ORT_RETURN(d.make(d, info, node, &k));
    } catch (const std::exception& e) {
        return error(node + ": " + e.what(), ORT_FAIL);
    }
    k->node = node;
    *out = k;
    return nullptr;
}

OrtStatus* ORT_API_CALL computeKernel(void* k, OrtKernelContext* ctx) {
    try {
        return static_cast<Kernel*>(k)->compute(ctx);
    } catch (const std::exception& e) {
        return error(static_cast<Kernel*>(k)->node + ": " + e.what(), ORT_FAIL);
    }
}

void ORT_API_CALL destroyKernel(void* k) { delete static_cast<Kernel*>(k); }

size_t ORT_API_CALL mayInplace(int** in, int** out) {
    *in = new int[1]{0};
    *out = new int[1]{0};
    return 1;
}

void ORT_API_CALL releaseInplace(int* in, int* out) {
    delete[] in;
    delete[] out;
}

// inplace: output 0 may reuse input 0's buffer
OpDef makeDef(const char* name, ONNXTensorElementDataType t, std::vector<ONNXTensorElementDataType> ins,
              std::vector<ONNXTensorElementDataType> outs, OpDef::Make make, OpDef::Infer infer, bool inplace) {
    OpDef d{};
    d.name = name;
    d.type = t;
    d.ins = std::move(ins);
    d.outs = std::move(outs);
    d.make = make;
    d.InferOutputShapeFn = infer;
    d.version = kOrtApi;
    d.GetName = [](const OrtCustomOp* op) { return def(op).name; };
    d.GetExecutionProviderType = [](const OrtCustomOp*) { return kProvider; };
    d.GetInputTypeCount = [](const OrtCustomOp* op) { return def(op).ins.size(); };
    d.GetInputType = [](const OrtCustomOp* op, size_t i) { return def(op).ins[i]; };
    d.GetOutputTypeCount = [](const OrtCustomOp* op) { return def(op).outs.size(); };
    d.GetOutputType = [](const OrtCustomOp* op, size_t i) { return def(op).outs[i]; };
    d.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    d.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    d.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    d.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    d.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    d.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    d.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    d.CreateKernelV2 = createKernel;
    d.KernelComputeV2 = computeKernel;
    d.KernelDestroy = destroyKernel;
    d.GetStartVersion = [](const OrtCustomOp*) { return 1; };
    d.GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
    if (inplace) {
        d.GetMayInplace = mayInplace;
        d.ReleaseMayInplace = releaseInplace;
    }
    return d;
}

// The op descriptors and the domain live as long as the library: ONNX Runtime keeps pointers to them in every
// session that registered the library.
struct Registry {
    std::vector<OpDef> ops;
    OrtCustomOpDomain* domain = nullptr;
    ~Registry() {
        if (domain && gApi) gApi->ReleaseCustomOpDomain(domain);
    }
};

OrtStatus* buildRegistry(Registry& r) {
    constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, I32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    r.ops.reserve(6);
    for (ONNXTensorElementDataType t : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                                        ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16}) {
        r.ops.push_back(makeDef("ActVarTokenScatter", t, {t, I32, t}, {t}, makeScatter, inferScatter, true));
        r.ops.push_back(makeDef("ActVarExpertFFN", t, {t, F32, t, t, t, t}, {t, I32}, makeExpertFfn, inferExpertFfn,
                                false));
    }
    ACTVAR_ORT_RETURN(gApi->CreateCustomOpDomain(kDomain, &r.domain));
    for (const OpDef& d : r.ops) ACTVAR_ORT_RETURN(gApi->CustomOpDomain_Add(r.domain, &d));
    return nullptr;
}

Registry gRegistry;
std::mutex gRegistryLock;

}  // namespace

extern "C" {

/* Called by ONNX Runtime for SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary_V2. */
ACTVAR_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
    const OrtApi* api = api_base->GetApi(kOrtApi);
    if (!api) {
        const OrtApi* any = api_base->GetApi(1);
        const std::string msg = std::string("libactvar_ort_ops needs ONNX Runtime 1.29 or later (C API version 29); "
                                            "this runtime is ") + api_base->GetVersionString();
        return any ? any->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
    }
    std::lock_guard<std::mutex> lock(gRegistryLock);
    gApi = api;
    if (!gRegistry.domain) {
        if (OrtStatus* s = buildRegistry(gRegistry)) {
            if (gRegistry.domain) gApi->ReleaseCustomOpDomain(gRegistry.domain);
            gRegistry.domain = nullptr;
            gRegistry.ops.clear();
            return s;
        }
    }
    return gApi->AddCustomOpDomain(options, gRegistry.domain);
}

/* Number of CUDA devices this library sees (cudaGetDeviceCount through its static CUDA runtime), or
 * -cudaError_t when the runtime cannot be initialised (e.g. no driver). Lets a caller say why a CUDA session
 * cannot run the ops before building one. */
ACTVAR_API int actvarOrtOpsDeviceCount(void) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    return e == cudaSuccess ? n : -static_cast<int>(e);
}

}  // extern "C"
