"""GPU test of libactvar_trt_plugins.so's `enqueue`, outside TensorRT, against the reference ops.

The C++ program actvar_trt_plugin_test (plugins/trt/tests, built with -DACTVAR_TRT_BUILD_TESTS=ON) creates each
plugin through its creator, makes the calls TensorRT makes (configurePlugin, getWorkspaceSize, attachToContext,
onShapeChange, enqueue with a workspace pointer 16 bytes off 256-byte alignment) on real device buffers and writes
the outputs; this test writes the inputs, runs it, and compares with actvar_export.ops on the kernel tests' shapes:
d16 and d30 widths (C = 1024, 1920), 2 and 128 sequences, scales 13x13 and 16x16 (token ratio 0.75), 16 experts
choose 12, float32 / float16 / bfloat16. Tolerances as tests/test_kernels.py (‖out − ref‖/‖ref‖ against float64:
fp16/bf16 1e-2, fp32 1e-5); expert choices and scatters exact.
The program is found through ACTVAR_TRT_PLUGIN_TEST, else build/plugins/trt/ (scripts/device_check.sh trtplugins).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from actvar_export import ops

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": (torch.float32, 0), "float16": (torch.float16, 1), "bfloat16": (torch.bfloat16, 2)}
TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
WIDTHS = [1024, 1920]                 # d16, d30
SEQS = [2, 128]
SCALES = [(169, 127), (256, 192)]     # 13x13 and 16x16 at token ratio 0.75
N_EXPERTS, TOP_K = 16, 12
_ERRORS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _error_report():
    """The measured relative errors, written to $OUT/trt_plugin_errors.json when OUT is set."""
    yield
    if _ERRORS and os.environ.get("OUT"):
        summary = {k: {"max": max(v), "n": len(v)} for k, v in _ERRORS.items()}
        Path(os.environ["OUT"], "trt_plugin_errors.json").write_text(json.dumps(summary, indent=1))


@pytest.fixture(scope="module")
def program():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device via scripts/device_check.sh trtplugins)")
    exe = Path(os.environ.get("ACTVAR_TRT_PLUGIN_TEST", ROOT / "build" / "plugins" / "trt" / "actvar_trt_plugin_test"))
    if not exe.is_file():
        if os.environ.get("ACTVAR_REQUIRE_PLUGINS"):
            raise FileNotFoundError(f"{exe}: build plugins/ with -DTensorRT_INCLUDE_DIR=... -DACTVAR_TRT_BUILD_TESTS=ON")
        pytest.skip(f"{exe} not built (cmake -DTensorRT_INCLUDE_DIR=... -DACTVAR_TRT_BUILD_TESTS=ON)")
    return exe


def _gen(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _write(t: torch.Tensor, path: Path):
    t = t.contiguous().cpu()
    (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tofile(path)


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    np_type = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int32: np.int32}
    a = torch.from_numpy(np.fromfile(path, dtype=np_type[dtype]))
    return (a.view(torch.bfloat16) if dtype == torch.bfloat16 else a).reshape(shape)


def _run(program, d: Path, line: str):
    (d / "cases.txt").write_text(line + "\n")
    r = subprocess.run([str(program), "--enqueue", str(d)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the output (unwritten poisoned elements?)"
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("S", SEQS)
@pytest.mark.parametrize("L,K", SCALES)
@pytest.mark.parametrize("C", WIDTHS)
def test_token_scatter_enqueue(program, tmp_path, dtype, S, L, K, C):
    tdt, code = DTYPES[dtype]
    g = _gen(S * L + C + code)
    x = torch.randn(S, L, C, generator=g).to(tdt)
    idx = ops.select_tokens(torch.randn(S, L, generator=g), K).to(torch.int32)
    upd = torch.randn(S, K, C, generator=g).to(tdt)
    for name, t in (("x", x), ("idx", idx), ("upd", upd)):
        _write(t, tmp_path / f"c.{name}.bin")
    _run(program, tmp_path, f"scatter c {code} {S} {L} {K} {C}")
    out = _read(tmp_path / "c.out.bin", tdt, (S, L, C))
    ref = ops.scatter_tokens(x, idx, upd)
    bits = torch.int32 if tdt == torch.float32 else torch.int16
    assert torch.equal(out.view(bits), ref.view(bits)), "scatter differs from the reference (bit-exact contract)"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("S", SEQS)
@pytest.mark.parametrize("L,K", SCALES)
@pytest.mark.parametrize("C", WIDTHS)
def test_expert_ffn_enqueue(program, tmp_path, dtype, S, L, K, C):
    tdt, code = DTYPES[dtype]
    T, H = S * K, 4 * C
    g = _gen(T + C + code)
    # weights scaled like a trained FFN (activations O(1), GELU exercised on both sides of 0); ties in a third of
    # the router rows
    h = torch.randn(T, C, generator=g).to(tdt)
    w1 = (torch.randn(H, C, generator=g) / C ** 0.5).to(tdt)
    b1 = (torch.randn(H, generator=g) * 0.1).to(tdt)
    w2 = (torch.randn(C, H, generator=g) / H ** 0.5).to(tdt)
    b2 = (torch.randn(C, generator=g) * 0.1).to(tdt)
    logits = torch.randn(T, N_EXPERTS, generator=g)
    logits[::3] = torch.randint(0, 2, logits[::3].shape, generator=g).float()
    for name, t in (("h", h), ("logits", logits), ("fc1_w", w1), ("fc1_b", b1), ("fc2_w", w2), ("fc2_b", b2)):
        _write(t, tmp_path / f"c.{name}.bin")
    _run(program, tmp_path, f"expert c {code} {T} {C} {H} {N_EXPERTS} {TOP_K}")
    out = _read(tmp_path / "c.out.bin", tdt, (T, C))
    experts = _read(tmp_path / "c.experts.bin", torch.int32, (T, TOP_K))
    ref_ex = ops.route_experts(logits, TOP_K)
    assert torch.equal(experts.long(), ref_ex), "expert choice differs from the reference"
    rows = torch.randperm(T, generator=_gen(T))[:2048]          # float64 reference on a subset (rows independent)
    dev = torch.device("cuda")
    d = lambda t: t.to(dev).double()  # noqa: E731
    ref = ops.expert_ffn(d(h[rows]), ref_ex[rows].to(dev), d(w1), d(b1), d(w2), d(b2), N_EXPERTS)
    err = _rel(out[rows].to(dev), ref)
    _ERRORS.setdefault(dtype, []).append(err)
    assert err <= TOL[dtype], f"relative error {err:.3e} > {TOL[dtype]:.0e}"
