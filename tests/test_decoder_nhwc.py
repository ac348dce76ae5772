"""The decoder's NHWC variant (decoder_cuda.onnx: ONNX Runtime's CUDA contrib operators NhwcConv and GroupNorm) is the
same function as the portable decoder. On the CPU, which has no kernels for those operators, each is rewritten into
standard operators by its documented semantics (NhwcConv: Conv between NHWC<->NCHW Transposes, weights (M, C, k, k);
GroupNorm: fp32 statistics over each group's channels and pixels, the fp32 affine, SiLU when activation=1, one
rounding to the input's type) and the graph runs teacher-forced against the reference VQVAE like the portable one.
A rewrite that gets a semantic wrong (SiLU dropped) fails the same check. On the GPU (marked gpu) the variant
itself runs on the CUDA provider."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from actvar_export.bundle import Bundle, build_bundle
from actvar_export.checkpoint import build_models, load_checkpoint
from actvar_export.config import TOTAL_TOKENS
from actvar_export.generate import SampleSettings
from actvar_export.runtime.ort_runtime import Runtime
from actvar_export.sampling import noise_for
from actvar_export.validate import DECODER, compare_decoder, reference_feeds

LABELS, SEED = [5, 400], 7
SETTINGS = SampleSettings(sampler="noise", cfg=1.5, top_k=900, top_p=0.96)


@pytest.fixture(scope="module")
def models(actvar_ckpt):
    return build_models(load_checkpoint(actvar_ckpt))


@pytest.fixture(scope="module")
def feed(models):
    model, vae = models
    return reference_feeds(model, vae, torch.tensor(LABELS), noise_for(len(LABELS), SEED, TOTAL_TOKENS), SETTINGS)[0][DECODER]


@pytest.fixture(scope="module")
def bundle(actvar_ckpt, tmp_path_factory):
    return build_bundle(actvar_ckpt, tmp_path_factory.mktemp("nhwc") / "b", batch=len(LABELS), precision="fp16",
                        show_progress=False)


def lower_contrib(model: onnx.ModelProto, silu: bool = True) -> onnx.ModelProto:
    """NhwcConv and GroupNorm rewritten into standard ONNX operators by their semantics (silu=False: a wrong rewrite
    that ignores GroupNorm's activation, for the mutation check)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes, k = [], 0

    def name(h):
        nonlocal k
        k += 1
        return f"_low_{h}_{k}"

    for n in model.graph.node:
        if n.domain == "com.microsoft" and n.op_type == "NhwcConv":
            x_t, y_t = name("x"), name("y")
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            nodes += [helper.make_node("Transpose", [n.input[0]], [x_t], perm=[0, 3, 1, 2]),
                      helper.make_node("Conv", [x_t, *n.input[1:]], [y_t], **attrs),
                      helper.make_node("Transpose", [y_t], [n.output[0]], perm=[0, 2, 3, 1])]
        elif n.domain == "com.microsoft" and n.op_type == "GroupNorm":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["channels_last"] == 1 and attrs["groups"] == 32
            x, gamma, beta = n.input
            shape, ones, zeros = name("shape"), name("one"), name("zero")
            m.graph.initializer.extend([numpy_helper.from_array(np.ones(32, np.float32), ones),
                                        numpy_helper.from_array(np.zeros(32, np.float32), zeros)])
            t = [name(h) for h in ("f32", "nchw", "g", "in", "back", "scaled", "affine", "sig", "act", "nhwc")]
            nodes += [helper.make_node("Cast", [x], [t[0]], to=TensorProto.FLOAT),
                      helper.make_node("Transpose", [t[0]], [t[1]], perm=[0, 3, 1, 2]),
                      helper.make_node("Shape", [t[1]], [shape]),
                      helper.make_node("Reshape", [t[1], _const(m, name("g3"), [0, 32, -1])], [t[2]]),
                      helper.make_node("InstanceNormalization", [t[2], ones, zeros], [t[3]], epsilon=attrs["epsilon"]),
                      helper.make_node("Reshape", [t[3], shape], [t[4]]),
                      helper.make_node("Mul", [t[4], _unsq(m, nodes, gamma, name)], [t[5]]),
                      helper.make_node("Add", [t[5], _unsq(m, nodes, beta, name)], [t[6]])]
            last = t[6]
            if attrs["activation"] == 1 and silu:
                nodes += [helper.make_node("Sigmoid", [t[6]], [t[7]]), helper.make_node("Mul", [t[6], t[7]], [t[8]])]
                last = t[8]
            nodes += [helper.make_node("Transpose", [last], [t[9]], perm=[0, 2, 3, 1]),
                      helper.make_node("Cast", [t[9]], [n.output[0]], to=TensorProto.FLOAT16)]
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _const(m, name, vals):
    m.graph.initializer.append(numpy_helper.from_array(np.array(vals, np.int64), name))
    return name


def _unsq(m, nodes, v, name):
    """(C) -> (C, 1, 1) for a per-channel NCHW affine."""
    out = name("c11")
    nodes.append(helper.make_node("Unsqueeze", [v, _const(m, name("ax"), [1, 2])], [out]))
    return out


class LoweredDecoder:
    """The CPU runtime with the bundle's decoder_cuda.onnx (lowered) as its decoder."""

    def __init__(self, bundle: Bundle, path):
        self.rt, self.bundle = Runtime(bundle, "cpu"), bundle
        self.rt.variant_provider = "cuda"
        orig = bundle.graph_path
        bundle.graph_path = lambda name, provider=None: path if (name == "decoder" and provider) else orig(name, provider)

    def infer(self, name, feed):
        return self.rt.infer(name, feed)


def test_bundle_records_the_variant(bundle, actvar_ckpt, tmp_path):
    m = json.loads((bundle / "manifest.json").read_text())
    v = m["variants"]["decoder"]["cuda"]
    assert v["layout"] == "nhwc" and (bundle / v["file"]).is_file() and v["file"] in m["files"]
    model = onnx.load(str(bundle / v["file"]), load_external_data=False)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert {("com.microsoft", "NhwcConv"), ("com.microsoft", "GroupNorm")} <= ops
    assert not {op for d, op in ops if op in ("Conv", "InstanceNormalization", "Resize")}
    assert {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.output} == {"image": [2, 3, 256, 256]}
    b = Bundle.open(bundle)
    assert b.graph_path("decoder", "cuda").name == "decoder_cuda.onnx" and b.graph_path("decoder").name == "decoder.onnx"
    # fp32 bundles (exactness) and the tensorrt target keep the portable decoder alone
    for precision, target in (("fp32", "onnxruntime"), ("fp16", "tensorrt")):
        other = build_bundle(actvar_ckpt, tmp_path / f"{precision}_{target}", batch=1, precision=precision, target=target,
                             show_progress=False)
        assert json.loads((other / "manifest.json").read_text())["variants"] == {}
        assert not (other / "decoder_cuda.onnx").exists()


@pytest.mark.parametrize("silu", [True, False], ids=["lowered", "silu_dropped"])
def test_nhwc_decoder_matches_reference(bundle, models, feed, tmp_path, silu):
    """The lowered NHWC decoder passes the decoder's teacher-forced check (fp16 tolerance); with GroupNorm's SiLU
    dropped it fails it."""
    _, vae = models
    b = Bundle.open(bundle)
    path = tmp_path / "decoder_cuda_lowered.onnx"
    onnx.save(lower_contrib(onnx.load(str(b.graph_path("decoder", "cuda")), load_external_data=False), silu), str(path))
    r = compare_decoder(LoweredDecoder(b, path), vae, feed, "fp16")
    if silu:
        assert r.failures == [] and r.error <= r.tolerances[1], (r.error, r.tolerances)
        assert r.error > 1e-4            # it does round to fp16
    else:
        assert r.failures and all(f.startswith("decoder image: ") for f in r.failures)


@pytest.mark.gpu
def test_nhwc_decoder_on_cuda(bundle, models, feed):
    """The variant itself on the CUDA provider (the runtime picks it there) against the reference, beside the
    portable decoder on the same provider."""
    import os
    _, vae = models
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    b = Bundle.open(bundle)
    rt = Runtime(b, "cuda", cuda_graphs=False)
    assert rt.variant_provider == "cuda"
    r = compare_decoder(rt, vae, feed, "fp16")
    assert r.failures == [], (r.error, r.mean_error, r.tolerances)
    os.environ["ACTVAR_ORT_VARIANTS"] = "0"
    try:
        p = compare_decoder(Runtime(b, "cuda", cuda_graphs=False), vae, feed, "fp16")
    finally:
        del os.environ["ACTVAR_ORT_VARIANTS"]
    assert p.failures == []
    print(f"nhwc: max {r.error:.3e} mean {r.mean_error:.3e}; portable: max {p.error:.3e} mean {p.mean_error:.3e}; "
          f"tolerance {r.tolerances}")
