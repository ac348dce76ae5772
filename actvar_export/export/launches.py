"""Which nodes of an exported graph launch a GPU kernel, counted per block: the measure that bounds a step at
small batch (a few microseconds per kernel, CUDA graph or not).

Not counted: layout-only ops (ONNX Runtime's CUDA provider aliases their output to their input) and nodes whose
inputs are all constants (ONNX Runtime folds them when it loads the graph; TensorRT folds them too). The
root-mean-square pattern x / sqrt(mean(x²) + ε) · γ (Pow, ReduceMean, Add, Sqrt, Div, Mul by a 1-D constant, with
its Casts around it in fp16 graphs), which ONNX Runtime's CUDA provider fuses into one SimplifiedLayerNormalization
kernel, counts as that one kernel."""
from __future__ import annotations

from collections import Counter
from typing import Dict, List

import onnx

NO_KERNEL = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"})


def scope_of(node: onnx.NodeProto) -> str:
    """The builder's scope of a node (`blocks.3`), '' outside every block."""
    return node.name.rsplit("/", 1)[0] if "/" in node.name else ""


def launching_nodes(model: onnx.ModelProto):
    """The nodes that launch a kernel, in graph order."""
    const = {t.name for t in model.graph.initializer} | {""}
    out = []
    for n in model.graph.node:
        if all(i in const for i in n.input):
            const.update(n.output)
        elif n.op_type not in NO_KERNEL:
            out.append(n)
    return out


RMS_CHAIN = ("Pow", "ReduceMean", "Add", "Sqrt", "Div")


def rms_patterns(model: onnx.ModelProto) -> List[List[onnx.NodeProto]]:
    """Every chain [Cast] -> Pow(x, 2) -> ReduceMean -> Add(ε) -> Sqrt -> Div(x, ·) -> [Cast] -> Mul(·, 1-D constant)
    whose inner values feed nothing else: the subgraph ONNX Runtime's SimplifiedLayerNormFusion replaces by one node
    on the CUDA provider (Casts included: fp16 in and out, fp32 inside; the CPU provider fuses the Cast-free form)."""
    consumers: Dict[str, list] = {}
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    const = {t.name: t for t in model.graph.initializer}

    def only(value, op):
        nxt = consumers.get(value, [])
        return nxt[0] if len(nxt) == 1 and nxt[0].op_type == op else None

    found = []
    for pow_ in (n for n in model.graph.node if n.op_type == "Pow"):
        chain, cur = [pow_], pow_
        for op in RMS_CHAIN[1:]:
            cur = only(cur.output[0], op)
            if cur is None:
                break
            chain.append(cur)
        if len(chain) < len(RMS_CHAIN) or chain[-1].input[0] != pow_.input[0]:
            continue
        cast = only(chain[-1].output[0], "Cast")
        mul = only((cast or chain[-1]).output[0], "Mul")
        gamma = next((const[i] for i in mul.input if i in const), None) if mul is not None else None
        if gamma is None or len(gamma.dims) != 1:
            continue
        lead = producer.get(pow_.input[0])
        if lead is not None and lead.op_type == "Cast" and len(consumers[lead.output[0]]) == 2:
            chain.insert(0, lead)
        found.append(chain + ([cast] if cast is not None else []) + [mul])
    return found


def launch_counts(model: onnx.ModelProto, fuse_rms: bool = True) -> Dict[str, Counter]:
    """{scope: Counter(op type -> kernel-launching nodes)}; with fuse_rms, each RMS pattern as one
    SimplifiedLayerNormalization (ONNX Runtime's fusion at its extended optimisation level, the default)."""
    fused = {n.output[0]: k for chain in (rms_patterns(model) if fuse_rms else []) for k, n in enumerate(chain)}
    counts: Dict[str, Counter] = {}
    for n in launching_nodes(model):
        k = fused.get(n.output[0])
        if k is None:
            counts.setdefault(scope_of(n), Counter())[n.op_type] += 1
        elif k == 0:
            counts.setdefault(scope_of(n), Counter())["SimplifiedLayerNormalization"] += 1
    return counts
