"""A small ONNX graph builder: named weights from one shared store, explicit dtypes."""
from __future__ import annotations

import contextlib
import itertools
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32, F16, BF16, I64, I32, BOOL = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                                  TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL)
PRECISION_TYPES = {"fp32": F32, "fp16": F16, "bf16": BF16}
NP_FLOAT = {F32: np.float32, F16: np.float16}      # the float types numpy has (bf16 constants are made fp32 and cast)
OPSET = 17
IR_VERSION = 10
CUSTOM_DOMAIN = "actvar"
ORT_DOMAIN = "com.microsoft"
# at most this many outputs of one Split / inputs of one Concat: ONNX Runtime's CUDA kernels pass up to 32
# pointers by value (one launch); more go through a host-to-device copy of a pointer array
MAX_PIECES = 32


def decoder_precision(precision: str) -> str:
    """The precision of the VQVAE decoder graph (its weights and its Conv/MatMul arithmetic): the bundle's,
    except fp32 for bf16 bundles, because Conv has no bfloat16 type before opset 22."""
    return "fp32" if precision == "bf16" else precision


class Graph:
    """Nodes, inputs, outputs and initializers of one graph. Weights are referenced by their
    state-dict key through `store` and become external-data initializers of the shared file."""

    def __init__(self, name: str, store, precision: str):
        self.name, self.store = name, store
        self.P = PRECISION_TYPES[precision]
        self.nodes: List[onnx.NodeProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self.inits: Dict[str, onnx.TensorProto] = {}
        self._ids = itertools.count()
        self.domains = set()      # non-default operator domains the nodes use (opset imports)
        self._cache = {}
        self._scope = ""
        self._renamed: Dict[str, str] = {}    # value -> the graph output it became (`output`)

    @contextlib.contextmanager
    def scope(self, prefix: str):
        """Nodes made inside are named `prefix/...` (per-block counts, profiler names)."""
        outer, self._scope = self._scope, f"{self._scope}{prefix}/"
        try:
            yield
        finally:
            self._scope = outer

    # ---- naming ----
    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    # ---- I/O ----
    def input(self, name: str, dtype: int, shape: Sequence[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, value: str, name: str, dtype: int, shape: Sequence[int]) -> str:
        """`value` becomes graph output `name`. A value a node of this graph produces is renamed, so that node writes
        the output buffer itself (an Identity would be a copy wherever ONNX Runtime keeps it: when the value has
        other consumers); anything else (a graph input, an initializer, another output) goes through an Identity."""
        produced = any(value in n.output for n in self.nodes)
        taken = {v.name for v in (*self.inputs, *self.outputs)}
        if produced and value not in taken:
            for n in self.nodes:
                n.input[:] = [name if x == value else x for x in n.input]
                n.output[:] = [name if x == value else x for x in n.output]
            self._renamed[value] = name     # nodes made later that name `value` read the output
        else:
            self.op("Identity", [value], name=name)
        self.outputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    # ---- constants and weights ----
    def w(self, key: str) -> str:
        if key not in self.inits:
            self.inits[key] = self.store.tensor_proto(key)
        return key

    def w_stacked(self, name: str, keys: Sequence[str]) -> str:
        """The weights `keys` (same shape, stored back to back) as one (len(keys), ...) initializer."""
        if name not in self.inits:
            self.inits[name] = self.store.stacked_proto(name, list(keys))
        return name

    def const(self, value, dtype=None, hint="c") -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.inits[name] = numpy_helper.from_array(arr, name)
        return name

    def i64(self, *vals) -> str:
        return self.const(np.array(vals, dtype=np.int64), hint="i")

    def scalar(self, v: float, dtype: int = F32) -> str:
        np_dt = NP_FLOAT.get(dtype)
        if np_dt is None:  # bf16 scalar: make fp32 and cast
            return self.cast(self.const(np.array(v, np.float32)), dtype)
        return self.const(np.array(v, dtype=np_dt), hint="s")

    # ---- ops ----
    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, name: Optional[str] = None,
           domain: Optional[str] = None, **attrs) -> Union[str, List[str]]:
        outs = [name] if (name and n_out == 1) else [self.fresh(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, [self._renamed.get(x, x) for x in inputs], outs, name=self._scope + self.fresh("n_" + op_type),
                                domain=domain, **attrs)
        self.nodes.append(node)
        if domain:
            self.domains.add(domain)
        return outs[0] if n_out == 1 else outs

    def cast(self, x: str, to: int, src: Optional[int] = None) -> str:
        if src is not None and src == to:
            return x
        return self.op("Cast", [x], to=to)

    def to_p(self, x: str) -> str:
        """fp32 activation -> the graph's precision (no node when that is fp32)."""
        return self.cast(x, self.P, F32)

    def to_f32(self, x: str) -> str:
        """graph-precision activation -> fp32 (no node when that is fp32)."""
        return self.cast(x, F32, self.P)

    def gemm(self, x2d: str, w_key: str, b_key: Optional[str] = None) -> str:
        """x · Wᵀ (+ b) with W in PyTorch Linear layout (out, in): one copy of each weight."""
        ins = [x2d, self.w(w_key)] + ([self.w(b_key)] if b_key else [])
        return self.op("Gemm", ins, transB=1)

    def linear(self, x: str, lead: Sequence[int], cin: int, cout: int, w_key: str, b_key: Optional[str] = None) -> str:
        """Linear on an N-d tensor: reshape to 2-D, Gemm, reshape back to lead + (cout,)."""
        return self.reshape(self.gemm(self.reshape(x, -1, cin), w_key, b_key), *lead, cout)

    def reshape(self, x, *shape):
        return self.op("Reshape", [x, self.i64(*shape)])

    def slice(self, x, starts, ends, axes):
        return self.op("Slice", [x, self.i64(*starts), self.i64(*ends), self.i64(*axes)])

    def split(self, x: str, n: int, size: int, axis: int) -> List[str]:
        """x cut into n pieces of `size` along axis: one Split kernel, or groups of at most MAX_PIECES."""
        if n == 1:
            return [x]
        if n <= MAX_PIECES:
            return self.op("Split", [x], n_out=n, axis=axis)
        groups = self._groups(n)
        outs = self.op("Split", [x, self.i64(*[k * size for k in groups])], n_out=len(groups), axis=axis)
        return [p for part, k in zip(outs, groups) for p in self.split(part, k, size, axis)]

    def concat(self, xs: Sequence[str], axis: int) -> str:
        """Concat of any number of inputs: one kernel, or groups of at most MAX_PIECES then their Concat."""
        if len(xs) <= MAX_PIECES:
            return self.op("Concat", list(xs), axis=axis) if len(xs) > 1 else xs[0]
        parts, i = [], 0
        for k in self._groups(len(xs)):
            parts.append(self.concat(xs[i:i + k], axis))
            i += k
        return self.concat(parts, axis)

    @staticmethod
    def _groups(n: int) -> List[int]:
        g = -(-n // MAX_PIECES)
        return [n // g + (i < n % g) for i in range(g)]

    def skip_layer_norm(self, x: str, skip: str, C: int, eps: float = 1e-6):
        """ONNX Runtime's SkipLayerNormalization without affine: (LayerNorm(x + skip), x + skip), one kernel."""
        ones, zeros = self.ones_zeros(C)
        ln, total = self.fresh("skipln"), self.fresh("skipsum")
        x, skip = self._renamed.get(x, x), self._renamed.get(skip, skip)
        self.nodes.append(helper.make_node("SkipLayerNormalization", [x, skip, ones, zeros], [ln, "", "", total],
                                           name=self._scope + self.fresh("n_SkipLayerNormalization"),
                                           domain=ORT_DOMAIN, epsilon=eps))
        self.domains.add(ORT_DOMAIN)
        return ln, total

    def layer_norm(self, x: str, C: int, eps: float = 1e-6) -> str:
        """LayerNorm without affine over the last axis (fp32 in, fp32 out)."""
        ones, zeros = self.ones_zeros(C)
        return self.op("LayerNormalization", [x, ones, zeros], axis=-1, epsilon=eps)

    def shared(self, key, make) -> str:
        """One constant per key in this graph (its array from make()), whoever asks for it."""
        if key not in self._cache:
            self._cache[key] = self.const(make(), hint=str(key[0]))
        return self._cache[key]

    def ones_zeros(self, n: int, dtype: int = F32):
        """Shared ones(n) and zeros(n) constants of an fp32 or fp16 `dtype` (identity affine of a normalisation)."""
        key = ("_oz", n, dtype)
        if key not in self._cache:
            t = NP_FLOAT[dtype]
            self._cache[key] = (self.const(np.ones(n, t), hint="one"), self.const(np.zeros(n, t), hint="zero"))
        return self._cache[key]

    def gelu_tanh(self, x: str, dtype: int) -> str:
        """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) — explicit, so any parser accepts it."""
        x3 = self.op("Mul", [self.op("Mul", [x, x]), x])
        inner = self.op("Mul", [self.op("Add", [x, self.op("Mul", [x3, self.scalar(0.044715, dtype)])]),
                                self.scalar(float(np.sqrt(2 / np.pi)), dtype)])
        t = self.op("Add", [self.op("Tanh", [inner]), self.scalar(1.0, dtype)])
        return self.op("Mul", [self.op("Mul", [x, t]), self.scalar(0.5, dtype)])

    def silu(self, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    # ---- finish ----
    def model(self) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, list(self.inits.values()))
        opsets = [helper.make_opsetid("", OPSET)]
        opsets += [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        m = helper.make_model(g, opset_imports=opsets, producer_name="actvar-export")
        m.ir_version = IR_VERSION
        return m
