"""TensorRT on the CPU machine: parsing, plugin resolution and engine serialization of bundles.

Uses `tensorrt` if installed, else TensorRT-RTX (`pip install tensorrt-rtx-cu13`), whose builder needs no
GPU. Nothing here runs an engine (no GPU here; TensorRT-RTX engines refuse the lent Hopper GPUs).
"""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from actvar_export.bundle import Bundle, build_bundle
from actvar_export.errors import ActVarError

FP16 = "fp16"
BUILD = ["step_0", "step_8", "step_9", "decoder"]      # representative: first scale, both ActVAR scales, decoder
CUSTOM = ("ActVarTokenScatter", "ActVarExpertFFN")


@pytest.fixture(scope="module")
def trt():
    from actvar_export.trt import load_trt
    try:
        return load_trt()
    except ActVarError as e:
        pytest.skip(f"neither tensorrt nor tensorrt_rtx imports here ({e})")


@pytest.fixture(scope="module")
def bundles(trt, actvar_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt_bundles")
    return {low: build_bundle(actvar_ckpt, root / low, batch=1, precision=FP16, lowering=low, target="tensorrt",
                              show_progress=False)
            for low in ("portable", "plugin")}


def onnx_custom_counts(path):
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for n in m.graph.node:
        if n.domain == "actvar":
            assert n.op_type in CUSTOM
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# module loading and plugin registration
# ---------------------------------------------------------------------------------------------------
def test_package_import_does_not_import_tensorrt():
    code = ("import sys, actvar_export.trt, actvar_export.trt.api, actvar_export.trt.plugins, "
            "actvar_export.trt.engines, actvar_export.cli; "
            "bad = [m for m in ('tensorrt', 'tensorrt_rtx') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_load_trt(trt, monkeypatch):
    from actvar_export.trt import load_trt, trt_module_info
    assert hasattr(trt, "Builder") and hasattr(trt, "OnnxParser")
    assert trt_module_info(trt)["module"] in ("tensorrt", "tensorrt_rtx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(ActVarError, match="tensorrt.*tensorrt_rtx.*tensorrt-rtx-cu13"):
        load_trt()


def test_register_plugins_is_idempotent_and_resolvable(trt):
    from actvar_export.trt.plugins import register_plugins
    a = register_plugins(trt)
    b = register_plugins(trt)
    assert set(a) == set(CUSTOM) and all(a[k] is b[k] for k in a)
    reg = trt.get_plugin_registry()
    for name in CUSTOM:
        c = reg.get_creator(name, "1", "")
        assert c is a[name]
        assert (c.name, c.plugin_version, c.plugin_namespace) == (name, "1", "")


def test_creators_fields_round_trip(trt):
    from actvar_export.trt.plugins import plugin_classes, register_plugins
    creators = register_plugins(trt)
    scatter_cls, expert_cls = plugin_classes(trt)[:2]
    i32 = trt.PluginFieldType.INT32
    fc = trt.PluginFieldCollection([trt.PluginField("num_experts", np.array([16], np.int32), i32),
                                    trt.PluginField("top_k", np.array([12], np.int32), i32)])
    p = creators["ActVarExpertFFN"].create_plugin("e", fc, trt.TensorRTPhase.BUILD)
    assert isinstance(p, expert_cls) and (p.num_experts, p.top_k, p.num_outputs) == (16, 12, 2)
    assert (p.plugin_name, p.plugin_version, p.plugin_namespace) == ("ActVarExpertFFN", "1", "")
    q = creators["ActVarExpertFFN"].create_plugin("e", p.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert (q.num_experts, q.top_k) == (16, 12)
    c = q.clone()
    assert isinstance(c, expert_cls) and (c.num_experts, c.top_k) == (16, 12)
    s = creators["ActVarTokenScatter"].create_plugin("s", trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)
    assert isinstance(s, scatter_cls) and s.num_outputs == 1
    bad = trt.PluginFieldCollection([trt.PluginField("num_experts", np.array([4], np.int32), i32),
                                     trt.PluginField("top_k", np.array([5], np.int32), i32)])
    with pytest.raises(ActVarError, match="top_k=5"):
        creators["ActVarExpertFFN"].create_plugin("e", bad, trt.TensorRTPhase.BUILD)
    with pytest.raises(ActVarError, match="num_experts"):
        creators["ActVarExpertFFN"].create_plugin("e", trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)


def test_workspace_size_port_matches_the_c_layout():
    from actvar_export.trt.plugins import expert_ffn_workspace_size as ws
    # (T, C, hidden, N, top_k, dtype) -> bytes of actvarExpertFfnWorkspaceSize (values from the C function)
    pinned = {(384, 128, 512, 16, 12, 1): 8828416, (384, 128, 512, 16, 12, 0): 833024,
              (64, 1024, 4096, 16, 12, 2): 11018240, (1, 1920, 7680, 64, 48, 1): 8466688, (0, 128, 512, 16, 12, 1): 0}
    for args, want in pinned.items():
        assert ws(*args) == want, args


# ---------------------------------------------------------------------------------------------------
# real bundles: parse every graph, build representative engines
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lowering", ["portable", "plugin"])
def test_every_graph_parses_and_plugins_resolve(bundles, lowering):
    from actvar_export.trt.engines import build_engines
    b = Bundle.open(bundles[lowering])
    m = b.manifest
    res = build_engines(b.path, parse_only=True, progress=False)
    assert set(res["graphs"]) == set(m["graphs"])
    s_by_scale = {s["scale"]: s for s in m["static_sizes"]}
    for name, g in res["graphs"].items():
        rep = g["report"]
        assert g["file"] is None
        assert rep["strongly_typed"] in (True, None)        # None: the API has no flag (always typed)
        counts = onnx_custom_counts(b.graph_path(name))
        if lowering == "portable":
            assert counts == {} and rep["plugin_layers"] == []
        got = {}
        for layer in rep["plugin_layers"]:
            assert layer["ours"] and layer["version"] == "1" and layer["namespace"] == ""
            got[layer["plugin"]] = got.get(layer["plugin"], 0) + 1
            if layer["plugin"] == "ActVarTokenScatter":          # x fp32 (S, L, C) in the residual stream
                assert [o["dtype"] for o in layer["outputs"]] == ["FLOAT"]
            else:                                                # out in the graph precision, experts int32
                si = int(name.split("_")[1])
                T = 2 * m["batch"] * s_by_scale[si]["k_t"]
                assert [o["dtype"] for o in layer["outputs"]] == ["HALF", "INT32"]
                assert layer["outputs"][0]["shape"] == [T, m["model"]["width"]]
                assert layer["outputs"][1]["shape"] == [T, s_by_scale[si]["k_w"]]
        assert got == counts == g["plugin_layers"], name
        if name.startswith("step_"):
            outs = rep["outputs"]
            assert outs["kv_out"]["dtype"] == "HALF" and outs["logits"]["dtype"] == "FLOAT"
            assert outs["idx"]["dtype"] == "INT64" and outs["f_hat_out"]["dtype"] == "FLOAT"
            assert outs["kv_out"]["shape"] == m["graphs"][name]["outputs"]["kv_out"][1]
        else:
            assert rep["outputs"]["image"] == {"dtype": "FLOAT", "shape": [1, 3, 256, 256]}
    if lowering == "plugin":
        act = [si for si in range(10) if si in m["actvar"]["active_scales"]]
        depth = m["model"]["depth"]
        for si in act:
            assert res["graphs"][f"step_{si}"]["plugin_layers"] == {"ActVarTokenScatter": depth, "ActVarExpertFFN": depth}


def test_build_plugin_engines(bundles):
    from actvar_export.trt.engines import ENGINES_JSON, build_engines
    path = bundles["plugin"]
    mani = sha256(path / "manifest.json")
    res = build_engines(path, names=BUILD, progress=False)
    assert sha256(path / "manifest.json") == mani             # the manifest is never touched
    Bundle.open(path)                                          # and the bundle still verifies
    doc = json.loads((path / ENGINES_JSON).read_text())
    assert doc["runnable_here"] is False and "no engine has been executed" in doc["reason"]
    assert doc["tensorrt"] == res["tensorrt"] and doc["tensorrt"]["module"] in ("tensorrt", "tensorrt_rtx")
    assert doc["lowering"] == "plugin" and doc["precision"] == FP16 and set(doc["plugins"]) == set(CUSTOM)
    assert list(doc["engines"]) == BUILD
    for name in BUILD:
        e = doc["engines"][name]
        f = path / e["file"]
        assert e["file"] == f"{name}.engine" and f.stat().st_size == e["bytes"] > 0
        assert sha256(f) == e["sha256"] == res["graphs"][name]["sha256"]
        assert e["onnx_sha256"] == Bundle.open(path, verify=False).manifest["files"][f"{name}.onnx"]["sha256"]
    assert doc["engines"]["step_9"]["plugin_layers"] == {"ActVarTokenScatter": 2, "ActVarExpertFFN": 2}
    assert doc["engines"]["step_0"]["plugin_layers"] == {} and doc["engines"]["decoder"]["plugin_layers"] == {}
    assert not list(path.glob(".*.tmp"))                       # no temporary files left


def test_build_portable_engines_and_merge(bundles):
    from actvar_export.trt.engines import ENGINES_JSON, build_engines
    path = bundles["portable"]
    build_engines(path, names=["step_9"], progress=False)
    build_engines(path, names=["step_0"], progress=False)       # a second run keeps the first's entry
    doc = json.loads((path / ENGINES_JSON).read_text())
    assert list(doc["engines"]) == ["step_0", "step_9"] and doc["plugins"] is None
    for e in doc["engines"].values():
        assert (path / e["file"]).stat().st_size == e["bytes"] > 0 and e["plugin_layers"] == {}
    with pytest.raises(ActVarError, match="unknown graph name.*step_10"):
        build_engines(path, names=["step_10"], progress=False)


# ---------------------------------------------------------------------------------------------------
# synthetic one-node bundles: the plugins' type support and error reporting
# ---------------------------------------------------------------------------------------------------
def fake_bundle(root, graphs, precision="fp16", lowering="plugin"):
    """A directory Bundle.open accepts: the given {name: (nodes, inputs, outputs)} graphs + manifest."""
    import onnx
    from onnx import helper
    root.mkdir(parents=True, exist_ok=True)
    tp = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
          "bfloat16": onnx.TensorProto.BFLOAT16, "int32": onnx.TensorProto.INT32, "int64": onnx.TensorProto.INT64}
    man = {"format": 1, "precision": precision, "lowering": lowering, "graphs": {}, "files": {}}
    for name, (nodes, ins, outs) in graphs.items():
        vi = lambda d: [helper.make_tensor_value_info(n, tp[t], s) for n, (t, s) in d.items()]
        g = helper.make_graph(nodes, name, vi(ins), vi(outs))
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("actvar", 1)],
                                  ir_version=10)
        onnx.save(model, root / f"{name}.onnx")
        data = (root / f"{name}.onnx").read_bytes()
        man["graphs"][name] = {"file": f"{name}.onnx", "inputs": {k: list(v) for k, v in ins.items()},
                               "outputs": {k: list(v) for k, v in outs.items()}}
        man["files"][f"{name}.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (root / "manifest.json").write_text(json.dumps(man))
    return root


def expert_graph(h="float16", w=None, N=4, k=2, T=6, C=32):
    from onnx import helper
    w = w or h
    H = 4 * C
    node = helper.make_node("ActVarExpertFFN", ["h", "r", "w1", "b1", "w2", "b2"], ["o", "e"], domain="actvar",
                            plugin_version="1", plugin_namespace="", num_experts=N, top_k=k)
    ins = {"h": (h, [T, C]), "r": ("float32", [T, N]), "w1": (w, [H, C]), "b1": (w, [H]), "w2": (w, [C, H]),
           "b2": (w, [C])}
    return [node], ins, {"o": (h, [T, C]), "e": ("int32", [T, k])}


def scatter_graph(x="float32", idx="int32", S=2, L=9, K=5, C=16):
    from onnx import helper
    node = helper.make_node("ActVarTokenScatter", ["x", "i", "u"], ["y"], domain="actvar", plugin_version="1",
                            plugin_namespace="")
    return [node], {"x": (x, [S, L, C]), "i": (idx, [S, K]), "u": (x, [S, K, C])}, {"y": (x, [S, L, C])}


def test_plugin_types_supported_per_contract(trt, tmp_path):
    from actvar_export.trt.engines import build_engines
    graphs = {"expert_f16": expert_graph("float16"), "expert_f32": expert_graph("float32", N=8, k=8),
              "scatter_f32": scatter_graph("float32"), "scatter_f16": scatter_graph("float16")}
    if hasattr(trt.DataType, "BF16"):
        graphs["expert_bf16"] = expert_graph("bfloat16", N=16, k=3, C=64)
    res = build_engines(fake_bundle(tmp_path / "ok", graphs), progress=False)
    for name, g in res["graphs"].items():
        assert g["bytes"] > 0
        assert g["plugin_layers"] == {("ActVarExpertFFN" if name.startswith("expert") else "ActVarTokenScatter"): 1}


@pytest.mark.parametrize("graph, needle", [
    (expert_graph("float16", w="float32"), "failed to build"),          # weights must have h's type
    (scatter_graph("float32", idx="int64"), "failed to build"),         # idx is int32
    (expert_graph("float16", N=4, k=5), "top_k=5 outside"),             # the creator's own message
    (expert_graph("float16", N=3), "inconsistent shapes"),              # hidden % N != 0
])
def test_plugin_rejections_name_the_graph(trt, tmp_path, graph, needle):
    from actvar_export.trt.engines import build_engines
    with pytest.raises(ActVarError, match=f"^bad .*{needle}"):
        build_engines(fake_bundle(tmp_path / "b", {"bad": graph}), progress=False)


def test_parser_errors_are_collected(trt, tmp_path):
    from onnx import helper
    from actvar_export.trt.engines import build_engines
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("NoSuchOp", ["y"], ["z"], domain="actvar", plugin_version="1", plugin_namespace="")]
    p = fake_bundle(tmp_path / "b", {"g": (nodes, {"x": ("float32", [2, 3])}, {"z": ("float32", [2, 3])})}, "fp32")
    with pytest.raises(ActVarError, match=r"^g \(g.onnx\): the ONNX parser reported 1 error.*NoSuchOp"):
        build_engines(p, progress=False)


def test_child_env_aliases_the_unversioned_rtx_library(trt, tmp_path):
    import ctypes
    from actvar_export.trt.engines import _child_env
    if trt.__name__ != "tensorrt_rtx":
        pytest.skip("the alias concerns TensorRT-RTX only")
    try:
        ctypes.CDLL("libtensorrt_rtx.so")
        pytest.skip("libtensorrt_rtx.so resolves already here")
    except OSError:
        pass
    env = _child_env("tensorrt_rtx", tmp_path / "lib")
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(tmp_path / "lib")
    link = tmp_path / "lib" / "libtensorrt_rtx.so"
    assert link.is_symlink() and link.resolve().name.startswith("libtensorrt_rtx.so.")


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
from .test_cli import assert_one_line_error, run  # noqa: E402  (the CLI helpers of the CLI tests)


def test_cli_engines(bundles, tmp_path):
    path = bundles["plugin"]
    r = run("engines", "--bundle", path, "--graphs", "step_9")
    assert r.exit_code == 0, r.output
    assert "engines.json" in r.output and "not run" in r.output
    doc = json.loads((path / "engines.json").read_text())
    assert "step_9" in doc["engines"] and doc["runnable_here"] is False
    assert_one_line_error(run("engines", "--bundle", tmp_path / "nope"), "no such bundle directory")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("engines", "--bundle", tmp_path / "empty"), "not a bundle")
    assert_one_line_error(run("engines", "--bundle", path, "--graphs", "step_10"), "unknown graph", "step_10")
    assert "engines" in run("--help").output


def test_engines_refuses_an_onnxruntime_target_bundle(actvar_ckpt, tmp_path):
    """A bundle built for ONNX Runtime (MultiHeadAttention, FastGelu nodes) is refused in one line before
    TensorRT is loaded; its tensorrt-target twin parses (test_every_graph_parses_and_plugins_resolve)."""
    path = build_bundle(actvar_ckpt, tmp_path / "ort", batch=1, precision=FP16, show_progress=False)
    m = Bundle.open(path).manifest
    assert (m["target"], m["attention"], m["gelu"]) == ("onnxruntime", "com.microsoft.MultiHeadAttention",
                                                        "com.microsoft.FastGelu")
    assert_one_line_error(run("engines", "--bundle", path), "--target onnxruntime", "rebuild it with --target tensorrt")
