"""The per-scale step graph: transformer pass with KV cache, head, CFG, the `noise` sampler with
top-k/top-p, codebook lookup, Phi and f_hat update, and the next scale's input.

I/O of the graph for scale si (S = 2B sequences, l = pn², Lc = cache length before the scale):
  inputs : labels i64 (B)                          all scales
           x_in f32 (S, l, C), k_in.b and v_in.b P (S, H, Lc, 64) per block b, f_hat_in f32 (B, 32, 16, 16)   si > 0
           u f32 (B, l), cfg f32 (1), top_p f32 (1)
  outputs: idx i64 (B, l), logits f32 (B, l, V), f_hat_out f32 (B, 32, 16, 16),
           k_out.b and v_out.b P (S, H, Lc + K_t, 64) per block b, x_next f32 (S, l_next, C) (si < 9),
           sel_idx i64 (D, S, K_t) and experts i64 (D, S, K_t, K_w) at ActVAR scales
The KV cache travels per block: each block's attention writes its present cache straight into its graph
output (no Split of one packed cache in, no Concat of all blocks out: two fewer whole-cache copies per step,
and no tensor beyond ONNX Runtime's 2^31-element kernel indexing at d30, batch 32).
"""
from __future__ import annotations

import math

import numpy as np

from ..config import CVAE, NUM_SCALES, PATCH_NUMS, PHI_INDEX, SCALE_BEGIN, SCALE_LENS, ModelSpec, cache_len_after
from .graph import CUSTOM_DOMAIN, F32, I32, I64, NP_FLOAT, ORT_DOMAIN, Graph
from .weights import stacked_keys

LOWERINGS = ("portable", "plugin")
TARGETS = ("onnxruntime", "tensorrt")
FUSED_ATTENTION = f"{ORT_DOMAIN}.MultiHeadAttention"


FUSED_GELU = f"{ORT_DOMAIN}.FastGelu"


def gelu_kind(target: str) -> str:
    """The FFN's tanh GELU (computed in fp32): ONNX Runtime's FastGelu (one kernel) for the onnxruntime
    target, the explicit Mul/Add/Tanh chain otherwise."""
    return FUSED_GELU if target == "onnxruntime" else "Mul-Add-Tanh"


def attention_kind(target: str, precision: str) -> str:
    """ONNX Runtime's fused MultiHeadAttention where it has kernels (fp16, fp32; not bf16) for the
    onnxruntime target; MatMul/Softmax/MatMul otherwise (TensorRT fuses that pattern itself)."""
    return FUSED_ATTENTION if (target == "onnxruntime" and precision in ("fp16", "fp32")) else "MatMul-Softmax-MatMul"
TOKEN_SCATTER_OP = "ActVarTokenScatter"
EXPERT_FFN_OP = "ActVarExpertFFN"
PLUGIN_ATTRS = {"plugin_version": "1", "plugin_namespace": ""}


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row i averages input cells [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out)) — adaptive average
    pooling (F.interpolate mode='area') as a matrix, applied to rows and columns separately."""
    A = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        A[i, a:b] = 1.0 / (b - a)
    return A


def cache_names(depth: int, side: str) -> list:
    """The per-block KV cache tensors of a step graph, side "in" or "out": k_in.0, v_in.0, k_in.1, ..."""
    return [f"{kv}_{side}.{b}" for b in range(depth) for kv in ("k", "v")]


def carried(depth: int) -> dict:
    """{step input: the previous step's output that feeds it}: what every runtime chains from step to step."""
    return {"x_in": "x_next", **dict(zip(cache_names(depth, "in"), cache_names(depth, "out"))), "f_hat_in": "f_hat_out"}


def is_cache(name: str) -> bool:
    """k_out.b / v_out.b (or their inputs): one block's KV cache."""
    return name[:2] in ("k_", "v_") and name.split(".")[0] in ("k_in", "v_in", "k_out", "v_out")


def io_shapes(spec: ModelSpec, si: int, batch: int):
    """{name: (dtype tag, shape)} of the step graph's inputs and outputs (used by the manifest)."""
    v = spec.var
    S, C, D, H, l = 2 * batch, v.width, v.depth, v.heads, SCALE_LENS[si]
    Lc0 = cache_len_after(spec.actvar, si - 1) if si else 0
    kt = spec.actvar.k_t(si) if spec.actvar else l
    ins = {"labels": ("int64", [batch])}
    if si:
        ins["x_in"] = ("float32", [S, l, C])
        ins.update({n: ("P", [S, H, Lc0, 64]) for n in cache_names(D, "in")})
        ins["f_hat_in"] = ("float32", [batch, CVAE, 16, 16])
    ins.update({"u": ("float32", [batch, l]), "cfg": ("float32", [1]), "top_p": ("float32", [1])})
    outs = {"idx": ("int64", [batch, l]), "logits": ("float32", [batch, l, v.vocab]),
            "f_hat_out": ("float32", [batch, CVAE, 16, 16])}
    outs.update({n: ("P", [S, H, Lc0 + kt, 64]) for n in cache_names(D, "out")})
    if si < NUM_SCALES - 1:
        outs["x_next"] = ("float32", [S, SCALE_LENS[si + 1], C])
    if spec.actvar and spec.actvar.is_active(si):
        outs["sel_idx"] = ("int64", [D, S, kt])
        outs["experts"] = ("int64", [D, S, kt, spec.actvar.k_w])
    return ins, outs


def topk_ascending(g: Graph, scores_f32: str, k: int, int64_sort: bool = False) -> str:
    """Indices of the k largest scores along the last axis, in ascending index order. ONNX TopK
    returns equal values lower index first, which is the tie rule of design §2; the ascending order
    comes from a second TopK(largest=0) over the indices: as int64 where the runtime's TopK takes them
    (int64_sort: ONNX Runtime, no Casts), else as fp32 (exact below 2^24)."""
    _, top = g.op("TopK", [scores_f32, g.i64(k)], n_out=2, axis=-1, largest=1, sorted=1)
    if int64_sort:
        return g.op("TopK", [top, g.i64(k)], n_out=2, axis=-1, largest=0, sorted=1)[0]
    vals, _ = g.op("TopK", [g.cast(top, F32), g.i64(k)], n_out=2, axis=-1, largest=0, sorted=1)
    return g.cast(vals, I64)


class StepBuilder:
    def __init__(self, spec: ModelSpec, si: int, batch: int, store, precision: str, lowering: str, top_k: int,
                 target: str = "tensorrt"):
        self.spec, self.si, self.B = spec, si, batch
        self.fused = attention_kind(target, precision) == FUSED_ATTENTION
        self.fast_gelu = gelu_kind(target) == FUSED_GELU
        self.ort = target == "onnxruntime"     # ONNX Runtime's contrib ops (SkipLayerNormalization, FastGelu)
        self.g = Graph(f"actvar_step_{si}", store, precision)
        self.P = self.g.P
        self.lowering, self.top_k = lowering, top_k
        v = spec.var
        self.S, self.C, self.D, self.H, self.V = 2 * batch, v.width, v.depth, v.heads, v.vocab
        self.l = SCALE_LENS[si]
        act = spec.actvar
        self.active = bool(act and act.is_active(si))
        self.k_t = act.k_t(si) if self.active else None
        self.k_w = act.k_w if self.active else None
        self.N = act.num_experts if act else None
        self.Lc0 = cache_len_after(act, si - 1) if si else 0

    # ---------- small helpers ----------
    def linear(self, x_f32, lead, cin, cout, key, bias=True):
        """fp32 activations in, Gemm in the graph precision, fp32 out."""
        g = self.g
        y = g.linear(self.g.to_p(x_f32), lead, cin, cout, key + ".weight", key + ".bias" if bias else None)
        return self.g.to_f32(y)

    def lvl_pos(self, si):
        g, a, n = self.g, SCALE_BEGIN[si], SCALE_LENS[si]
        lvl = g.op("Gather", [g.w("lvl_embed.weight"), g.i64(si)], axis=0)               # (C)
        pos = g.slice(g.w("pos_1LC"), [a], [a + n], [1])                               # (1, n, C)
        return g.op("Add", [pos, lvl])

    def topk_indices(self, scores_f32, k):
        return topk_ascending(self.g, scores_f32, k, int64_sort=self.ort)

    def shared(self, key):
        """One constant per graph, used by every block: ("zeros", *shape), ("ones", *shape), ("is_v",) (which of
        q, k, v is v, (3, 1, 1) bool), ("ada1", chunks, scale_chunks) (1 on the adaLN scale chunks, 0 elsewhere),
        or ("rms_gamma", 64, dtype) (0.125 in fp32 or fp16: RMS to L2 normalisation)."""
        def make():
            kind, *shape = key
            if kind == "ada1":
                arr = np.zeros((shape[0], self.C), np.float32)
                arr[list(shape[1])] = 1.0
                return arr.reshape(-1)
            if kind == "is_v":
                return np.array([False, False, True]).reshape(3, 1, 1)
            if kind == "rms_gamma":
                return np.full(shape[0], 0.125, NP_FLOAT[shape[1]])
            return (np.zeros if kind == "zeros" else np.ones)(shape, np.float32)
        return self.g.shared(key, make)

    def ada(self, key, chunks, scale_chunks):
        """The head's AdaLN parameters from the shared cond (S, C): the Linear without its bias (one GEMM), then in fp32
        the bias plus 1 on the scale chunks (a constant ONNX Runtime folds: `1 + scale` costs no kernel),
        cut into `chunks` (S, 1, C) pieces by one Split."""
        g, C = self.g, self.C
        bias = g.op("Add", [g.cast(g.w(key + ".bias"), F32, self.P), self.shared(("ada1", chunks, scale_chunks))])
        ada = g.op("Add", [g.to_f32(g.gemm(self.cond_p, key + ".weight")), bias])       # (S, chunks·C)
        return g.split(g.reshape(ada, self.S, chunks, C), chunks, 1, axis=1)

    def blocks_ada(self):
        """Every block's six adaLN chunks (g1, g2, 1 + s1, 1 + s2, b1, b2), each (S, 1, C) fp32, from one GEMM over
        the blocks' ada_lin weights viewed as one (D, 6C, C) tensor (stored back to back in weights.bin), one
        bias Add (the 1 of the scale chunks folded in as in `ada`) and the Splits that hand them out."""
        g, D, S, C = self.g, self.D, self.S, self.C
        w = g.w_stacked("blocks.ada_lin.1.weight", stacked_keys("ada_lin.1.weight", D))     # (D, 6C, C)
        b = g.w_stacked("blocks.ada_lin.1.bias", stacked_keys("ada_lin.1.bias", D))         # (D, 6C)
        bias = g.op("Add", [g.cast(b, F32, self.P), self.shared(("ada1", 6, (2, 3)))])
        ada = g.to_f32(g.op("MatMul", [w, g.op("Transpose", [self.cond_p], perm=[1, 0])]))   # (D, 6C, S)
        ada = g.op("Transpose", [g.reshape(ada, D, 6, C, S)], perm=[0, 1, 3, 2])             # (D, 6, S, C)
        ada = g.op("Add", [ada, g.reshape(bias, D, 6, 1, C)])
        pieces = g.split(g.reshape(ada, 6 * D * S, 1, C), 6 * D, S, axis=0)
        return [pieces[6 * i:6 * i + 6] for i in range(D)]

    def add_norm(self, x, skip):
        """(LayerNorm(x + skip), x + skip); skip None: (LayerNorm(x), x). One SkipLayerNormalization kernel for
        the onnxruntime target (x + skip exact, as the Add it replaces)."""
        g = self.g
        if skip is None:
            return g.layer_norm(x, self.C), x
        if self.ort:
            return g.skip_layer_norm(x, skip, self.C)
        x = g.op("Add", [x, skip])
        return g.layer_norm(x, self.C), x

    # ---------- graph ----------
    def build(self):
        g, B, S, C, l, si = self.g, self.B, self.S, self.C, self.l, self.si
        labels = g.input("labels", I64, [B])
        label_S = g.op("Concat", [labels, g.i64(*([1000] * B))], axis=0)
        cond = g.op("Gather", [g.w("class_emb.weight"), label_S], axis=0)               # (S, C) f32
        self.cond_p = g.to_p(g.silu(cond))           # every adaLN's input, cast once
        if si == 0:
            x = g.op("Add", [g.op("Add", [g.op("Unsqueeze", [cond, g.i64(1)]), g.w("pos_start")]), self.lvl_pos(0)])
            caches, f_hat = [None] * self.D, g.op("ConstantOfShape", [g.i64(B, CVAE, 16, 16)], value=_f32_tensor(0.0))
        else:
            x = g.input("x_in", F32, [S, l, C])
            names = cache_names(self.D, "in")
            ins = [g.input(n, self.P, [S, self.H, self.Lc0, 64]) for n in names]
            caches = [(ins[2 * b], ins[2 * b + 1]) for b in range(self.D)]
            f_hat = g.input("f_hat_in", F32, [B, CVAE, 16, 16])
        u = g.input("u", F32, [B, l])
        cfg = g.input("cfg", F32, [1])
        top_p = g.input("top_p", F32, [1])

        kvs, sel, exps, skip = [], [], [], None
        for b, ada in enumerate(self.blocks_ada()):
            with g.scope(f"blocks.{b}"):
                x, skip, kv, aux = self.block(b, ada, x, skip, caches[b])
            kvs += kv
            if aux:
                sel.append(g.op("Unsqueeze", [aux[0], g.i64(0)]))
                exps.append(g.op("Unsqueeze", [aux[1], g.i64(0)]))
        Lc1 = self.Lc0 + (self.k_t or l)

        logits = self.head(x, skip)                                                      # (B, l, V) f32
        idx = self.sample(logits, u, top_p, cfg)
        f_hat_out = self.fhat_update(f_hat, idx)

        g.output(idx, "idx", I64, [B, l])
        g.output(self._cfg_logits, "logits", F32, [B, l, self.V])
        g.output(f_hat_out, "f_hat_out", F32, [B, CVAE, 16, 16])
        for name, kv in zip(cache_names(self.D, "out"), kvs):                          # each block's present cache
            g.output(kv, name, self.P, [S, self.H, Lc1, 64])
        if si < NUM_SCALES - 1:
            g.output(self.next_input(f_hat_out), "x_next", F32, [S, SCALE_LENS[si + 1], C])
        if self.active:
            g.output(g.concat(sel, axis=0), "sel_idx", I64, [self.D, S, self.k_t])
            g.output(g.concat(exps, axis=0), "experts", I64, [self.D, S, self.k_t, self.k_w])
        return g.model()

    def block(self, b, ada, x, skip, cache):
        """Block b on the residual stream x + skip (skip None: x alone; the sum is left to the next LayerNorm
        where it can fuse), ada its adaLN chunks. Returns (x, skip, [k_all, v_all], aux)."""
        g, S, C = self.g, self.S, self.C
        pre = f"blocks.{b}"
        g1, g2, s1, s2, b1, b2 = ada                                                     # s1, s2 hold 1 + scale
        aux = None
        if self.active:
            if skip is not None:
                x, skip = g.op("Add", [x, skip]), None
            L, K = self.l, self.k_t
            score = g.reshape(self.linear(x, [S, L], C, 1, f"{pre}.selector"), S, L)
            idx = self.topk_indices(score, K)                                            # (S, K) i64
            idx3 = g.op("Expand", [g.op("Unsqueeze", [idx, g.i64(-1)]), g.i64(S, K, C)])
            xs = g.op("GatherElements", [x, idx3], axis=1)
            n = K
        else:
            xs, n = x, self.l
        ln, xs = self.add_norm(xs, skip)
        a, kv = self.attention(b, g.op("Add", [g.op("Mul", [ln, s1]), b1]), n, cache)
        ln, xs = self.add_norm(xs, g.op("Mul", [a, g1]))
        h2 = g.op("Add", [g.op("Mul", [ln, s2]), b2])
        if self.active:
            f, experts = self.experts(b, h2, n)
            aux = (idx, experts)
        else:
            f = self.ffn(b, h2, n)
        skip = g.op("Mul", [f, g2])
        if not self.active:
            return xs, skip, kv, aux
        xs = g.op("Add", [xs, skip])
        if self.lowering == "plugin":
            x = g.op(TOKEN_SCATTER_OP, [x, g.cast(idx, I32), xs], domain=CUSTOM_DOMAIN, **PLUGIN_ATTRS)
        else:
            x = g.op("ScatterElements", [x, idx3, xs], axis=1)
        return x, None, kv, aux

    def attention(self, b, h_f32, n, cache):
        """q, k and v in one (S, n, 3, H, 64) fp32 tensor: the qkv bias, the L2 norms (one ReduceL2) and
        q's clamped scale applied to all three at once, v's divisor and factor being exactly 1. With ONNX Runtime's
        fused attention, `_qkv_rms` instead."""
        g, S, C, H = self.g, self.S, self.C, self.H
        pre = f"blocks.{b}.attn"
        if self.fused:
            return self._fused_attention(pre, self._qkv_rms(pre, h_f32, n), n, cache)
        qkv = g.gemm(g.reshape(g.to_p(h_f32), -1, C), f"{pre}.mat_qkv.weight")            # (S·n, 3C), no bias
        zero = self.shared(("zeros", C))
        bias = g.reshape(g.op("Concat", [g.cast(g.w(f"{pre}.q_bias"), F32, self.P), zero,
                                         g.cast(g.w(f"{pre}.v_bias"), F32, self.P)], axis=0), 3, H, 64)
        qkv = g.op("Add", [g.reshape(g.to_f32(qkv), S, n, 3, H, 64), bias])
        scale = g.op("Exp", [g.op("Min", [g.w(f"{pre}.scale_mul_1H11"), g.scalar(math.log(100.0))])])   # (1, H, 1, 1)
        factor = g.op("Concat", [g.reshape(scale, 1, H, 1), self.shared(("ones", 2, H, 1))], axis=0)
        is_v = self.shared(("is_v",))
        nrm = g.op("Max", [g.op("ReduceL2", [qkv], axes=[-1], keepdims=1), g.scalar(1e-12)])   # F.normalize's eps
        qkv = g.to_p(g.op("Mul", [g.op("Div", [qkv, g.op("Where", [is_v, g.scalar(1.0), nrm])]), factor]))
        qkv = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])                                # 3 S H n c
        q, k, v = [g.reshape(p, S, H, n, 64) for p in g.split(qkv, 3, 1, axis=0)]
        k_all = k if cache is None else g.op("Concat", [cache[0], k], axis=2)
        v_all = v if cache is None else g.op("Concat", [cache[1], v], axis=2)
        att = g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])])
        att = self.g.to_p(g.op("Softmax", [self.g.to_f32(att)], axis=-1))
        o = g.op("Transpose", [g.op("MatMul", [att, v_all])], perm=[0, 2, 1, 3])        # S n H c
        return self._proj(pre, o), [k_all, v_all]

    def _qkv_rms(self, pre, h_f32, n):
        """q, k, v (S, n, C) in the graph precision for ONNX Runtime: the qkv GEMM with its bias (k's is zero) in the
        graph precision, one Split, and q and k L2-normalised each by the root-mean-square pattern that ONNX
        Runtime fuses into one SimplifiedLayerNormalization kernel (x / sqrt(mean(x²) + ε) · 1/8 = x / ‖x‖ over the
        64 channels of a head, computed in fp32; ε = 1e-24 moves the result by less than fp32's rounding wherever
        ‖x‖ > 1e-7, and near 0 both this and F.normalize's max(‖x‖, 1e-12) give a vector near 0), then q times its
        head's clamped scale. No fp32 copy of qkv, no generic reduction."""
        g, S, C, H = self.g, self.S, self.C, self.H
        zero = g.ones_zeros(C, self.P)[1]
        bias = g.op("Concat", [g.w(f"{pre}.q_bias"), zero, g.w(f"{pre}.v_bias")], axis=0)   # (3C) in P
        qkv = g.op("Gemm", [g.reshape(g.to_p(h_f32), -1, C), g.w(f"{pre}.mat_qkv.weight"), bias], transB=1)
        q, k, v = g.split(g.reshape(qkv, S, n, 3, H, 64), 3, 1, axis=2)                  # (S, n, 1, H, 64) each
        scale = g.op("Exp", [g.op("Min", [g.w(f"{pre}.scale_mul_1H11"), g.scalar(math.log(100.0))])])   # (1, H, 1, 1)
        q = g.to_p(g.op("Mul", [self._unit_rms(q, out_p=False), g.reshape(scale, 1, 1, 1, H, 1)]))   # fp32 product
        return [g.reshape(t, S, n, C) for t in (q, self._unit_rms(k), v)]

    def _unit_rms(self, x_p, out_p=True):
        """x / ‖x‖ over the last axis (64), as x / sqrt(mean(x²) + ε) · 0.125 computed in fp32, in the form ONNX
        Runtime fuses into one SimplifiedLayerNormalization kernel: [Cast to fp32], Pow, ReduceMean, Add, Sqrt, Div,
        [Cast to the graph precision], Mul by a 1-D scale (0.125, exact in fp16) of the output's precision: the graph
        precision (out_p) or fp32 (q, whose per-head scale is applied in fp32 before its one rounding). The CUDA
        provider fuses the fp16 forms with their Casts (fp16 in, fp32 inside); the CPU provider the fp32 form."""
        g = self.g
        x = g.to_f32(x_p)
        ms = g.op("ReduceMean", [g.op("Pow", [x, g.scalar(2.0)])], axes=[-1], keepdims=1)
        y = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [ms, g.scalar(1e-24)])])])
        if out_p:
            return g.op("Mul", [g.to_p(y), self.shared(("rms_gamma", 64, self.P))])
        return g.op("Mul", [y, self.shared(("rms_gamma", 64, F32))])

    def _fused_attention(self, pre, qkv, n, cache):
        """ONNX Runtime's com.microsoft.MultiHeadAttention (flash attention on the CUDA provider) on the
        normalised q, k (q pre-multiplied by the clamped scale) and v, each (S, n, C): op scale 1, no mask; the op
        appends the current keys/values to the cache prefix (past -> present, both (S, H, L, 64))."""
        g, H = self.g, self.H
        ins = list(qkv)
        if cache is not None:
            ins += ["", "", "", cache[0], cache[1]]
        o, k_all, v_all = g.op("MultiHeadAttention", ins, n_out=3, domain=ORT_DOMAIN, num_heads=H, scale=1.0)
        return self._proj(pre, o), [k_all, v_all]

    def _proj(self, pre, o):
        g = self.g
        out = self.g.to_f32(g.gemm(g.reshape(o, -1, self.C), f"{pre}.proj.weight", f"{pre}.proj.bias"))
        return g.reshape(out, self.S, -1, self.C)

    def _fc1_gelu(self, b, h2p):
        """GELU(h2 · fc1ᵀ + b1) in fp32 from h2 (T, C) in the graph precision; the result in the graph precision.
        onnxruntime target: the GEMM without bias and FastGelu adding the bias (one kernel for bias and GELU), in fp32:
        its fp16 kernel evaluates the polynomial and the products in half precision, several roundings where fp16
        autocast rounds once. Other targets: the explicit tanh GELU in fp32."""
        g, pre = self.g, f"blocks.{b}.ffn.fc1"
        if self.fast_gelu:
            a = g.to_f32(g.gemm(h2p, pre + ".weight"))
            return g.to_p(g.op("FastGelu", [a, g.cast(g.w(pre + ".bias"), F32, self.P)], domain=ORT_DOMAIN))
        return g.to_p(g.gelu_tanh(g.to_f32(g.gemm(h2p, pre + ".weight", pre + ".bias")), F32))

    def ffn(self, b, h2, n):
        g = self.g
        h2p = g.reshape(g.to_p(h2), -1, self.C)
        out = g.gemm(self._fc1_gelu(b, h2p), f"blocks.{b}.ffn.fc2.weight", f"blocks.{b}.ffn.fc2.bias")
        return g.reshape(self.g.to_f32(out), self.S, n, self.C)

    def experts(self, b, h2, n):
        g, C, N, kw = self.g, self.C, self.N, self.k_w
        T = self.S * n
        pre = f"blocks.{b}.ffn"
        h2p = g.reshape(self.g.to_p(h2), T, C)                                          # one Cast for both GEMMs
        router = self.g.to_f32(g.gemm(h2p, f"{pre}.router.weight", f"{pre}.router.bias"))    # (T, N)
        if self.lowering == "plugin":
            out, e32 = g.op(EXPERT_FFN_OP, [h2p, router, g.w(f"{pre}.fc1.weight"), g.w(f"{pre}.fc1.bias"),
                                            g.w(f"{pre}.fc2.weight"), g.w(f"{pre}.fc2.bias")], n_out=2,
                            domain=CUSTOM_DOMAIN, num_experts=N, top_k=kw, **PLUGIN_ATTRS)
            experts = g.cast(e32, I64)
        else:
            experts = self.topk_indices(router, kw)                                     # (T, kw) ascending
            ones = g.op("ConstantOfShape", [g.i64(T, kw)], value=_f32_tensor(1.0))
            zeros = g.op("ConstantOfShape", [g.i64(T, N)], value=_f32_tensor(0.0))
            mask = g.to_p(g.op("ScatterElements", [zeros, experts, ones], axis=1))      # (T, N) 0/1, exact in P
            d_e = 4 * C // N
            act = g.op("Mul", [g.reshape(self._fc1_gelu(b, h2p), T, N, d_e), g.op("Unsqueeze", [mask, g.i64(-1)])])
            out = g.gemm(g.reshape(act, T, 4 * C), f"{pre}.fc2.weight", f"{pre}.fc2.bias")
        return (g.reshape(self.g.to_f32(out), self.S, n, C),
                g.reshape(experts, self.S, n, kw))

    def head(self, x, skip):
        g, S, C, l, B = self.g, self.S, self.C, self.l, self.B
        scale, shift = self.ada("head_nm.ada_lin.1", 2, (0,))                             # scale holds 1 + scale
        ln, x = self.add_norm(x, skip)
        hn = g.op("Add", [g.op("Mul", [ln, scale]), shift])
        logits = self.linear(hn, [S, l], C, self.V, "head")                               # (S, l, V)
        t = g.op("Mul", ["cfg", g.scalar(self.si / (NUM_SCALES - 1))])
        cond_l, unc_l = g.split(logits, 2, B, axis=0)
        lc = g.op("Sub", [g.op("Mul", [cond_l, g.op("Add", [t, g.scalar(1.0)])]), g.op("Mul", [unc_l, t])])
        self._cfg_logits = lc
        return lc

    def sample(self, lc, u, top_p, cfg):
        return noise_sampler(self.g, lc, u, top_p, self.top_k, self.V)

    def fhat_update(self, f_hat, idx):
        g, B, pn = self.g, self.B, PATCH_NUMS[self.si]
        h = g.op("Gather", [g.w("vae.quantize.embedding.weight"), idx], axis=0)           # (B, l, 32)
        h = g.reshape(g.op("Transpose", [h], perm=[0, 2, 1]), B, CVAE, pn, pn)
        if self.si != NUM_SCALES - 1:
            h = g.op("Resize", [h, "", "", g.i64(B, CVAE, 16, 16)], mode="cubic", cubic_coeff_a=-0.75,
                     coordinate_transformation_mode="half_pixel", exclude_outside=0)
        key = f"vae.quantize.quant_resi.qresi_ls.{PHI_INDEX[self.si]}"
        conv = g.op("Conv", [h, g.w(key + ".weight"), g.w(key + ".bias")], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
        phi = g.op("Add", [g.op("Mul", [h, g.scalar(0.5)]), g.op("Mul", [conv, g.scalar(0.5)])])
        return g.op("Add", [f_hat, phi])

    def next_input(self, f_hat):
        g, B, si = self.g, self.B, self.si
        pn = PATCH_NUMS[si + 1]
        A = area_matrix(16, pn)
        d = g.op("MatMul", [g.op("MatMul", [g.const(A, hint="area"), f_hat]), g.const(A.T.copy(), hint="areaT")])
        d = g.op("Transpose", [g.reshape(d, B, CVAE, pn * pn)], perm=[0, 2, 1])           # (B, l', 32)
        x = self.linear(d, [B, pn * pn], CVAE, self.C, "word_embed")
        x = g.op("Add", [x, self.lvl_pos(si + 1)])
        return g.op("Concat", [x, x], axis=0)


def noise_sampler(g: Graph, lc: str, u: str, top_p: str, k: int, V: int) -> str:
    """The `noise` sampler of design §3 on logits lc (N, l, V): top-k keeps every logit >= the k-th
    largest (a tie group at the cut survives whole, so more than k may survive); top-p walks the survivors
    in descending order (equal logits by ascending id) with p normalised over ALL survivors; the draw is
    the inverse CDF in vocabulary order. A static TopK returns k values: the n_x survivors beyond them all
    equal the k-th value, so they enter the normaliser and the tail sums analytically (j·p_k for the j-th
    from the end), and the kept set is "logit > last kept value, plus the first m ids equal to it".
    The draw's vocabulary sums are fp32 additions one id after the other, the order of design §3 that
    `sampling.inverse_cdf` reproduces (`sequential_cumsum`); the count of tied ids needs no order
    (`running_count`)."""
    vals, _ = g.op("TopK", [lc, g.i64(k)], n_out=2, axis=-1, largest=1, sorted=1)     # (..., k) desc
    mx, kth = g.slice(vals, [0], [1], [-1]), g.slice(vals, [k - 1], [k], [-1])
    survive = g.op("GreaterOrEqual", [lc, kth])                                          # (..., V)
    e = g.op("Exp", [g.op("Sub", [lc, mx])])
    z = g.op("ReduceSum", [g.op("Where", [survive, e, g.scalar(0.0)]), g.i64(-1)], keepdims=1)
    n_x = g.op("Sub", [g.op("ReduceSum", [g.cast(survive, I64), g.i64(-1)], keepdims=1), g.i64(k)])
    p_k = g.op("Div", [g.op("Exp", [g.op("Sub", [kth, mx])]), z])                        # each survivor at the cut
    extra = g.op("Mul", [g.cast(n_x, F32), p_k])                                          # mass beyond the TopK
    p = g.op("Div", [g.op("Exp", [g.op("Sub", [vals, mx])]), z])
    tail = g.op("Add", [g.op("CumSum", [p, g.i64(-1)], reverse=1), extra])    # mass of a rank and all after it
    thr = g.op("Where", [g.op("Greater", [top_p, g.scalar(0.0)]), g.op("Sub", [g.scalar(1.0), top_p]), g.scalar(-1.0)])
    kept_top = g.op("ReduceSum", [g.cast(g.op("Greater", [tail, thr]), I64), g.i64(-1)], keepdims=1)
    # survivors beyond the TopK: the j-th from the end is kept iff j·p_k > thr, i.e. j > floor(thr / p_k)
    removed_x = g.cast(g.op("Floor", [g.op("Div", [g.op("Max", [thr, g.scalar(0.0)]), p_k])]), I64)
    kept_x = g.op("Max", [g.op("Sub", [n_x, g.op("Min", [removed_x, n_x])]), g.i64(0)])
    keep_n = g.op("Max", [g.op("Add", [kept_top, kept_x]), g.i64(1)])                  # the top token stays
    last = g.op("GatherElements", [vals, g.op("Sub", [g.op("Min", [keep_n, g.i64(k)]), g.i64(1)])], axis=-1)
    above = g.op("Greater", [lc, last])
    at = g.op("Equal", [lc, last])
    m = g.op("Sub", [keep_n, g.op("ReduceSum", [g.cast(above, I64), g.i64(-1)], keepdims=1)])
    first_m = g.op("LessOrEqual", [running_count(g, g.cast(at, F32), V), g.cast(m, F32)])
    keep = g.op("Or", [above, g.op("And", [at, first_m])])
    w = g.op("Where", [keep, e, g.scalar(0.0)])
    cdf = sequential_cumsum(g, w, V)
    total = g.slice(cdf, [V - 1], [V], [-1])
    below = g.op("LessOrEqual", [cdf, g.op("Mul", [g.op("Unsqueeze", [u, g.i64(-1)]), total])])
    count = g.op("ReduceSum", [g.cast(below, I64), g.i64(-1)], keepdims=0)
    return g.op("Min", [count, g.i64(V - 1)])


def sequential_cumsum(g: Graph, w: str, V: int, pieces: int = 8) -> str:
    """Inclusive running sum of w (N, l, V) along V in fp32, added one id after the other from id 0: the values of
    one CumSum, which ONNX Runtime's CUDA kernel computes by adding up each element's whole prefix (O(V²) per row).
    Here `pieces` CumSums of V/pieces + 1 values: piece j runs over [the running total at the end of piece j-1,
    its own values], so each of its elements is exactly the sequential sum continued (the total first, then the
    piece's values in order), at 1/pieces of the work."""
    if V % pieces or pieces < 2:
        return g.op("CumSum", [w, g.i64(-1)])
    n = V // pieces
    outs, total = [], None
    for part in g.split(w, pieces, n, axis=-1):
        if total is None:
            run = g.op("CumSum", [part, g.i64(-1)])
        else:
            run = g.slice(g.op("CumSum", [g.op("Concat", [total, part], axis=-1), g.i64(-1)]), [1], [n + 1], [-1])
        total = g.slice(run, [n - 1], [n], [-1])
        outs.append(run)
    return g.op("Concat", outs, axis=-1)


def running_count(g: Graph, ind: str, V: int, block: int = 64) -> str:
    """Inclusive running sum of a 0/1 fp32 indicator (N, l, V) along V: exact in any summation order below
    2^24, so computed within blocks of `block` ids plus the exclusive running sum of the blocks' totals:
    O(V) work, where one CumSum over V costs ONNX Runtime's CUDA kernel O(V²) per row."""
    if V % block or V <= block:
        return g.op("CumSum", [ind, g.i64(-1)])
    x = g.op("Reshape", [ind, g.i64(0, 0, V // block, block)])
    inner = g.op("CumSum", [x, g.i64(-1)])
    carry = g.op("CumSum", [g.op("ReduceSum", [x, g.i64(-1)], keepdims=1), g.i64(-2)], exclusive=1)
    return g.op("Reshape", [g.op("Add", [inner, carry]), g.i64(0, 0, V)])


def _f32_tensor(v: float):
    from onnx import helper
    return helper.make_tensor("v", F32, [1], [v])


def build_step(spec: ModelSpec, si: int, batch: int, store, precision: str, lowering: str, top_k: int,
               target: str = "tensorrt"):
    if lowering not in LOWERINGS or target not in TARGETS:
        raise ValueError((lowering, target))
    return StepBuilder(spec, si, batch, store, precision, lowering, top_k, target).build()
