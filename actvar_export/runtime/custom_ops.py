"""The CUDA kernels of `plugin` bundles inside ONNX Runtime: plugins/ort/libactvar_ort_ops.so registers
ActVarTokenScatter and ActVarExpertFFN (domain `actvar`) for CUDAExecutionProvider.

The library is found through the environment variable ACTVAR_ORT_OPS_LIB (path of the .so), else at
build/plugins/ort/libactvar_ort_ops.so under the repository root or the current directory. Nothing is loaded
at import time.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

from ..errors import ActVarError

CUDA_PROVIDER = "CUDAExecutionProvider"
LIB_NAME = "libactvar_ort_ops.so"
ENV_VAR = "ACTVAR_ORT_OPS_LIB"
BUILD_HINT = ("build it with `cmake -S plugins -B build/plugins -DONNXRUNTIME_INCLUDE_DIR=<onnxruntime include dir> && "
               f"cmake --build build/plugins` or set {ENV_VAR}")
# cudaGetDeviceCount's errors where no GPU can be used
_CUDA_ERRORS = {35: "no CUDA driver (cudaErrorInsufficientDriver)", 100: "no CUDA device (cudaErrorNoDevice)"}


def library_path() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for base in (root, Path.cwd()):
        cand = base / "build" / "plugins" / "ort" / LIB_NAME
        if cand.is_file():
            return cand
    return root / "build" / "plugins" / "ort" / LIB_NAME


def cuda_device_count(path: Path) -> int:
    """CUDA devices the library sees, or -cudaError_t when its CUDA runtime cannot start."""
    lib = ctypes.CDLL(str(path))
    lib.actvarOrtOpsDeviceCount.restype = ctypes.c_int
    return int(lib.actvarOrtOpsDeviceCount())


def cuda_ops_library(available_providers: Sequence[str]) -> Path:
    """The library's path when a `plugin` bundle can run on CUDA here; else one ActVarError naming everything
    that is missing (the library, ONNX Runtime's CUDA provider, a usable GPU)."""
    path = library_path()
    missing = []
    if not path.is_file():
        missing.append(f"{LIB_NAME} (not found at {path}; {BUILD_HINT})")
    if CUDA_PROVIDER not in available_providers:
        missing.append(f"ONNX Runtime's {CUDA_PROVIDER} (this onnxruntime offers {', '.join(available_providers)}; "
                       "install onnxruntime-gpu)")
    elif path.is_file():
        try:
            n = cuda_device_count(path)
        except (OSError, AttributeError) as e:
            raise ActVarError(f"{path}: not a loadable {LIB_NAME} ({e})") from None
        if n <= 0:
            why = "no CUDA device" if n == 0 else _CUDA_ERRORS.get(-n, f"cudaGetDeviceCount failed: cudaError_t {-n}")
            missing.append(f"a CUDA GPU ({why})")
    if missing:
        raise ActVarError(f"a plugin bundle on {CUDA_PROVIDER} needs " + " and ".join(missing))
    return path


def register_cuda_ops(session_options, library: Path) -> None:
    """Register the CUDA custom ops of `library` (from cuda_ops_library) with an onnxruntime.SessionOptions."""
    try:
        session_options.register_custom_ops_library(str(library))
    except Exception as e:  # ORT raises its own exception types
        raise ActVarError(f"{library}: ONNX Runtime cannot register it ({str(e).splitlines()[0][:300]})") from None
