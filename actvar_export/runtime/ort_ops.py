"""CPU reference implementations of the two plugin ops, registered with ONNX Runtime through
onnxruntime-extensions so that `plugin`-lowered graphs also run on the CPU.

Both are computed with the reference semantics of `actvar_export.ops` (the same functions the
PyTorch reference model uses), not with the graph's own arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from .. import ops
from ..export.step import EXPERT_FFN_OP, TOKEN_SCATTER_OP

_REGISTERED = False
ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions serves Python ops in this domain
# element types of the ops' outputs (None: the type of input 0), for the CPU emulation's type inference
OUTPUT_TYPES = {TOKEN_SCATTER_OP: (None,), EXPERT_FFN_OP: (None, TensorProto.INT32)}


def register() -> str:
    """Define the Python ops once; returns the extensions library path for SessionOptions."""
    global _REGISTERED
    from onnxruntime_extensions import PyOp, get_library_path, onnx_op
    if not _REGISTERED:
        str_attrs = {"plugin_version": PyOp.dt_string, "plugin_namespace": PyOp.dt_string}

        @onnx_op(op_type=TOKEN_SCATTER_OP, inputs=[PyOp.dt_float, PyOp.dt_int32, PyOp.dt_float],
                 outputs=[PyOp.dt_float], attrs=str_attrs)
        def _token_scatter(x, idx, upd, **_):
            out = ops.scatter_tokens(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(idx.astype(np.int64)),
                                     torch.from_numpy(np.ascontiguousarray(upd)))
            return out.numpy()

        @onnx_op(op_type=EXPERT_FFN_OP,
                 inputs=[PyOp.dt_float, PyOp.dt_float, PyOp.dt_float, PyOp.dt_float, PyOp.dt_float, PyOp.dt_float],
                 outputs=[PyOp.dt_float, PyOp.dt_int32],
                 attrs={"num_experts": PyOp.dt_int64, "top_k": PyOp.dt_int64, **str_attrs})
        def _expert_ffn(h, router, w1, b1, w2, b2, num_experts=16, top_k=12, **_):
            t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
            experts = ops.route_experts(t(router), int(top_k))
            out = ops.expert_ffn(t(h), experts, t(w1), t(b1), t(w2), t(b2), int(num_experts))
            return out.numpy(), experts.to(torch.int32).numpy()

        _REGISTERED = True
    return get_library_path()
