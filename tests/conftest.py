import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KEYS_FILE = SHARED / "design" / "var-checkpoint-keys.txt"


@pytest.fixture(scope="session")
def vae():
    from actvar_export.init import init_vae
    return init_vae(seed=0).eval()


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def actvar_ckpt(ckpt_dir):
    """A random-weight ActVAR d2 checkpoint file (16 experts) written by the init-ckpt code path."""
    from actvar_export.checkpoint import save_atomic
    from actvar_export.init import init_checkpoint
    p = ckpt_dir / "actvar_d2.pt"
    save_atomic(init_checkpoint(2, seed=3), p)
    return p


def make_model(depth=2, actvar=None, seed=0):
    from actvar_export.config import ModelSpec, VarConfig
    from actvar_export.init import init_var
    return init_var(ModelSpec(VarConfig(depth), actvar), seed).eval()


TRT_HEADERS = SHARED / "sdk" / "tensorrt-11.1" / "include"
ORT_HEADERS = SHARED / "sdk" / "onnxruntime-1.29" / "include"


def _rtx_library():
    """TensorRT-RTX's libtensorrt_rtx.so.1 from its wheel (links the self-registering plugin variant), or None."""
    import importlib.util
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next((p for d in spec.submodule_search_locations for p in sorted(Path(d).glob("libtensorrt_rtx.so.1*"))), None)


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory):
    """One CMake build of plugins/ per pytest run, shared by test_plugins_build and test_trt (the sm_90a GEMMs
    are slow to compile): libactvar_plugins.so, and with TensorRT's headers (ACTVAR_TRT_INCLUDE, else the shared
    SDK copy) libactvar_trt_plugins.so, actvar_trt_plugin_test and, with TensorRT-RTX's library,
    libactvar_trt_plugins_registered.so. Default architectures unless ACTVAR_PLUGIN_ARCHS (CMake syntax) is set.
    With ONNX Runtime's C API headers (ONNXRUNTIME_INCLUDE_DIR, else the shared SDK copy) also libactvar_ort_ops.so.
    Returns {"dir", "c_api", "trt", "trt_registered", "trt_test", "ort_ops"} (None for what was not built)."""
    import shutil
    import subprocess
    import sys
    for tool in ("nvcc", "cmake"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not on PATH: cannot build the CUDA plugins here")
    root = Path(__file__).resolve().parents[1]
    build = tmp_path_factory.mktemp("plugins_build")
    cfg = ["cmake", "-S", str(root / "plugins"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
           f"-DPython3_EXECUTABLE={sys.executable}"]   # (finds the nvidia-cublas wheel's cublasLt.h)
    archs = os.environ.get("ACTVAR_PLUGIN_ARCHS")
    if archs:
        cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
    ort_headers = Path(os.environ.get("ONNXRUNTIME_INCLUDE_DIR", ORT_HEADERS))
    if (ort_headers / "onnxruntime_c_api.h").is_file():
        cfg.append(f"-DONNXRUNTIME_INCLUDE_DIR={ort_headers}")
    headers = Path(os.environ.get("ACTVAR_TRT_INCLUDE", TRT_HEADERS))
    rtx = _rtx_library()
    if (headers / "NvInferRuntime.h").is_file():
        cfg += [f"-DTensorRT_INCLUDE_DIR={headers}", "-DACTVAR_TRT_BUILD_TESTS=ON"]
        if rtx is not None:
            cfg.append(f"-DTensorRT_LIBRARY={rtx}")
    for cmd in (cfg, ["cmake", "--build", str(build), "-j", str(max(2, min(4, os.cpu_count() or 2)))]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    found = lambda p: p if p.is_file() else None  # noqa: E731
    out = {"dir": build, "c_api": build / "libactvar_plugins.so",
           "trt": found(build / "trt" / "libactvar_trt_plugins.so"),
           "trt_registered": found(build / "trt" / "libactvar_trt_plugins_registered.so"),
           "trt_test": found(build / "trt" / "actvar_trt_plugin_test"),
           "ort_ops": found(build / "ort" / "libactvar_ort_ops.so")}
    assert out["c_api"].is_file()
    return out
