"""CPU emulation of the precisions ONNX Runtime's CPU execution provider has no kernels for.

ONNX Runtime's CPU provider has no bfloat16 MatMul, Gemm, Add, ... and the CPU reference of the plugin ops
(runtime/ort_ops.py) takes fp32 only. `emulate_low_precision` rewrites a loaded graph in memory (the bundle's
files are untouched): every node with an fp16/bf16 input or output for which the CPU provider registers no
kernel at that type (asked from ONNX Runtime's own kernel registry) runs in fp32 between Casts,

    x_bf16 -> Cast(fp32) -> node (fp32) -> Cast(bf16) -> y_bf16

so rounding to the low precision happens exactly at the node's outputs, as on a GPU whose fp16/bf16 GEMMs
accumulate in fp32 and round once when they store. Custom `actvar` ops are not in ONNX Runtime's registry:
they are always wrapped, and their fp32 reference implementation runs on the fp32-cast inputs.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Dict, Set, Tuple

import onnx
from onnx import TensorProto, helper

LOW = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
_ORT_NAME = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}
CPU = "CPUExecutionProvider"


@functools.lru_cache(maxsize=None)
def _cpu_kernels() -> Dict[Tuple[str, str], list]:
    """(domain, op) -> [((first, last opset version), {tensor types any of its constraints admit})]."""
    from onnxruntime.capi import _pybind_state as C
    table: Dict[Tuple[str, str], list] = {}
    for k in C.get_all_opkernel_def():
        if k.provider == CPU:
            types = {t for ts in k.type_constraints.values() for t in ts}
            table.setdefault((k.domain or "", k.op_name), []).append((k.version_range, types))
    return table


def cpu_runs(domain: str, op: str, version: int, dtype: int) -> bool:
    """Whether the CPU provider registers a kernel of `op` at opset `version` that admits `dtype`."""
    return any(lo <= version <= hi and _ORT_NAME[dtype] in types
               for (lo, hi), types in _cpu_kernels().get((domain or "", op), ()))


def value_types(model: onnx.ModelProto, custom_outputs: Dict[str, tuple]) -> Dict[str, int]:
    """Element type of every value: ONNX shape inference, repeated after typing the outputs of ops it has no
    schema for (contrib and custom ops): `custom_outputs[op][k]` where given, else the type of input 0."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    while True:
        g = onnx.shape_inference.infer_shapes(m).graph
        known = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]
                 if v.type.tensor_type.elem_type}
        known.update({t.name: t.data_type for t in g.initializer})
        added = False
        for n in m.graph.node:
            if onnx.defs.has(n.op_type, n.domain):
                continue
            for k, o in enumerate(n.output):
                declared = custom_outputs.get(n.op_type, ())
                t = (declared[k] if k < len(declared) else None) or known.get(n.input[0])
                if o and o not in known and t:
                    m.graph.value_info.append(helper.make_tensor_value_info(o, t, None))
                    added = True
        if not added:
            return known


def emulate_low_precision(model: onnx.ModelProto, custom_outputs: Dict[str, tuple]) -> Counter:
    """Rewrite `model` in place (see the module docstring). Returns {"fp16"/"bf16": nodes wrapped}."""
    types = value_types(model, custom_outputs)
    opsets = {o.domain or "": o.version for o in model.opset_import}
    nodes, to_f32, wrapped = [], {}, Counter()
    for n in model.graph.node:
        low: Set[int] = {types.get(v) for v in [*n.input, *n.output] if v} & LOW.keys()
        if all(cpu_runs(n.domain, n.op_type, opsets.get(n.domain or "", 1), t) for t in low):
            nodes.append(n)
            continue
        for i, x in enumerate(n.input):
            if x and types.get(x) in LOW:
                if x not in to_f32:
                    to_f32[x] = f"{x}__f32"
                    nodes.append(helper.make_node("Cast", [x], [to_f32[x]], name=f"{x}__to_f32", to=TensorProto.FLOAT))
                n.input[i] = to_f32[x]
        back = []
        for i, y in enumerate(n.output):
            if y and types.get(y) in LOW:
                n.output[i] = f"{y}__f32_out"     # y itself is rounded: its readers see the low precision
                back.append(helper.make_node("Cast", [n.output[i]], [y], name=f"{y}__from_f32", to=types[y]))
        nodes += [n, *back]
        wrapped.update(LOW[t] for t in low)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return wrapped


def note(wrapped: Counter) -> str:
    """One line for reports: what the CPU run emulated (empty when nothing was)."""
    if not wrapped:
        return ""
    what = " and ".join(sorted(wrapped))
    return (f"CPU emulation: ONNX Runtime's CPU provider has no {what} kernels for some nodes; they ran in fp32 "
            f"between Casts, rounding to {what} at their outputs ({', '.join(f'{v} {k} node(s)' for k, v in sorted(wrapped.items()))})")
