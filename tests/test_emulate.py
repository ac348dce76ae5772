"""The CPU emulation of low-precision nodes (runtime/emulate.py): which nodes it wraps comes from ONNX
Runtime's kernel registry, and an emulated bf16 MatMul rounds exactly where a GPU's bf16 GEMM does."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP, helper, numpy_helper

from actvar_export.runtime.emulate import cpu_runs, emulate_low_precision

M, K, N = 16, 256, 24


def _matmul_model(dtype):
    """y_f32 = Cast(Cast(x_f32, dtype) @ w_dtype, fp32): the MatMul itself at `dtype`."""
    w = numpy_helper.from_array(np.zeros((K, N), np.float32), "w_f32")
    g = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x_lo"], to=dtype), helper.make_node("Cast", ["w_f32"], ["w_lo"], to=dtype),
         helper.make_node("MatMul", ["x_lo", "w_lo"], ["y_lo"], name="mm"), helper.make_node("Cast", ["y_lo"], ["y"], to=TP.FLOAT)],
        "mm", [helper.make_tensor_value_info("x", TP.FLOAT, [M, K])], [helper.make_tensor_value_info("y", TP.FLOAT, [M, N])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _session(model, w):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w_f32"))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _round_bf16(a):
    return torch.from_numpy(np.asarray(a, np.float32)).bfloat16().float().numpy()


def test_registry_answers_like_a_session():
    """The registry says the CPU provider has no bf16 MatMul, and a session indeed refuses the node."""
    assert not cpu_runs("", "MatMul", 17, TP.BFLOAT16) and cpu_runs("", "LayerNormalization", 17, TP.BFLOAT16)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
        _session(_matmul_model(TP.BFLOAT16), np.zeros((K, N), np.float32))


def test_emulated_bf16_matmul_rounds_at_its_output():
    """Emulated: inputs Cast to fp32, MatMul in fp32 (accumulation error <= K * 2^-24 relative), output
    rounded to bf16. So it equals torch's bf16 matmul (fp32 accumulation, one rounding) and the exact
    product of the bf16 operands rounded to bf16, up to one bf16 ulp (2^-8 relative) where the fp32 sum
    lands on the other side of a rounding boundary; the unrounded fp32 product differs from it."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g).numpy(), (torch.randn(K, N, generator=g) / 16).numpy()
    model = _matmul_model(TP.BFLOAT16)
    assert dict(emulate_low_precision(model, {})) == {"bf16": 1}
    assert [n.op_type for n in model.graph.node] == ["Cast", "Cast", "Cast", "Cast", "MatMul", "Cast", "Cast"]
    y = _session(model, w).run(None, {"x": x})[0]
    xb, wb = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()
    exact = _round_bf16((xb.double() @ wb.double()).numpy())
    torch_bf16 = (xb @ wb).float().numpy()
    ulp = np.abs(exact) * 2.0 ** -8
    for ref in (exact, torch_bf16):
        assert np.all(np.abs(y - ref) <= ulp), np.abs(y - ref).max()
        assert (y == ref).mean() > 0.95
    assert np.array_equal(y, _round_bf16(y))                              # bf16 values
    unrounded = (xb.float() @ wb.float()).numpy()
    assert (y != unrounded).mean() > 0.9                                  # the rounding happened at the output


def test_fp32_nodes_are_left_alone():
    model = _matmul_model(TP.FLOAT)
    before = model.SerializeToString()
    assert not emulate_low_precision(model, {})
    assert model.SerializeToString() == before
