"""Import TensorRT lazily: the full `tensorrt` if present, else `tensorrt_rtx` (TensorRT-RTX)."""
from __future__ import annotations

import importlib
import threading
from typing import Dict, Sequence

from ..errors import ActVarError

MODULE_NAMES = ("tensorrt", "tensorrt_rtx")
_loggers: Dict[str, object] = {}
_lock = threading.Lock()


def load_trt(names: Sequence[str] = MODULE_NAMES):
    """Return the first importable TensorRT Python module of `names` (default: tensorrt, then tensorrt_rtx).

    A module counts only if it has a Builder (the registry's `tensorrt` name can be a stub package).
    Raises ActVarError naming every module tried and why it failed."""
    why = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception as e:   # ImportError, or OSError when the package's shared libraries are missing
            why.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": "))
            continue
        if not hasattr(mod, "Builder") or not hasattr(mod, "OnnxParser"):
            why.append(f"{name}: imported but has no Builder/OnnxParser (a stub package?)")
            continue
        return mod
    raise ActVarError("no TensorRT Python module can be imported (" + "; ".join(why) + "): install TensorRT, "
                      "or TensorRT-RTX with `pip install tensorrt-rtx-cu13`")


def trt_module_info(trt) -> Dict[str, str]:
    """{"module": "tensorrt" | "tensorrt_rtx", "version": "..."} of a module returned by load_trt()."""
    return {"module": trt.__name__.split(".")[0], "version": str(getattr(trt, "__version__", "unknown"))}


def get_logger(trt):
    """One logger per TensorRT module (TensorRT wants a single logger for builders and runtimes)."""
    with _lock:
        key = trt.__name__
        if key not in _loggers:
            _loggers[key] = trt.Logger(trt.Logger.WARNING)
        return _loggers[key]
