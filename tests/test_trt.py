"""TensorRT on the CPU machine: parsing, plugin resolution and engine serialization of bundles.

Uses `tensorrt` if installed, else TensorRT-RTX (`pip install tensorrt-rtx-cu13`), whose builder needs no
GPU. The `plugin` lowering's nodes become plugins of libactvar_trt_plugins.so (plugins/trt), built once per
session by tests/conftest.py `plugin_build`. Nothing here runs an engine (no GPU here; TensorRT-RTX engines
refuse the lent Hopper GPUs).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from actvar_export.bundle import FORMAT, Bundle, build_bundle, write_manifest
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
def plugin_lib(plugin_build):
    """The session's libactvar_trt_plugins.so, made the one `engines` uses (ACTVAR_TRT_PLUGIN_LIB) for this module."""
    if plugin_build["trt"] is None:
        pytest.skip("TensorRT plugin library not built (no TensorRT headers)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTVAR_TRT_PLUGIN_LIB", str(plugin_build["trt"]))
        yield plugin_build["trt"]


@pytest.fixture(scope="module")
def bundles(trt, actvar_ckpt, tmp_path_factory):
    """fp16 bundles of both lowerings and a bf16 plugin bundle, as `build` writes them."""
    root = tmp_path_factory.mktemp("trt_bundles")
    return {k: build_bundle(actvar_ckpt, root / k, batch=1, precision=p, lowering=low, target="tensorrt",
                            show_progress=False)
            for k, low, p in (("portable", "portable", FP16), ("plugin", "plugin", FP16), ("plugin_bf16", "plugin", "bf16"))}


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
    code = ("import sys, actvar_export.trt, actvar_export.trt.api, actvar_export.trt.plugin_library, "
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


_REGISTRY_PROBE = r"""
import ctypes, json, sys
import numpy as np
from actvar_export.trt.api import load_trt
from actvar_export.trt.plugin_library import load_into_registry
trt = load_trt()
load_into_registry(trt, sys.argv[1])
reg = trt.get_plugin_registry()
i32 = trt.PluginFieldType.INT32
out = {}
for name in ("ActVarTokenScatter", "ActVarExpertFFN"):
    c = reg.get_creator(name, "1", "")
    out[name] = {"version": c.plugin_version, "namespace": c.plugin_namespace,
                 "fields": [f.name for f in c.field_names]}
def make(n, k):
    fc = trt.PluginFieldCollection([trt.PluginField("num_experts", np.array([n], np.int32), i32),
                                    trt.PluginField("top_k", np.array([k], np.int32), i32)])
    p = reg.get_creator("ActVarExpertFFN", "1", "").create_plugin("e", fc, trt.TensorRTPhase.BUILD)
    if p is None:
        return None
    core = p.get_capability_interface(trt.PluginCapabilityType.CORE)
    return [core.plugin_name, core.plugin_version, core.plugin_namespace]
out["good"] = make(16, 12)
out["bad"] = make(4, 0)
try:
    load_into_registry(trt, sys.argv[1])
    out["second"] = "loaded"
except Exception as e:
    out["second"] = str(e)
print(json.dumps(out))
"""


def test_plugin_library_registers_its_creators(trt, plugin_lib):
    """In a fresh process: TensorRT loads the library; both creators (version "1", namespace "") are registered with
    their attributes; the expert creator makes a plugin from good fields and returns None (its message logged, no
    crash) for top_k 0; loading again is refused (creators of these names are already there)."""
    r = subprocess.run([sys.executable, "-c", _REGISTRY_PROBE, str(plugin_lib)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ActVarTokenScatter"] == {"version": "1", "namespace": "", "fields": []}
    assert out["ActVarExpertFFN"] == {"version": "1", "namespace": "", "fields": ["num_experts", "top_k"]}
    assert out["good"] == ["ActVarExpertFFN", "1", ""] and out["bad"] is None
    assert "ActVarExpertFFN 'e': top_k=0 outside [1, 4]" in r.stderr
    assert "registered before" in out["second"]


def test_self_registering_variant(trt, plugin_build):
    """libactvar_trt_plugins_registered.so (linked to TensorRT-RTX's library) registers both creators when merely
    dlopen()ed, as Triton's TensorRT backend and trtexec --staticPlugins load plugin libraries."""
    lib = plugin_build["trt_registered"]
    if lib is None or trt.__name__ != "tensorrt_rtx":
        pytest.skip("the self-registering variant is built here against TensorRT-RTX's library only")
    code = ("import ctypes, sys; from actvar_export.trt.api import load_trt; trt = load_trt(('tensorrt_rtx',)); "
            "reg = trt.get_plugin_registry(); "
            "before = [reg.get_creator(n, '1', '') is None for n in ('ActVarTokenScatter', 'ActVarExpertFFN')]; "
            "ctypes.CDLL(sys.argv[1]); "
            "after = [reg.get_creator(n, '1', '') is not None for n in ('ActVarTokenScatter', 'ActVarExpertFFN')]; "
            "print(before, after)")
    r = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["[True,", "True]", "[True,", "True]"], r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("variant", ["trt_registered", "trt"])
def test_dlopen_only_consumer_polygraphy(trt, plugin_build, tmp_path, variant):
    """Polygraphy's --plugins only dlopen()s a library (as Triton's TensorRT backend does): with the self-registering
    variant it builds an engine of an ActVarExpertFFN graph; with the loadLibrary-style library the parser finds no
    plugin, which is why README points such consumers to the variant."""
    import shutil
    from actvar_export.trt.engines import _child_env
    lib = plugin_build[variant]
    if lib is None or trt.__name__ != "tensorrt_rtx" or shutil.which("polygraphy") is None:
        pytest.skip("needs polygraphy, TensorRT-RTX and the self-registering variant (built against TensorRT-RTX)")
    b = fake_bundle(tmp_path / "b", {"g": expert_graph("float16")})
    env = dict(_child_env("tensorrt_rtx", tmp_path / "lib"), POLYGRAPHY_USE_TENSORRT_RTX="1")
    r = subprocess.run(["polygraphy", "convert", str(b / "g.onnx"), "--plugins", str(lib), "--strongly-typed",
                        "-o", str(tmp_path / "g.engine")], capture_output=True, text=True, env=env, timeout=600)
    if variant == "trt_registered":
        assert r.returncode == 0 and (tmp_path / "g.engine").stat().st_size > 0, r.stdout[-2000:] + r.stderr[-2000:]
    else:
        assert r.returncode != 0 and "Plugin not found" in r.stdout + r.stderr


def test_missing_library_is_one_error_before_any_work(bundles, tmp_path, monkeypatch):
    from actvar_export.trt.engines import build_engines
    path = bundles["plugin"]
    before = sorted(p.name for p in path.iterdir())
    monkeypatch.setenv("ACTVAR_TRT_PLUGIN_LIB", str(tmp_path / "nope" / "libactvar_trt_plugins.so"))
    with pytest.raises(ActVarError, match=r"libactvar_trt_plugins.so is not built.*cmake -S plugins .*TensorRT_INCLUDE_DIR"):
        build_engines(path, names=["step_9"], progress=False)
    assert sorted(p.name for p in path.iterdir()) == before
    assert_one_line_error(run("engines", "--bundle", path, "--graphs", "step_9"), "libactvar_trt_plugins.so is not built")
    build_engines(bundles["portable"], names=["step_0"], parse_only=True, progress=False)   # portable: no library


# ---------------------------------------------------------------------------------------------------
# real bundles: parse every graph, build representative engines
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["portable", "plugin", "plugin_bf16"])
def test_every_graph_parses_and_plugins_resolve(bundles, plugin_lib, kind):
    from actvar_export.trt.engines import build_engines
    lowering = kind.split("_")[0]
    b = Bundle.open(bundles[kind])
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
                assert [o["dtype"] for o in layer["outputs"]] == [{"fp16": "HALF", "bf16": "BF16"}[m["precision"]], "INT32"]
                assert layer["outputs"][0]["shape"] == [T, m["model"]["width"]]
                assert layer["outputs"][1]["shape"] == [T, s_by_scale[si]["k_w"]]
        assert got == counts == g["plugin_layers"], name
        if name.startswith("step_"):
            outs = rep["outputs"]
            for kv in ("k_out.0", f"v_out.{m['model']['depth'] - 1}"):     # the per-block caches, first and last
                assert outs[kv]["dtype"] == {"fp16": "HALF", "bf16": "BF16"}[m["precision"]]
                assert outs[kv]["shape"] == m["graphs"][name]["outputs"][kv][1]
            assert outs["logits"]["dtype"] == "FLOAT"
            assert outs["idx"]["dtype"] == "INT64" and outs["f_hat_out"]["dtype"] == "FLOAT"
        else:
            assert rep["outputs"]["image"] == {"dtype": "FLOAT", "shape": [1, 3, 256, 256]}
    if lowering == "plugin":
        act = [si for si in range(10) if si in m["actvar"]["active_scales"]]
        depth = m["model"]["depth"]
        for si in act:
            assert res["graphs"][f"step_{si}"]["plugin_layers"] == {"ActVarTokenScatter": depth, "ActVarExpertFFN": depth}


def test_build_plugin_engines(bundles, plugin_lib):
    from actvar_export.trt.engines import ENGINES_JSON, build_engines
    path = bundles["plugin"]
    mani = sha256(path / "manifest.json")
    res = build_engines(path, names=BUILD, progress=False)
    assert sha256(path / "manifest.json") == mani             # the manifest is never touched
    Bundle.open(path)                                          # and the bundle still verifies
    doc = json.loads((path / ENGINES_JSON).read_text())
    assert doc["runnable_here"] is False and "no engine has been executed" in doc["reason"]
    assert doc["tensorrt"] == res["tensorrt"] and doc["tensorrt"]["module"] in ("tensorrt", "tensorrt_rtx")
    assert doc["lowering"] == "plugin" and doc["precision"] == FP16
    assert set(doc["plugins"]["creators"]) == set(CUSTOM)
    lib = doc["plugins"]["library"]                            # the library that made the plugin layers
    assert lib == res["plugin_library"] and lib["path"] == str(plugin_lib.resolve()) and lib["sha256"] == sha256(plugin_lib)
    import ctypes
    assert lib["version"] == ctypes.CDLL(str(plugin_lib)).actvarPluginsVersion() >= 101
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
    man = {"format": FORMAT, "precision": precision, "lowering": lowering, "graphs": {}, "files": {}}
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
    write_manifest(root, man)
    return root


def expert_graph(h="float16", w=None, N=4, k=2, T=6, C=32, version="1", R=None):
    from onnx import helper
    w = w or h
    H = 4 * C
    node = helper.make_node("ActVarExpertFFN", ["h", "r", "w1", "b1", "w2", "b2"], ["o", "e"], name="expert",
                            domain="actvar", plugin_version=version, plugin_namespace="", num_experts=N, top_k=k)
    N = R or N                                     # R: the router's width when it differs from num_experts
    ins = {"h": (h, [T, C]), "r": ("float32", [T, N]), "w1": (w, [H, C]), "b1": (w, [H]), "w2": (w, [C, H]),
           "b2": (w, [C])}
    return [node], ins, {"o": (h, [T, C]), "e": ("int32", [T, k])}


def scatter_graph(x="float32", idx="int32", S=2, L=9, K=5, C=16):
    from onnx import helper
    node = helper.make_node("ActVarTokenScatter", ["x", "i", "u"], ["y"], domain="actvar", plugin_version="1",
                            plugin_namespace="")
    return [node], {"x": (x, [S, L, C]), "i": (idx, [S, K]), "u": (x, [S, K, C])}, {"y": (x, [S, L, C])}


def test_build_bf16_plugin_engine(bundles, plugin_lib):
    from actvar_export.trt.engines import build_engines
    res = build_engines(bundles["plugin_bf16"], names=["step_9"], progress=False)
    g = res["graphs"]["step_9"]
    assert g["bytes"] > 0 and g["plugin_layers"] == {"ActVarTokenScatter": 2, "ActVarExpertFFN": 2}


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_bf16_bundle_checks_and_parses(actvar_ckpt, tmp_path, request, target):
    """A bf16 portable bundle of the d2 model, built by the product: every graph passes ONNX's full checker at
    opset 17; the transformer's matrix products are bf16 while the VQVAE decoder (Conv has no bfloat16 type before
    opset 22) is fp32 in the graph and in weights.bin, bit for bit the checkpoint's values; TensorRT-RTX parses every
    graph of the tensorrt target into a strongly typed network. (Numeric validation on the CPU, through the
    emulation of the bf16 nodes ONNX Runtime's CPU provider has no kernel for: tests/test_validation.py.)"""
    import onnx
    from onnx import TensorProto, numpy_helper
    import torch
    path = build_bundle(actvar_ckpt, tmp_path / "b", batch=1, precision="bf16", target=target, show_progress=False)
    m = Bundle.open(path).manifest
    assert m["precision"] == "bf16" and m["decoder_precision"] == "fp32"
    for g in m["graphs"].values():
        onnx.checker.check_model(str(path / g["file"]), full_check=True)
    step = onnx.load(str(path / "step_5.onnx"), load_external_data=False).graph
    gemm_w = {n.input[1] for n in step.node if n.op_type == "Gemm"}
    assert gemm_w and {t.data_type for t in step.initializer if t.name in gemm_w} == {TensorProto.BFLOAT16}
    dec = onnx.load(str(path / "decoder.onnx"), load_external_data=False).graph
    types = {t.data_type for t in dec.initializer} | {n.attribute[0].i for n in dec.node if n.op_type == "Cast"}
    assert TensorProto.BFLOAT16 not in types
    vae = torch.load(actvar_ckpt, weights_only=True)["vae"]
    for t in dec.initializer:
        if t.name.startswith("vae."):
            assert t.data_type == TensorProto.FLOAT
            np.testing.assert_array_equal(numpy_helper.to_array(t, base_dir=str(path)), vae[t.name[4:]].numpy())
    if target == "tensorrt":
        from actvar_export.trt.engines import build_engines
        request.getfixturevalue("trt")
        res = build_engines(path, parse_only=True, progress=False)
        assert set(res["graphs"]) == set(m["graphs"])
        for name, g in res["graphs"].items():
            assert g["report"]["strongly_typed"] in (True, None) and g["plugin_layers"] == {}
            outs = g["report"]["outputs"]
            if name == "decoder":
                assert outs["image"] == {"dtype": "FLOAT", "shape": [1, 3, 256, 256]}
            else:
                assert outs["k_out.0"]["dtype"] == "BF16" and outs["f_hat_out"]["dtype"] == "FLOAT"
    shutil.rmtree(path)                      # 260 MB of weights: not kept until the session ends


def test_plugin_types_supported_per_contract(trt, plugin_lib, tmp_path):
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
    (expert_graph("float16", N=4, k=5), "ActVarExpertFFN 'expert': top_k=5 outside"),   # the creator's message
    (expert_graph("float16", N=4, k=0), "ActVarExpertFFN 'expert': top_k=0 outside"),
    (expert_graph("float16", N=65, k=2), "num_experts=65 outside"),
    (expert_graph("float16", N=3), "num_experts=3 does not divide the hidden width 128"),   # configurePlugin's
    (expert_graph("float16", N=4, R=5), "inconsistent shapes"),         # router logits [T, 5] for 4 experts
    (expert_graph("float16", version="2"), "asks for plugin_version '2'.*provides version '1'"),
], ids=["weights_type", "idx_int64", "top_k_5_of_4", "top_k_0", "65_experts", "hidden_not_divisible", "router_width",
        "plugin_version_2"])
def test_plugin_rejections_name_the_graph(trt, plugin_lib, tmp_path, graph, needle):
    from actvar_export.trt.engines import build_engines
    with pytest.raises(ActVarError, match=f"^bad .*{needle}"):
        build_engines(fake_bundle(tmp_path / "b", {"bad": graph}), progress=False)


def test_check_report_rejects_plugin_layers_of_another_library(tmp_path):
    """The check behind "every plugin node is a PLUGIN_V3 layer of this library": a layer whose plugin does not
    report libactvar_trt_plugins.so's metadata, or a node without its layer, fails the graph."""
    from actvar_export.trt.engines import _check_report
    b = Bundle.open(fake_bundle(tmp_path / "b", {"g": scatter_graph()}, "fp32"), verify=False)
    gi = b.manifest["graphs"]["g"]
    io = {k: {"dtype": "FLOAT" if t == "float32" else "INT32", "shape": s} for k, (t, s) in {**gi["inputs"], **gi["outputs"]}.items()}
    rep = {"strongly_typed": True, "inputs": {k: io[k] for k in gi["inputs"]}, "outputs": {k: io[k] for k in gi["outputs"]}}
    layer = {"layer": "l0", "plugin": "ActVarTokenScatter", "version": "1", "namespace": "", "ours": True}
    assert _check_report("g", dict(rep, plugin_layers=[layer]), gi, b.manifest, b.graph_path("g")) == {"ActVarTokenScatter": 1}
    with pytest.raises(ActVarError, match="not a plugin of libactvar_trt_plugins.so"):
        _check_report("g", dict(rep, plugin_layers=[dict(layer, ours=False)]), gi, b.manifest, b.graph_path("g"))
    with pytest.raises(ActVarError, match="1 ActVarTokenScatter node.*but 0 plugin layer"):
        _check_report("g", dict(rep, plugin_layers=[]), gi, b.manifest, b.graph_path("g"))


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


def test_cli_engines(bundles, plugin_lib, tmp_path):
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
