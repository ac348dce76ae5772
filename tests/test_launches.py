"""Kernels per block of the step graphs (export/launches.py): the counter agrees with ONNX Runtime's own
constant folding, fails on an added kernel, and the per-block counts stay at or below the figures the
graph builder reaches (a regression that adds kernels to every block fails here, not on the GPU)."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from actvar_export.config import ActVarConfig, ModelSpec, VarConfig
from actvar_export.export.launches import NO_KERNEL, launch_counts, scope_of
from actvar_export.export.step import build_step
from actvar_export.export.weights import WeightStore

from .conftest import make_model

SPEC = ModelSpec(VarConfig(2), ActVarConfig())
DEPTH = SPEC.var.depth

# Most kernel-launching nodes per block (and of them Casts), by (precision, lowering, target) and dense/ActVAR
# scale: the counts the builder reaches for the block of design §1 (onnxruntime target: the qkv GEMM with its
# bias, q and k normalised by one fused RMS kernel each (q's head scale applied in fp32), SkipLayerNormalization,
# FastGelu with its bias in fp32; tensorrt target: q/k/v normalised as one fp32 tensor, the cache concatenated by the graph),
# the ActVAR scale adding the selector, two ascending TopKs, gather/scatter and the expert mask (the ascending
# re-sort of indices a TopK over int64 for the onnxruntime target). fp16 Casts are the fp16 GEMMs' inputs and
# outputs around the fp32 norms and residual stream (the RMS kernels' own Casts are fused into them on CUDA).
# Outside the blocks (adaLN of all blocks in one GEMM, head, sampler with its draw's sum in 8 sequential pieces,
# f_hat, next input): at most OUTSIDE kernels at depth 2.
OUTSIDE = 138
PINNED = {
    ("fp16", "portable", "onnxruntime"): {"dense": (25, 7), "actvar": (41, 11)},
    ("fp16", "plugin", "onnxruntime"): {"dense": (25, 7), "actvar": (34, 10)},
    ("fp16", "portable", "tensorrt"): {"dense": (48, 10), "actvar": (67, 18)},
    ("fp32", "portable", "onnxruntime"): {"dense": (18, 0), "actvar": (30, 0)},
    ("fp32", "plugin", "onnxruntime"): {"dense": (18, 0), "actvar": (26, 2)},
    ("fp32", "portable", "tensorrt"): {"dense": (38, 0), "actvar": (53, 4)},
}


@pytest.fixture(scope="module")
def state(vae):
    return make_model(DEPTH, SPEC.actvar, seed=0).state_dict(), vae.state_dict()


def _step(state, si, precision, lowering, target, store=None):
    store = store or WeightStore(*state, precision)
    return build_step(SPEC, si, 2, store, precision, lowering, 900, target)


@pytest.mark.parametrize("key", sorted(PINNED), ids=lambda k: "-".join(k))
def test_per_block_launches_stay_pinned(state, key):
    for si, kind in ((0, "dense"), (5, "dense"), (9, "actvar")):
        counts = launch_counts(_step(state, si, *key))
        most, casts = PINNED[key][kind]
        for b in range(DEPTH):
            c = counts[f"blocks.{b}"]
            assert sum(c.values()) <= most and c["Cast"] <= casts, f"step_{si} blocks.{b}: {dict(c)}"
            assert c["Slice"] == 0, f"step_{si} blocks.{b}: adaLN chunks and the cache are Splits"
        assert sum(counts[""].values()) <= OUTSIDE, f"step_{si} outside the blocks: {dict(counts[''])}"


def _inline_weights(m, store):
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t.CopyFrom(numpy_helper.from_array(store.array(t.name), t.name))
    return m


@pytest.mark.parametrize("si", [0, 9])
def test_counter_agrees_with_onnxruntime_folding(state, si, tmp_path):
    """Per block, the counted nodes are exactly the non-layout nodes left in ONNX Runtime's own
    constant-folded (basic level) graph: the counter's rule for what runs at all is ONNX Runtime's."""
    store = WeightStore(*state, "fp32")
    m = _inline_weights(_step(state, si, "fp32", "portable", "onnxruntime", store), store)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    theirs = {}
    for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node:
        if n.op_type not in NO_KERNEL:
            theirs.setdefault(scope_of(n), Counter())[n.op_type] += 1
    ours = launch_counts(m, fuse_rms=False)
    for b in range(DEPTH):
        assert ours[f"blocks.{b}"] == theirs[f"blocks.{b}"]


def _fused_ops(m, providers, tmp_path):
    so = ort.SessionOptions()          # the default level (all optimisations), as the runtime creates its sessions
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(m.SerializeToString(), so, providers=providers)
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


def _rms_fused_by(state, precision, providers, tmp_path):
    """The q/k normalisations the counter takes for one kernel each are the ones ONNX Runtime fuses into
    SimplifiedLayerNormalization: as many fused nodes as patterns found (two per block), no Pow or Sqrt left."""
    from actvar_export.export.launches import rms_patterns
    store = WeightStore(*state, precision)
    m = _inline_weights(_step(state, 9, precision, "portable", "onnxruntime", store), store)
    found = rms_patterns(m)
    assert len(found) == 2 * DEPTH
    ops = _fused_ops(m, providers, tmp_path)
    assert ops["SimplifiedLayerNormalization"] == len(found)
    assert ops["Pow"] == ops["Sqrt"] == 0
    return m, found, ops


def test_rms_patterns_are_what_onnxruntime_fuses(state, tmp_path):
    """fp32 on the CPU provider (which fuses the Cast-free form); a pattern whose last Mul is not by a 1-D constant
    is not counted as fused."""
    from actvar_export.export.launches import rms_patterns
    m, found, _ = _rms_fused_by(state, "fp32", ["CPUExecutionProvider"], tmp_path)
    mul = found[0][-1]
    k = next(i for i, x in enumerate(m.graph.node) if x.output[0] == mul.output[0])
    m.graph.node[k].input[1] = m.graph.node[k].input[0]
    assert len(rms_patterns(m)) == len(found) - 1


@pytest.mark.gpu
def test_rms_patterns_fuse_with_their_casts_on_cuda(state, tmp_path):
    """fp16 on the CUDA provider: each pattern with its two Casts becomes one SimplifiedLayerNormalization (fp16 in
    and out), so the counter's one kernel per pattern holds there; the block's other Casts remain."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA device")
    m, found, ops = _rms_fused_by(state, "fp16", ["CUDAExecutionProvider", "CPUExecutionProvider"], tmp_path)
    casts = sum(c["Cast"] for c in launch_counts(m).values())
    assert ops["Cast"] <= casts, (ops["Cast"], casts)


def test_counter_counts_an_added_kernel(state):
    """A Cast added inside blocks.0 counts; a Reshape and a node on constants alone do not."""
    m = _step(state, 0, "fp32", "portable", "onnxruntime")
    before = launch_counts(m)
    n = next(n for n in m.graph.node if n.name.startswith("blocks.0/") and n.op_type == "SkipLayerNormalization")
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "flat"))
    extra = [helper.make_node("Cast", [n.input[0]], ["x_cast"], name="blocks.0/extra_cast", to=onnx.TensorProto.FLOAT),
             helper.make_node("Reshape", ["x_cast", "flat"], ["x_flat"], name="blocks.0/extra_reshape"),
             helper.make_node("Neg", ["flat"], ["flat_neg"], name="blocks.0/extra_const")]
    for k, e in enumerate(extra):
        m.graph.node.insert(list(m.graph.node).index(n) + k, e)
    n.input[0] = "x_cast"
    after = launch_counts(m)
    assert after["blocks.0"] - before["blocks.0"] == Counter({"Cast": 1})
    assert after["blocks.1"] == before["blocks.1"]
