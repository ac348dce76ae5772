"""TensorRT side of a bundle: plugins for the `plugin` lowering's custom nodes and engine builds.

Nothing here imports TensorRT at import time: `load_trt()` imports `tensorrt` if it is installed, else
`tensorrt_rtx` (same builder / network / ONNX parser / IPluginV3 Python API), on first use.
"""
from .api import load_trt, trt_module_info

__all__ = ["load_trt", "trt_module_info", "register_plugins", "build_engines"]


def register_plugins(trt=None):
    from .plugins import register_plugins as _register
    return _register(trt)


def build_engines(bundle_dir, names=None, progress=True, parse_only=False):
    from .engines import build_engines as _build
    return _build(bundle_dir, names=names, progress=progress, parse_only=parse_only)
