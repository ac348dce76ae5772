"""The reference on CUDA (fp32, fp16 and bf16 autocast) against the CPU reference. Marked `gpu`:
skips on a machine without CUDA and never touches CUDA at import time."""
import pytest
import torch

from actvar_export.config import ActVarConfig
from actvar_export.generate import SampleSettings, generate, teacher_forced

from .conftest import make_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device via scripts/device_check.sh)")
    return torch.device("cuda")


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("fp16", 1e-2), ("bf16", 6e-2)])
def test_cuda_matches_cpu(cuda, vae, precision, tol):
    """Teacher-forced logits on the GPU vs fp32 on the CPU: relative error bounded by the precision
    (fp32 with TF32 off for matmuls and cuDNN convolutions: ~1e-6; fp16 11-bit / bf16 8-bit mantissas
    as in test_model)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m = make_model(2, ActVarConfig(token_ratio=1.0, expert_ratio=1.0), seed=4)
    labels = torch.tensor([1, 2])
    ref = generate(m, vae, labels, SampleSettings(), seed=0, decode=False)
    a = teacher_forced(m, vae, labels, ref.idx, cfg=1.5)
    mg, vg = m.to(cuda), vae.to(cuda)
    try:
        b = teacher_forced(mg, vg, labels.to(cuda), [i.to(cuda) for i in ref.idx], cfg=1.5, precision=precision)
        out = generate(mg, vg, labels.to(cuda), SampleSettings(), seed=0, precision=precision)
        assert out.images_B3HW.shape == (2, 3, 256, 256) and torch.isfinite(out.images_B3HW).all()
    finally:
        vae.to("cpu")
    for si in range(10):
        rel = ((a.logits[si] - b.logits[si].cpu()).norm() / a.logits[si].norm()).item()
        assert rel < tol, (si, rel)
