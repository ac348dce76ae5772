"""Thin ctypes binding to libactvar_plugins.so (the CUDA kernels of plugins/), taking torch CUDA tensors.

Nothing happens at import time: the library is located and loaded on the first call, and CUDA is only
touched by the calls themselves. The library is found through, in order: the environment variable
ACTVAR_PLUGIN_LIB (path of the .so), then build/plugins/libactvar_plugins.so and build/libactvar_plugins.so
under the repository root, then the current directory's build/plugins/.

All functions run asynchronously on torch's current CUDA stream of the tensors' device.
Semantics are those of actvar_export.ops (see plugins/*/CONTRACT.md).
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Optional

import torch

__all__ = ["library_path", "load_library", "select_tokens", "gather_tokens", "scatter_tokens",
           "route_experts", "expert_ffn", "expert_ffn_workspace_size", "KernelError"]

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_lib = None
_lock = threading.Lock()


class KernelError(RuntimeError):
    pass


def library_path() -> Path:
    env = os.environ.get("ACTVAR_PLUGIN_LIB")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parent.parent
    for cand in (root / "build" / "plugins" / "libactvar_plugins.so", root / "build" / "libactvar_plugins.so",
                 Path.cwd() / "build" / "plugins" / "libactvar_plugins.so"):
        if cand.is_file():
            return cand
    return root / "build" / "plugins" / "libactvar_plugins.so"


def load_library():
    """Load (once) and return the ctypes handle; raises FileNotFoundError if the library is not built."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        path = library_path()
        if not path.is_file():
            raise FileNotFoundError(f"libactvar_plugins.so not found at {path}; build it with "
                                    "`cmake -S plugins -B build/plugins && cmake --build build/plugins` "
                                    "or set ACTVAR_PLUGIN_LIB")
        lib = ctypes.CDLL(str(path))
        vp, i32, sz, st = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
        sigs = {
            "actvarTopkAscending": [vp, vp, i32, i32, i32, st],
            "actvarTokenSelect": [vp, vp, i32, i32, i32, st],
            "actvarTokenGather": [vp, vp, vp, i32, i32, i32, i32, i32, st],
            "actvarTokenScatter": [vp, vp, vp, vp, i32, i32, i32, i32, i32, st],
            "actvarExpertRoute": [vp, vp, i32, i32, i32, st],
            "actvarExpertFfn": [vp, vp, vp, vp, vp, vp, vp, vp, i32, i32, i32, i32, i32, i32, vp, sz, st],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int
        lib.actvarExpertFfnWorkspaceSize.argtypes = [i32, i32, i32, i32, i32, i32]
        lib.actvarExpertFfnWorkspaceSize.restype = ctypes.c_size_t
        lib.actvarPluginsVersion.restype = ctypes.c_int
        lib.actvarExpertFfnCublasLt.restype = ctypes.c_int
        if hasattr(lib, "actvarExpertFfnPath"):   # (libraries built before version 101 lack it)
            lib.actvarExpertFfnPath.argtypes = [i32, i32]
            lib.actvarExpertFfnPath.restype = ctypes.c_int
        _lib = lib
        return lib


def _check(err: int, what: str) -> None:
    if err != 0:
        raise KernelError(f"{what} failed with cudaError_t {err}")


def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _stream(t: torch.Tensor):
    return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)


def _need(t: torch.Tensor, name: str, dtype=None, dim=None, device=None):
    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _topk_rows(fn_name: str, what: str, scores: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, k] int32 ascending indices of the k largest per row (ties to the lower index) via `fn_name`."""
    _need(scores, what, torch.float32, 2)
    rows, n = scores.shape
    idx = torch.empty(rows, k, dtype=torch.int32, device=scores.device)
    with torch.cuda.device(scores.device):
        fn = getattr(load_library(), fn_name)
        _check(fn(_ptr(scores), _ptr(idx), rows, n, k, _stream(scores)), fn_name)
    return idx


def select_tokens(scores_SL: torch.Tensor, k: int) -> torch.Tensor:
    """idx [S, k] int32: ascending positions of the k highest scores per row (ties to the lower position)."""
    return _topk_rows("actvarTokenSelect", "scores", scores_SL, k)


def gather_tokens(x_SLC: torch.Tensor, idx_SK: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    _need(x_SLC, "x", tuple(_DTYPES), 3)
    _need(idx_SK, "idx", torch.int32, 2, x_SLC.device)
    S, L, C = x_SLC.shape
    K = idx_SK.shape[1]
    if idx_SK.shape[0] != S:
        raise ValueError("idx and x disagree on S")
    if out is None:
        out = torch.empty(S, K, C, dtype=x_SLC.dtype, device=x_SLC.device)
    else:
        _need(out, "out", x_SLC.dtype, 3, x_SLC.device)
        if tuple(out.shape) != (S, K, C):
            raise ValueError("out has the wrong shape")
    lib = load_library()
    with torch.cuda.device(x_SLC.device):
        _check(lib.actvarTokenGather(_ptr(x_SLC), _ptr(idx_SK), _ptr(out), S, L, K, C, _DTYPES[x_SLC.dtype],
                                     _stream(x_SLC)), "actvarTokenGather")
    return out


def scatter_tokens(x_SLC: torch.Tensor, idx_SK: torch.Tensor, upd_SKC: torch.Tensor,
                   out: Optional[torch.Tensor] = None, inplace: bool = False) -> torch.Tensor:
    """out = x with rows idx replaced by upd. inplace=True writes into x (only the K rows per sequence)."""
    _need(x_SLC, "x", tuple(_DTYPES), 3)
    _need(idx_SK, "idx", torch.int32, 2, x_SLC.device)
    _need(upd_SKC, "upd", x_SLC.dtype, 3, x_SLC.device)
    S, L, C = x_SLC.shape
    K = idx_SK.shape[1]
    if idx_SK.shape[0] != S or tuple(upd_SKC.shape) != (S, K, C):
        raise ValueError("shapes of x, idx, upd disagree")
    if inplace:
        out = x_SLC
    elif out is None:
        out = torch.empty_like(x_SLC)
    else:
        _need(out, "out", x_SLC.dtype, 3, x_SLC.device)
        if out.shape != x_SLC.shape:
            raise ValueError("out has the wrong shape")
    lib = load_library()
    with torch.cuda.device(x_SLC.device):
        _check(lib.actvarTokenScatter(_ptr(x_SLC), _ptr(idx_SK), _ptr(upd_SKC), _ptr(out), S, L, K, C,
                                      _DTYPES[x_SLC.dtype], _stream(x_SLC)), "actvarTokenScatter")
    return out


def route_experts(logits_TN: torch.Tensor, k: int) -> torch.Tensor:
    """experts [T, k] int32, ascending ids of the k highest logits per token (ties to the lower id)."""
    return _topk_rows("actvarExpertRoute", "logits", logits_TN, k)


def expert_ffn_uses_cublaslt() -> int:
    """1 if the expert FFN's small-T dense path and its routed path's fc2 run through cuBLASLt, 0 if cuBLASLt
    could not be opened or is disabled (ACTVAR_DISABLE_CUBLASLT=1; the plugin's own kernels run), -1 if the library
    was built without the cuBLASLt header."""
    return int(load_library().actvarExpertFfnCublasLt())


_PATHS = {0: "dense-lt", 1: "masked", 2: "routed"}


def expert_ffn_path(T: int, dtype: torch.dtype) -> str:
    """The path the expert FFN tries first for T tokens of dtype on the current device, from the library's own
    settings: 'dense-lt' (cuBLASLt GEMMs + one routing/masking kernel), 'masked' (the plugin's masked-dense sm_90a
    kernels: Hopper without cuBLASLt, or T above ACTVAR_DENSE_MAX_T but within ACTVAR_MASKED_DENSE_MAX_T) or
    'routed' (routing, gathered fc1, fc2). A kernel rejecting the arguments makes a call fall through to the next."""
    if dtype not in _DTYPES or T < 0:
        raise KernelError(f"expert_ffn_path: dtype {dtype} / T {T} outside the contract")
    lib = load_library()
    if not hasattr(lib, "actvarExpertFfnPath"):
        raise KernelError(f"{library_path()} predates actvarExpertFfnPath (library version 101): rebuild plugins/")
    return _PATHS[int(lib.actvarExpertFfnPath(int(T), _DTYPES[dtype]))]


def expert_ffn_workspace_size(T: int, C: int, hidden: int, num_experts: int, top_k: int,
                              dtype: torch.dtype) -> int:
    return int(load_library().actvarExpertFfnWorkspaceSize(T, C, hidden, num_experts, top_k, _DTYPES[dtype]))


def expert_ffn(h_TC: torch.Tensor, logits_TN: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor,
               fc2_w: torch.Tensor, fc2_b: torch.Tensor, top_k: int, return_experts: bool = False,
               out: Optional[torch.Tensor] = None, workspace: Optional[torch.Tensor] = None):
    """Routed expert FFN (routing included): returns out [T, C] (and experts [T, top_k] int32 if asked).
    The number of experts is logits.shape[1]; all float tensors share h's dtype."""
    dt = h_TC.dtype
    _need(h_TC, "h", tuple(_DTYPES), 2)
    dev = h_TC.device
    _need(logits_TN, "logits", torch.float32, 2, dev)
    T, C = h_TC.shape
    N = logits_TN.shape[1]
    hidden = fc1_w.shape[0]
    for t, name, shape in ((fc1_w, "fc1_w", (hidden, C)), (fc1_b, "fc1_b", (hidden,)), (fc2_w, "fc2_w", (C, hidden)),
                           (fc2_b, "fc2_b", (C,))):
        _need(t, name, dt, len(shape), dev)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if logits_TN.shape[0] != T:
        raise ValueError("logits and h disagree on T")
    if out is None:
        out = torch.empty(T, C, dtype=dt, device=dev)
    experts = torch.empty(T, top_k, dtype=torch.int32, device=dev) if return_experts else None
    lib = load_library()
    ws_bytes = int(lib.actvarExpertFfnWorkspaceSize(T, C, hidden, N, top_k, _DTYPES[dt]))
    if workspace is None or workspace.numel() < ws_bytes:
        workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        _check(lib.actvarExpertFfn(_ptr(h_TC), _ptr(logits_TN), _ptr(fc1_w), _ptr(fc1_b), _ptr(fc2_w), _ptr(fc2_b),
                                   _ptr(out), _ptr(experts), T, C, hidden, N, top_k, _DTYPES[dt], _ptr(workspace),
                                   ctypes.c_size_t(workspace.numel()), _stream(h_TC)), "actvarExpertFfn")
    return (out, experts) if return_experts else out
