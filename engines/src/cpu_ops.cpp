// CPU kernels of the `plugin` lowering's nodes (design §2 steps 5-6), so that plugin bundles also run on
// ONNX Runtime's CPU execution provider from C++ (the Python runtime uses onnxruntime-extensions' Python ops,
// which a C++ process cannot call). float32 only: fp16/bf16 plugin bundles need the CUDA custom-op library.
//   ActVarTokenScatter(x (S,L,C), idx (S,K) int32, upd (S,K,C)) -> x with rows idx replaced by upd
//   ActVarExpertFFN(h (T,C), router (T,N), w1 (H,C), b1 (H), w2 (C,H), b2 (C); num_experts, top_k)
//       -> out (T,C) = b2 + sum over the top_k experts e (ties to the lower id) of GELU_tanh(h W1_e^T + b1_e) W2_e^T,
//          experts (T,top_k) int32 in ascending id order
#include <algorithm>
#include <climits>
#include <cmath>
#include <numeric>
#include <vector>

#include "ort_util.h"

namespace actvar {

namespace {
const OrtApi* g_api = nullptr;

std::vector<int64_t> dims_of(const OrtValue* v) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    ort_check(g_api->GetTensorTypeAndShape(v, &info), "custom op: input shape");
    size_t n = 0;
    OrtStatus* st = g_api->GetDimensionsCount(info, &n);
    std::vector<int64_t> d(n);
    if (!st) st = g_api->GetDimensions(info, d.data(), n);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    ort_check(st, "custom op: input shape");
    return d;
}

template <class T>
const T* in(OrtKernelContext* ctx, size_t i, std::vector<int64_t>* dims = nullptr) {
    const OrtValue* v = nullptr;
    ort_check(g_api->KernelContext_GetInput(ctx, i, &v), "custom op: input");
    if (dims) *dims = dims_of(v);
    void* p = nullptr;
    ort_check(g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &p), "custom op: input data");
    return static_cast<const T*>(p);
}

template <class T>
T* out(OrtKernelContext* ctx, size_t i, const std::vector<int64_t>& dims) {
    OrtValue* v = nullptr;
    ort_check(g_api->KernelContext_GetOutput(ctx, i, dims.data(), dims.size(), &v), "custom op: output");
    void* p = nullptr;
    ort_check(g_api->GetTensorMutableData(v, &p), "custom op: output data");
    return static_cast<T*>(p);
}

OrtStatus* guarded(void (*f)(void*, OrtKernelContext*), void* k, OrtKernelContext* ctx) {
    try {
        f(k, ctx);
        return nullptr;
    } catch (const std::exception& e) {
        return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
    }
}

void token_scatter(void*, OrtKernelContext* ctx) {
    std::vector<int64_t> dx, di;
    const float* x = in<float>(ctx, 0, &dx);
    const int32_t* idx = in<int32_t>(ctx, 1, &di);
    const float* upd = in<float>(ctx, 2);
    const int64_t S = dx[0], L = dx[1], C = dx[2], K = di[1];
    float* y = out<float>(ctx, 0, dx);
    std::copy(x, x + S * L * C, y);
    for (int64_t s = 0; s < S; ++s)
        for (int64_t k = 0; k < K; ++k) {
            const int64_t r = idx[s * K + k];
            if (r < 0 || r >= L) throw Error("ActVarTokenScatter: index out of range");
            std::copy_n(upd + (s * K + k) * C, C, y + (s * L + r) * C);
        }
}

struct FfnKernel {
    int64_t num_experts = 16, top_k = 12;
};

void expert_ffn(void* kp, OrtKernelContext* ctx) {
    const FfnKernel& kn = *static_cast<FfnKernel*>(kp);
    std::vector<int64_t> dh, dw1;
    const float* h = in<float>(ctx, 0, &dh);
    const float* router = in<float>(ctx, 1);
    const float* w1 = in<float>(ctx, 2, &dw1);
    const float* b1 = in<float>(ctx, 3);
    const float* w2 = in<float>(ctx, 4);
    const float* b2 = in<float>(ctx, 5);
    const int64_t T = dh[0], C = dh[1], H = dw1[0], N = kn.num_experts, K = kn.top_k;
    if (N <= 0 || H % N || K <= 0 || K > N) throw Error("ActVarExpertFFN: bad num_experts/top_k attributes");
    const int64_t de = H / N;
    float* y = out<float>(ctx, 0, {T, C});
    int32_t* experts = out<int32_t>(ctx, 1, {T, K});
    std::vector<int> order(N);
    std::vector<double> a(de), acc(C);
    for (int64_t t = 0; t < T; ++t) {
        const float* r = router + t * N;
        std::iota(order.begin(), order.end(), 0);   // highest logits first, ties to the lower id
        std::stable_sort(order.begin(), order.end(), [r](int i, int j) { return r[i] > r[j]; });
        std::sort(order.begin(), order.begin() + K);
        const float* ht = h + t * C;
        for (int64_t c = 0; c < C; ++c) acc[c] = 0.0;
        for (int64_t k = 0; k < K; ++k) {
            const int64_t e = order[k];
            experts[t * K + k] = int32_t(e);
            for (int64_t j = 0; j < de; ++j) {
                const int64_t u = e * de + j;
                double z = b1[u];
                for (int64_t c = 0; c < C; ++c) z += double(w1[u * C + c]) * ht[c];
                a[j] = 0.5 * z * (1.0 + std::tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)));
            }
            for (int64_t c = 0; c < C; ++c) {
                const float* w = w2 + c * H + e * de;
                double s = 0.0;
                for (int64_t j = 0; j < de; ++j) s += double(w[j]) * a[j];
                acc[c] += s;
            }
        }
        for (int64_t c = 0; c < C; ++c) y[t * C + c] = float(acc[c] + b2[c]);
    }
}

struct Op : OrtCustomOp {
    const char* name;
    size_t n_in, n_out;
    void (*compute)(void*, OrtKernelContext*);
    bool ffn;
};

Op make_op(const char* name, size_t n_in, size_t n_out, void (*compute)(void*, OrtKernelContext*), bool ffn) {
    Op op{};
    op.version = ORT_API_VERSION;
    op.name = name;
    op.n_in = n_in;
    op.n_out = n_out;
    op.compute = compute;
    op.ffn = ffn;
    op.GetName = [](const OrtCustomOp* o) { return static_cast<const Op*>(o)->name; };
    op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };   // CPU
    op.GetInputTypeCount = [](const OrtCustomOp* o) { return static_cast<const Op*>(o)->n_in; };
    op.GetOutputTypeCount = [](const OrtCustomOp* o) { return static_cast<const Op*>(o)->n_out; };
    op.GetInputType = [](const OrtCustomOp* o, size_t i) {
        return (!static_cast<const Op*>(o)->ffn && i == 1) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
                                                          : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    op.GetOutputType = [](const OrtCustomOp*, size_t i) {
        return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
    op.GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
    op.GetMayInplace = [](int**, int**) -> size_t { return 0; };
    op.ReleaseMayInplace = [](int*, int*) {};
    op.GetAliasMap = [](int**, int**) -> size_t { return 0; };
    op.ReleaseAliasMap = [](int*, int*) {};
    op.CreateKernelV2 = [](const OrtCustomOp* o, const OrtApi* api, const OrtKernelInfo* info, void** kernel) -> OrtStatus* {
        g_api = api;
        auto* k = new FfnKernel;
        if (static_cast<const Op*>(o)->ffn) {
            OrtStatus* st = api->KernelInfoGetAttribute_int64(info, "num_experts", &k->num_experts);
            if (!st) st = api->KernelInfoGetAttribute_int64(info, "top_k", &k->top_k);
            if (st) { delete k; return st; }
        }
        *kernel = k;
        return nullptr;
    };
    op.KernelComputeV2 = ffn ? [](void* k, OrtKernelContext* c) { return guarded(expert_ffn, k, c); }
                             : [](void* k, OrtKernelContext* c) { return guarded(token_scatter, k, c); };
    op.KernelDestroy = [](void* k) { delete static_cast<FfnKernel*>(k); };
    return op;
}

Op g_scatter = make_op("ActVarTokenScatter", 3, 1, token_scatter, false);
Op g_ffn = make_op("ActVarExpertFFN", 6, 2, expert_ffn, true);
}  // namespace

OrtCustomOpDomain* cpu_custom_op_domain() {
    const OrtApi& api = ort_api();
    g_api = &api;
    OrtCustomOpDomain* d = nullptr;
    ort_check(api.CreateCustomOpDomain("actvar", &d), "ONNX Runtime: custom-op domain");
    ort_check(api.CustomOpDomain_Add(d, &g_scatter), "ONNX Runtime: ActVarTokenScatter");
    ort_check(api.CustomOpDomain_Add(d, &g_ffn), "ONNX Runtime: ActVarExpertFFN");
    return d;
}

}  // namespace actvar
