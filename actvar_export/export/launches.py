"""Which nodes of an exported graph launch a GPU kernel, counted per block: the measure that bounds a step at
small batch (a few microseconds per kernel, CUDA graph or not).

Not counted: layout-only ops (ONNX Runtime's CUDA provider aliases their output to their input) and nodes whose
inputs are all constants (ONNX Runtime folds them when it loads the graph; TensorRT folds them too)."""
from __future__ import annotations

from collections import Counter
from typing import Dict

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


def launch_counts(model: onnx.ModelProto) -> Dict[str, Counter]:
    """{scope: Counter(op type -> kernel-launching nodes)}."""
    counts: Dict[str, Counter] = {}
    for n in launching_nodes(model):
        counts.setdefault(scope_of(n), Counter())[n.op_type] += 1
    return counts
