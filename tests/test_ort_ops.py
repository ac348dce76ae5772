"""libactvar_ort_ops.so: the plugin ops inside ONNX Runtime's CUDA execution provider.

CPU (CI): a `plugin` bundle asked to run on CUDA without the library or without a GPU ends with one error line
naming what is missing. (The library's build, exports and registration in a CPU session: test_plugins_build.py.)
GPU (`gpu` marker, onnxruntime-gpu + the built library; scripts/device_check.sh ortops): single-node graphs of both
ops on CUDAExecutionProvider against the reference semantics of actvar_export.ops and the CPU reference ops,
attribute errors at kernel creation, CUDA graph capture, and fp32/fp16 plugin bundles teacher-forced against the
PyTorch reference.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

from actvar_export import ops
from actvar_export.bundle import Bundle, build_bundle
from actvar_export.errors import ActVarError
from actvar_export.runtime import custom_ops

from .test_cli import assert_one_line_error, run

CUDA = "CUDAExecutionProvider"
ATTRS = {"plugin_version": "1", "plugin_namespace": ""}
DTYPES = {"fp32": (TP.FLOAT, torch.float32), "fp16": (TP.FLOAT16, torch.float16), "bf16": (TP.BFLOAT16, torch.bfloat16)}
FFN_TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 1e-2}   # plugins/expert_routing/CONTRACT.md


@pytest.fixture(scope="module")
def plugin_bundle(actvar_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ortops") / "plugin_fp32_b1"
    return build_bundle(actvar_ckpt, out, batch=1, precision="fp32", lowering="plugin", show_progress=False)


# ---------------------------------------------------------------- CPU: what is missing, on one line

def test_missing_library_and_provider_named(monkeypatch, tmp_path):
    monkeypatch.setenv(custom_ops.ENV_VAR, str(tmp_path / "nowhere" / "libactvar_ort_ops.so"))
    with pytest.raises(ActVarError) as e:
        custom_ops.cuda_ops_library(["CPUExecutionProvider"])
    msg = str(e.value)
    assert "\n" not in msg
    assert f"libactvar_ort_ops.so (not found at {tmp_path / 'nowhere'}" in msg and "ACTVAR_ORT_OPS_LIB" in msg
    assert "CUDAExecutionProvider" in msg and "onnxruntime-gpu" in msg


def test_missing_library_alone_named(monkeypatch, tmp_path):
    monkeypatch.setenv(custom_ops.ENV_VAR, str(tmp_path / "libactvar_ort_ops.so"))
    with pytest.raises(ActVarError) as e:
        custom_ops.cuda_ops_library([CUDA, "CPUExecutionProvider"])
    assert "libactvar_ort_ops.so (not found" in str(e.value) and "onnxruntime-gpu" not in str(e.value)


def test_cli_plugin_bundle_on_cuda_one_error_line(plugin_bundle, actvar_ckpt, monkeypatch, tmp_path):
    """`validate --providers cuda` of a plugin bundle here (no library at the given path, CPU onnxruntime):
    one Error line naming the first thing missing (the CUDA provider of onnxruntime-gpu), exit 1, before the
    model is built or any graph loaded."""
    import onnxruntime as ort
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    monkeypatch.setenv(custom_ops.ENV_VAR, str(tmp_path / "libactvar_ort_ops.so"))
    r = run("validate", "--bundle", plugin_bundle, "--ckpt", actvar_ckpt, "--providers", "cuda,cpu")
    assert_one_line_error(r, "lacks CUDAExecutionProvider", "onnxruntime-gpu", code=2)   # validate: bad input is 2
    assert "teacher forcing" not in r.output


def test_cpu_needs_no_library(plugin_bundle, monkeypatch, tmp_path):
    """Only plugin bundles on CUDA need the library: on the CPU the reference ops run (no check)."""
    from actvar_export.runtime.ort_runtime import Runtime
    monkeypatch.setenv(custom_ops.ENV_VAR, str(tmp_path / "libactvar_ort_ops.so"))
    backend = Runtime(Bundle.open(plugin_bundle), "cpu")
    assert backend.cuda_ops is None
    backend.session("step_9")   # the reference ops serve the actvar nodes


# ---------------------------------------------------------------- GPU

def _require(reason: str):
    if os.environ.get("ACTVAR_REQUIRE_ORT_OPS"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ort_cuda():
    """onnxruntime with CUDA, the library and a GPU; else skip (fail under ACTVAR_REQUIRE_ORT_OPS=1)."""
    import onnxruntime as ort
    if CUDA not in ort.get_available_providers():
        _require("needs onnxruntime-gpu (CUDAExecutionProvider); run on the device via scripts/device_check.sh ortops")
    lib = custom_ops.library_path()
    if not lib.is_file():
        _require(f"libactvar_ort_ops.so not built ({lib})")
    if custom_ops.cuda_device_count(lib) <= 0:
        _require("needs a CUDA GPU")
    return ort, lib


def _model(nodes, inputs, outputs, domain="actvar"):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(n, t, None) for n, t in outputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    m.ir_version = 10
    return m.SerializeToString()


def _session(ort, lib, model, provider_options=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(str(lib))
    opts = {"use_tf32": "0", **(provider_options or {})}
    return ort.InferenceSession(model, so, providers=[(CUDA, opts)])


def _cast(name, to):
    return helper.make_node("Cast", [name], [f"{name}_c"], to=to)


def _scatter_model(dt: int, inplace: bool):
    """x (f32) [-> x*1, producing a buffer the op may reuse] -> Cast(dt) -> ActVarTokenScatter -> Cast(f32)."""
    nodes, x = [], "x"
    if inplace:
        nodes.append(helper.make_node("Mul", ["x", "one"], ["xm"]))
        x = "xm"
    nodes += [_cast(x, dt), _cast("upd", dt),
              helper.make_node("ActVarTokenScatter", [f"{x}_c", "idx", "upd_c"], ["y"], domain="actvar", **ATTRS),
              _cast("y", TP.FLOAT)]
    ins = [("x", TP.FLOAT, None), ("idx", TP.INT32, None), ("upd", TP.FLOAT, None)] + ([("one", TP.FLOAT, [])] if inplace else [])
    return _model(nodes, ins, [("y_c", TP.FLOAT)])


def _ffn_model(dt: int, num_experts: int, top_k: int, **attrs):
    names = ["h", "w1", "b1", "w2", "b2"]
    nodes = [_cast(n, dt) for n in names]
    nodes.append(helper.make_node("ActVarExpertFFN", ["h_c", "router", "w1_c", "b1_c", "w2_c", "b2_c"], ["o", "e"],
                                  domain="actvar", num_experts=num_experts, top_k=top_k, **{**ATTRS, **attrs}))
    nodes.append(_cast("o", TP.FLOAT))
    ins = [(n, TP.FLOAT, None) for n in names] + [("router", TP.FLOAT, None)]
    return _model(nodes, ins, [("o_c", TP.FLOAT), ("e", TP.INT32)])


def _rounded(a: np.ndarray, tdt: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(a).to(tdt)


def _ffn_inputs(T, C, N, seed):
    g = np.random.default_rng(seed)
    H = 4 * C
    return {"h": g.standard_normal((T, C), np.float32), "router": g.standard_normal((T, N), np.float32),
            "w1": (g.standard_normal((H, C)) / np.sqrt(C)).astype(np.float32),
            "b1": (0.1 * g.standard_normal(H)).astype(np.float32),
            "w2": (g.standard_normal((C, H)) / np.sqrt(H)).astype(np.float32),
            "b2": (0.1 * g.standard_normal(C)).astype(np.float32)}


def _ffn_reference(feed, tdt, N, k):
    """float64 expert FFN of the inputs as the graph's Casts round them; experts from the float32 router."""
    t = {n: _rounded(feed[n], tdt).double() for n in ("h", "w1", "b1", "w2", "b2")}
    experts = ops.route_experts(torch.from_numpy(feed["router"]), k)
    return ops.expert_ffn(t["h"], experts, t["w1"], t["b1"], t["w2"], t["b2"], N), experts


def _rel(out: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.double().numpy()
    return float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("inplace", [False, True])
def test_token_scatter_on_cuda_is_exact(ort_cuda, precision, inplace):
    ort, lib = ort_cuda
    dt, tdt = DTYPES[precision]
    S, L, K, C = 6, 256, 100, 192
    g = np.random.default_rng(1)
    x = g.standard_normal((S, L, C), np.float32)
    upd = g.standard_normal((S, K, C), np.float32)
    idx = np.sort(np.stack([g.choice(L, K, replace=False) for _ in range(S)]), axis=1).astype(np.int32)
    feed = {"x": x, "idx": idx, "upd": upd, **({"one": np.array(1.0, np.float32)} if inplace else {})}
    got = _session(ort, lib, _scatter_model(dt, inplace)).run(None, feed)[0]
    ref = ops.scatter_tokens(_rounded(x, tdt), torch.from_numpy(idx).long(), _rounded(upd, tdt)).float().numpy()
    assert np.array_equal(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("T", [300, 4608])   # the small-T dense path and the routed path (> 4096 tokens)
def test_expert_ffn_on_cuda_matches_reference(ort_cuda, precision, T):
    ort, lib = ort_cuda
    dt, tdt = DTYPES[precision]
    C, N, k = 256, 16, 12
    feed = _ffn_inputs(T, C, N, seed=T)
    out, experts = _session(ort, lib, _ffn_model(dt, N, k)).run(None, feed)
    ref, ref_experts = _ffn_reference(feed, tdt, N, k)
    assert np.array_equal(experts, ref_experts.numpy())
    assert _rel(out, ref) <= FFN_TOL[precision]


@pytest.mark.gpu
def test_cuda_ops_equal_cpu_reference_ops(ort_cuda):
    """The same fp32 graph of both ops: CUDA (this library) vs the CPU reference ops of the runtime's CPU path."""
    ort, lib = ort_cuda
    from actvar_export.runtime.ort_ops import ORT_CONTRIB_DOMAIN, register
    N, k, T, C = 16, 12, 512, 128
    feed = _ffn_inputs(T, C, N, seed=5)
    ins = [(n, TP.FLOAT, None) for n in ("h", "router", "w1", "b1", "w2", "b2", "x")] + [("idx", TP.INT32, None),
                                                                                        ("shape", TP.INT64, [3])]

    def model(domain):
        nodes = [helper.make_node("ActVarExpertFFN", ["h", "router", "w1", "b1", "w2", "b2"], ["o", "e"],
                                  domain=domain, num_experts=N, top_k=k, **ATTRS),
                 helper.make_node("Reshape", ["o", "shape"], ["o3"]),
                 helper.make_node("ActVarTokenScatter", ["x", "idx", "o3"], ["y"], domain=domain, **ATTRS)]
        return _model(nodes, ins, [("y", TP.FLOAT), ("e", TP.INT32)], domain)
    g = np.random.default_rng(6)
    feed.update(x=g.standard_normal((4, 256, C), np.float32), shape=np.array([4, T // 4, C], np.int64),
                idx=np.sort(np.stack([g.choice(256, T // 4, replace=False) for _ in range(4)]), axis=1).astype(np.int32))
    y_gpu, e_gpu = _session(ort, lib, model("actvar")).run(None, feed)
    so = ort.SessionOptions()
    so.register_custom_ops_library(register())
    y_cpu, e_cpu = ort.InferenceSession(model(ORT_CONTRIB_DOMAIN), so, providers=["CPUExecutionProvider"]).run(None, feed)
    assert np.array_equal(e_gpu, e_cpu)
    assert _rel(y_gpu, torch.from_numpy(y_cpu)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("attrs, needle", [
    ({"top_k": 0}, "top_k = 0 outside [1, num_experts = 16]"),
    ({"top_k": 17}, "top_k = 17 outside [1, num_experts = 16]"),
    ({"num_experts": 65, "top_k": 2}, "num_experts = 65 outside [1, 64]"),
    ({"plugin_version": "2"}, "plugin_version '2' is not implemented"),
    ({"plugin_namespace": "other"}, "plugin_namespace 'other' is not served"),
])
def test_bad_attributes_fail_at_session_creation(ort_cuda, attrs, needle):
    ort, lib = ort_cuda
    a = {"num_experts": 16, "top_k": 12, **attrs}
    with pytest.raises(Exception, match="ActVarExpertFFN node") as e:
        _session(ort, lib, _ffn_model(TP.FLOAT, a.pop("num_experts"), a.pop("top_k"), **a))
    assert needle in str(e.value)


@pytest.mark.gpu
def test_bad_shapes_fail_at_run(ort_cuda):
    ort, lib = ort_cuda
    feed = _ffn_inputs(64, 128, 16, seed=2)
    feed["w1"], feed["b1"], feed["w2"] = feed["w1"][:392], feed["b1"][:392], np.ascontiguousarray(feed["w2"][:, :392])
    with pytest.raises(Exception, match="hidden 392 .*multiple of num_experts 16"):
        _session(ort, lib, _ffn_model(TP.FLOAT, 16, 12)).run(None, feed)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(ort_cuda):
    """enable_cuda_graph: the ops neither synchronise nor allocate outside ONNX Runtime's arena, so the session is
    captured and replayed; every replay with new inputs (same addresses) matches the reference."""
    ort, lib = ort_cuda
    N, k, T, C = 16, 12, 1024, 256
    sess = _session(ort, lib, _ffn_model(TP.FLOAT16, N, k), {"enable_cuda_graph": "1"})
    feeds = [_ffn_inputs(T, C, N, seed=s) for s in range(4)]
    bound = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in feeds[0].items()}
    outs = {"o_c": ort.OrtValue.ortvalue_from_shape_and_type([T, C], np.float32, "cuda", 0),
            "e": ort.OrtValue.ortvalue_from_shape_and_type([T, k], np.int32, "cuda", 0)}
    b = sess.io_binding()
    for n, v in bound.items():
        b.bind_ortvalue_input(n, v)
    for n, v in outs.items():
        b.bind_ortvalue_output(n, v)
    for feed in feeds:
        for n, v in bound.items():
            v.update_inplace(feed[n])
        sess.run_with_iobinding(b)
        ref, ref_experts = _ffn_reference(feed, torch.float16, N, k)
        assert np.array_equal(outs["e"].numpy(), ref_experts.numpy())
        assert _rel(outs["o_c"].numpy(), ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plugin_bundle_on_cuda_teacher_forced(ort_cuda, actvar_ckpt, tmp_path, precision):
    """A plugin bundle through the runtime on CUDA (the library registered by it, TF32 off for fp32): every scale
    within the product's validation rules (fp32: 1e-4) and selections agreeing, end to end included. Eight images:
    the fp16 end-to-end rule compares two agreement statistics, and over two images of the tiny model each moves
    by several points between classes (CPU provider, same bundle: 9.5-18.6 % for the bundle, 7.0-22.7 % for the
    autocast reference)."""
    from actvar_export.checkpoint import build_models, load_checkpoint
    from actvar_export.generate import SampleSettings
    from actvar_export.runtime.ort_runtime import Runtime
    from actvar_export.validate import validate_bundle
    labels = [5, 400, 1, 2, 33, 777, 123, 999]
    bundle = Bundle.open(build_bundle(actvar_ckpt, tmp_path / "b", batch=len(labels), precision=precision,
                                      lowering="plugin", show_progress=False))
    backend = Runtime(bundle, "cuda")
    assert backend.cuda_ops is not None
    model, vae = build_models(load_checkpoint(actvar_ckpt))
    rep = validate_bundle(backend, model, vae, labels, seed=7,
                          settings=SampleSettings(sampler="noise", cfg=4.0, top_k=900, top_p=0.95), precision=precision)
    assert rep.failures == [], rep.table()
    assert {"sel_idx", "experts"} <= set(rep.scales[9].agreement)
    if precision == "fp32":
        assert max(max(s.errors.values()) for s in rep.scales if s.errors) <= 1e-4
