"""CPU-only check that the CUDA plugin libraries compile (what CI runs without a GPU).

Uses the session's one CMake build of plugins/ (tests/conftest.py `plugin_build`) for the default architectures
(sm_80, sm_86, sm_89, sm_90 SASS + compute_90 PTX) when nvcc and cmake are on PATH; skips otherwise.
Set ACTVAR_PLUGIN_ARCHS to override the architecture list (CMake syntax, e.g. "90").
The TensorRT plugin library (plugins/trt) is built against the shared TensorRT 11.1 headers; its C++ test program's
creator, shape and serialization checks run here.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# ONNX Runtime C API headers for plugins/ort (not part of the project: ../shared/sdk beside the checkout, or
# ONNXRUNTIME_INCLUDE_DIR); without them libactvar_ort_ops.so is not built and its tests skip
ORT_HEADERS = Path(os.environ.get("ONNXRUNTIME_INCLUDE_DIR", ROOT.parent / "shared" / "sdk" / "onnxruntime-1.29" / "include"))
EXPORTS = ["actvarTopkAscending", "actvarTokenSelect", "actvarTokenGather", "actvarTokenScatter",
           "actvarExpertRoute", "actvarExpertFfn", "actvarExpertFfnWorkspaceSize", "actvarPluginsVersion",
           "actvarExpertFfnCublasLt", "actvarExpertFfnPath"]


@pytest.fixture(scope="module")
def built_lib(plugin_build):
    return plugin_build["c_api"]


@pytest.fixture(scope="module")
def trt_lib(plugin_build):
    if plugin_build["trt"] is None:
        pytest.skip("no TensorRT headers (ACTVAR_TRT_INCLUDE or the shared SDK copy): TensorRT plugins not built")
    return plugin_build


def test_library_builds_and_exports_c_api(built_lib):
    # the exported symbols must be the plain C names (no C++ mangling), as a TensorRT plugin will dlsym them
    nm = shutil.which("nm")
    if nm:
        out = subprocess.run([nm, "-D", "--defined-only", str(built_lib)], capture_output=True, text=True).stdout
        names = {line.split()[-1] for line in out.splitlines() if line.strip()}
        missing = [s for s in EXPORTS if s not in names]
        assert not missing, f"missing exports: {missing}"


def test_library_loads_without_gpu(built_lib):
    # static CUDA runtime: loading needs no GPU; the pure host functions answer
    lib = ctypes.CDLL(str(built_lib))
    lib.actvarPluginsVersion.restype = ctypes.c_int
    assert lib.actvarPluginsVersion() >= 100
    f = lib.actvarExpertFfnWorkspaceSize
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int] * 6
    ws = f(24576, 1024, 4096, 16, 12, 2)
    assert ws >= 24576 * 4096 * 2          # holds the hidden activations
    assert f(0, 1024, 4096, 16, 12, 2) == 0


def _assert_default_architectures(lib, sms, what):
    """The default build embeds SASS for each of `sms` and PTX (skips for a custom list or without cuobjdump)."""
    if os.environ.get("ACTVAR_PLUGIN_ARCHS"):
        pytest.skip("custom architecture list")
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not on PATH")
    out = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", str(lib)], capture_output=True, text=True).stdout
    for sm in sms:
        assert sm in out, f"no {sm} code in {what}"
    assert ".ptx" in out, "no PTX embedded"


def test_default_architectures_embedded(built_lib):
    _assert_default_architectures(built_lib, ("sm_80", "sm_86", "sm_89", "sm_90"), "the library")


def test_binding_import_is_lazy():
    """Importing the ctypes binding must neither load the library nor touch CUDA (CPU-only CI)."""
    code = ("import torch, actvar_export.kernels as k; "
            "assert k._lib is None, 'library loaded at import'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'; "
            "print('ok')")
    env = dict(os.environ, ACTVAR_PLUGIN_LIB="/nonexistent/libactvar_plugins.so")
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(ROOT), env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_binding_reports_missing_library():
    import sys
    code = ("import actvar_export.kernels as k\n"
            "try:\n    k.load_library()\nexcept FileNotFoundError as e:\n    print('missing:', e)\n")
    env = dict(os.environ, ACTVAR_PLUGIN_LIB="/nonexistent/libactvar_plugins.so")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), env=env,
                       timeout=300)
    assert r.returncode == 0 and "missing:" in r.stdout, r.stderr[-2000:]


def _wheel_cu13_file(*parts):
    """The first nvidia/cu13/<parts> file of NVIDIA's CUDA wheels (nvidia-cublas: test extra), or None."""
    try:
        import nvidia  # namespace package of the wheels
    except ImportError:
        return None
    return next((f for f in (Path(p, "cu13", *parts) for p in nvidia.__path__) if f.is_file()), None)


def _wheel_cublaslt_header() -> bool:
    return _wheel_cu13_file("include", "cublasLt.h") is not None


def test_cublaslt_path_compiled_when_header_present(built_lib):
    # the dense small-T path (dense_lt.cu) must be compiled, not stubbed, wherever cublasLt.h is available
    # (the test extra installs nvidia-cublas for it); -1 = built without the header
    lib = ctypes.CDLL(str(built_lib))
    lib.actvarExpertFfnCublasLt.restype = ctypes.c_int
    state = lib.actvarExpertFfnCublasLt()
    if _wheel_cublaslt_header():
        assert state in (0, 1), "cublasLt.h is installed but the library was built without the cuBLASLt path"
    else:
        assert state in (-1, 0, 1)


_PATH_PROBE = r"""
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
lib.actvarExpertFfnCublasLt.restype = ctypes.c_int
f = lib.actvarExpertFfnPath
f.argtypes = [ctypes.c_int, ctypes.c_int]
f.restype = ctypes.c_int
Ts = [int(t) for t in sys.argv[2].split(",")]
print(json.dumps({"lt": lib.actvarExpertFfnCublasLt(), "paths": {d: [f(t, d) for t in Ts] for d in (0, 1, 2, 3)}}))
"""


def _paths(built_lib, Ts, **env):
    """actvarExpertFfnPath(T, dtype) for every T and dtype 0-3 in a child process (the library reads its settings
    once per process) that sees no GPU, with the given settings."""
    import json
    # no GPU (so the Hopper-only masked path is never reported) and none of the caller's ACTVAR_* settings
    base = {k: v for k, v in os.environ.items() if not k.startswith("ACTVAR_")}
    base["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", _PATH_PROBE, str(built_lib), ",".join(map(str, Ts))],
                       env=dict(base, **env), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    return out["lt"], {int(k): v for k, v in out["paths"].items()}


def _wheel_cublaslt_libdir():
    lib = _wheel_cu13_file("lib", "libcublasLt.so.13")
    return str(lib.parent) if lib else None


def test_expert_ffn_path_without_gpu(built_lib):
    """The path the expert FFN would take (host-only, the benchmark's row labels): dense (0) only for fp16/bf16 with
    cuBLASLt opened and T <= ACTVAR_DENSE_MAX_T, never the masked sm_90a path (1) without a Hopper GPU, routed (2)
    otherwise; -1 for an unknown dtype or T < 0. With the cuBLAS wheel's library on the loader path cuBLASLt opens
    on the CPU machine too, so the threshold and the switch-off are checked for real."""
    Ts = [-1, 0, 1, 1000, 1001, 4096, 4097, 10 ** 6]
    lt, paths = _paths(built_lib, Ts)
    for d in (0, 1, 2):
        want = [-1] + [0 if lt == 1 and d != 0 and t <= 4096 else 2 for t in Ts[1:]]
        assert paths[d] == want, (d, lt, paths[d])
    assert paths[3] == [-1] * len(Ts)
    libdir = _wheel_cublaslt_libdir()
    if libdir is None or lt == -1:
        pytest.skip("cuBLASLt not built in or the nvidia-cublas wheel is absent: thresholds not checkable here")
    ld = libdir + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")
    lt, paths = _paths(built_lib, Ts, LD_LIBRARY_PATH=ld, ACTVAR_DENSE_MAX_T="1000")
    assert lt == 1
    for d in (1, 2):
        assert paths[d] == [-1, 0, 0, 0, 2, 2, 2, 2], (d, paths[d])
    assert paths[0] == [-1] + [2] * (len(Ts) - 1)            # float32 never takes the cuBLASLt path
    lt, paths = _paths(built_lib, Ts, LD_LIBRARY_PATH=ld, ACTVAR_DISABLE_CUBLASLT="1")
    assert lt == 0 and all(p == [-1] + [2] * (len(Ts) - 1) for d, p in paths.items() if d != 3)


# ---------------------------------------------------------------------------------------------------
# the TensorRT plugin library (plugins/trt)
# ---------------------------------------------------------------------------------------------------
def _dynamic_symbols(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def _needed(lib):
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    return [line.split("[")[1].split("]")[0] for line in out.splitlines() if "(NEEDED)" in line]


def test_trt_library_entry_points_and_no_tensorrt_link(trt_lib):
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("binutils (nm, readelf) not on PATH")
    lib = trt_lib["trt"]
    syms = _dynamic_symbols(lib)
    assert {"getCreators", "setLoggerFinder"} <= syms          # what IPluginRegistry::loadLibrary looks up
    assert not [s for s in syms if s.startswith("_ZN10actvar_trt")], "C++ internals exported"
    needed = _needed(lib)
    assert needed and not [n for n in needed if "nvinfer" in n or "tensorrt" in n or "cudart" in n], needed
    if trt_lib["trt_registered"] is not None:                   # the self-registering variant links TensorRT(-RTX)
        assert any("tensorrt_rtx" in n or "nvinfer" in n for n in _needed(trt_lib["trt_registered"]))


def test_trt_library_default_architectures(trt_lib):
    _assert_default_architectures(trt_lib["trt"], ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"),
                                  "the TensorRT plugin library")


def test_trt_plugin_test_program_cpu_checks(trt_lib):
    """The C++ test program: creators, output shapes and types on the contract's shapes (d16/d30 widths, 2 and 128
    sequences, 13x13 and 16x16 scales), format combinations, workspace, serialization round trip, rejections."""
    exe = trt_lib["trt_test"]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    n, failed = r.stdout.strip().splitlines()[-1].split(" checks, ")
    assert int(n) > 500 and failed == "0 failed"
    usage = subprocess.run([str(exe), "--bogus"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr


# ---- libactvar_ort_ops.so (plugins/ort): built with the ONNX Runtime headers, registered in a CPU session ----

@pytest.fixture(scope="module")
def ort_ops_lib(plugin_build):
    if plugin_build["ort_ops"] is None:
        pytest.skip(f"no ONNX Runtime C API headers at {ORT_HEADERS}: libactvar_ort_ops.so not built")
    lib = plugin_build["ort_ops"]
    assert lib.is_file(), "ONNXRUNTIME_INCLUDE_DIR was given but libactvar_ort_ops.so was not built"
    return lib


def test_ort_ops_exports_registration_only(ort_ops_lib):
    """RegisterCustomOps (and the device probe) exported, the kernels' C names hidden; no link to libonnxruntime
    (ONNX Runtime passes its API) nor to a shared CUDA runtime."""
    for tool in ("nm", "readelf"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not on PATH")
    out = subprocess.run(["nm", "-D", "--defined-only", str(ort_ops_lib)], capture_output=True, text=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert {n for n in names if not n.startswith("_")} == {"RegisterCustomOps", "actvarOrtOpsDeviceCount"}
    needed = subprocess.run(["readelf", "-d", str(ort_ops_lib)], capture_output=True, text=True).stdout
    needed = [l for l in needed.splitlines() if "NEEDED" in l]
    assert needed and not any("onnxruntime" in l or "cudart" in l for l in needed), needed


def _ort_graph(op: str, dt: int, idx_dt: int = 6, out_dt=None, router_dt: int = 1, shapes=(None, None)) -> bytes:
    """One ActVarTokenScatter or ActVarExpertFFN node with the graphs' attributes; dt = activation element type,
    shapes = the declared shapes of the outputs."""
    from onnx import helper
    if op == "ActVarTokenScatter":
        ins = [("x", dt, [2, 8, 4]), ("idx", idx_dt, [2, 3]), ("upd", dt, [2, 3, 4])]
        outs, attrs = [("y", out_dt or dt)], {}
    else:
        ins = [("h", dt, [5, 4]), ("router", router_dt, [5, 4]), ("w1", dt, [16, 4]), ("b1", dt, [16]),
               ("w2", dt, [4, 16]), ("b2", dt, [4])]
        outs, attrs = [("y", out_dt or dt), ("experts", 6)], {"num_experts": 4, "top_k": 2}
    node = helper.make_node(op, [n for n, _, _ in ins], [n for n, _ in outs], domain="actvar", plugin_version="1",
                            plugin_namespace="", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(*i) for i in ins],
                          [helper.make_tensor_value_info(n, t, sh) for (n, t), sh in zip(outs, shapes)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("actvar", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def _cpu_session(model: bytes, lib=None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.add_session_config_entry("session.strict_shape_type_inference", "1")   # shape conflicts are errors
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def test_ort_ops_register_in_cpu_session(ort_ops_lib):
    """onnxruntime (CPU build) loads the library and calls RegisterCustomOps: the session options register cleanly
    and a graph without the ops runs. The ops' schemas become known (without the library the domain is unknown),
    but their kernels exist for CUDAExecutionProvider only, so a graph of them on the CPU fails at kernel lookup."""
    from onnx import TensorProto as TP
    from onnx import helper
    g = helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g", [helper.make_tensor_value_info("a", 1, [3])],
                          [helper.make_tensor_value_info("b", 1, [3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    got = _cpu_session(m.SerializeToString(), ort_ops_lib).run(None, {"a": np.array([-1, 0, 2], np.float32)})[0]
    assert got.tolist() == [0, 0, 2]
    for op in ("ActVarTokenScatter", "ActVarExpertFFN"):
        with pytest.raises(Exception, match=f"actvar:{op}.* is not a registered function/op"):
            _cpu_session(_ort_graph(op, TP.FLOAT))
        for dt in (TP.FLOAT, TP.FLOAT16, TP.BFLOAT16):
            with pytest.raises(Exception, match=rf"(Could not find an implementation|Failed to find kernel) for (actvar\.)?{op}"):
                _cpu_session(_ort_graph(op, dt), ort_ops_lib)


@pytest.mark.parametrize("graph, needle", [
    (dict(op="ActVarTokenScatter", dt=1, idx_dt=7), "Type 'tensor(int64)' of input parameter (idx)"),
    (dict(op="ActVarTokenScatter", dt=11), "Type 'tensor(double)' of input parameter (x)"),
    (dict(op="ActVarExpertFFN", dt=10, router_dt=10), "Type 'tensor(float16)' of input parameter (router)"),
    (dict(op="ActVarExpertFFN", dt=10, out_dt=1), "Type (tensor(float)) of output arg (y)"),
    (dict(op="ActVarTokenScatter", dt=16, out_dt=10), "Type (tensor(float16)) of output arg (y)"),
])
def test_ort_ops_schema_rejects_wrong_types(ort_ops_lib, graph, needle):
    """The registered input/output types are those of the contracts (idx and experts int32, router float32, the rest
    one of float32/float16/bfloat16) and the output type follows the input's: wrong ones fail at load."""
    with pytest.raises(Exception) as e:
        _cpu_session(_ort_graph(**graph), ort_ops_lib)
    assert needle in str(e.value)


def test_ort_ops_no_gpu_named(ort_ops_lib, monkeypatch):
    """With the library present and ONNX Runtime offering CUDA, a machine without a usable GPU is named as such."""
    from actvar_export.errors import ActVarError
    from actvar_export.runtime import custom_ops
    if custom_ops.cuda_device_count(ort_ops_lib) > 0:
        pytest.skip("a CUDA GPU is present")
    monkeypatch.setenv(custom_ops.ENV_VAR, str(ort_ops_lib))
    with pytest.raises(ActVarError) as e:
        custom_ops.cuda_ops_library(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "needs a CUDA GPU (" in str(e.value) and "libactvar_ort_ops.so" not in str(e.value)


@pytest.mark.parametrize("op, shapes, conflict", [
    ("ActVarTokenScatter", ([2, 8, 4], None), None),
    ("ActVarTokenScatter", ([2, 8, 5], None), "Inferred=4 Declared=5"),
    ("ActVarExpertFFN", ([5, 4], [5, 2]), None),
    ("ActVarExpertFFN", ([5, 4], [5, 3]), "Inferred=2 Declared=3"),     # experts [T, top_k]
    ("ActVarExpertFFN", ([6, 4], [5, 2]), "Inferred=5 Declared=6"),     # out [T, C] = h's shape
])
def test_ort_ops_infer_output_shapes(ort_ops_lib, op, shapes, conflict):
    """The library's shape inference (out = x's or h's shape, experts [T, top_k]) runs when the graph loads: a
    declared output shape that contradicts it fails there; a consistent one gets as far as kernel lookup."""
    with pytest.raises(Exception) as e:
        _cpu_session(_ort_graph(op, 1, shapes=shapes), ort_ops_lib)
    msg = str(e.value)
    if conflict:
        assert "Can't merge shape info" in msg and conflict in msg, msg
    else:
        assert "Could not find an implementation" in msg or "Failed to find kernel" in msg, msg
