"""TensorRT side of a bundle: engine builds, with the C++ plugin library (plugins/trt/) for the `plugin` lowering.

Nothing here imports TensorRT at import time: `load_trt()` imports `tensorrt` if it is installed, else
`tensorrt_rtx` (same builder / network / ONNX parser / plugin registry Python API), on first use.
"""
from .api import load_trt, trt_module_info

__all__ = ["load_trt", "trt_module_info", "plugin_library_info", "build_engines"]


def plugin_library_info():
    from .plugin_library import library_info
    return library_info()


def build_engines(bundle_dir, names=None, progress=True, parse_only=False):
    from .engines import build_engines as _build
    return _build(bundle_dir, names=names, progress=progress, parse_only=parse_only)
