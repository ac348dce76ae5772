"""GPU tests of the CUDA plugin kernels (plugins/) through actvar_export.kernels, against actvar_export.ops.

Marked `gpu`; on a machine without a CUDA GPU every test skips with a reason. Nothing here touches CUDA
at import or collection time: availability is checked inside the `dev` fixture.
Tolerances (‖out − ref‖ / ‖ref‖ against a float64 reference): fp16 / bf16 1e-2 (bf16 rounding of the
hidden activations and of the output, 2^-9 relative each, with fp32 accumulation, lands near 3e-3),
fp32 1e-5 (fp32 accumulation over K ≤ 4C terms: ~sqrt(K)·2^-24 ≈ 5e-6 at K = 7680, in the worst norm-wise case).
Selections (tokens, experts) and gathers/scatters must match exactly.
"""
from __future__ import annotations

import os

import pytest
import torch

from actvar_export import ops

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
WIDTHS = [1024, 1920]                 # d16, d30
SEQS = [2, 32, 128]
SCALES = [(169, 127), (256, 192)]     # 13x13 and 16x16 at token ratio 0.75
N_EXPERTS, TOP_K = 16, 12             # expert ratio 0.75


@pytest.fixture(scope="module")
def dev():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device via scripts/device_check.sh)")
    from actvar_export import kernels
    try:
        kernels.load_library()
    except FileNotFoundError as e:
        if os.environ.get("ACTVAR_REQUIRE_PLUGINS"):
            raise
        pytest.skip(f"plugin library not built: {e}")
    return torch.device("cuda")


_ERRORS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _error_report():
    """Collects the measured relative errors; written to $OUT/kernel_errors.json when OUT is set."""
    yield
    if _ERRORS and os.environ.get("OUT"):
        import json
        summary = {k: {"max": max(v), "median": sorted(v)[len(v) // 2], "n": len(v)} for k, v in _ERRORS.items()}
        with open(os.path.join(os.environ["OUT"], "kernel_errors.json"), "w") as f:
            json.dump(summary, f, indent=1)


@pytest.fixture(scope="module")
def K():
    from actvar_export import kernels
    return kernels


def _gen(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the output (unwritten poisoned elements?)"
    return ((out - ref).norm() / ref.norm()).item()


def _poison(t):
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-7)
    return t


# ---------------------------------------------------------------- token selection / gather / scatter
@pytest.mark.parametrize("S", SEQS)
@pytest.mark.parametrize("L,k", SCALES)
def test_select_tokens_random(dev, K, S, L, k):
    scores = torch.randn(S, L, generator=_gen(S * L)).to(dev)
    idx = K.select_tokens(scores, k)
    ref = ops.select_tokens(scores.cpu(), k)
    assert idx.dtype == torch.int32 and idx.shape == (S, k)
    assert torch.equal(idx.cpu().long(), ref)


@pytest.mark.parametrize("L,k", [(1, 1), (5, 2), (16, 12), (32, 31), (33, 7), (169, 127), (256, 192), (1000, 999),
                                 (4096, 3072), (8192, 1)])
def test_select_tokens_ties(dev, K, L, k):
    g = _gen(L + k)
    S = 7
    scores = torch.randint(0, 4, (S, L), generator=g).float()     # heavy ties
    scores[1] = 0.0                                                # one row all equal
    scores[2, ::2] = -0.0                                          # -0.0 ties with +0.0
    scores[3] = torch.randn(L, generator=g)
    scores[3, L // 2] = float("inf")
    scores[4] = torch.randn(L, generator=g).round(decimals=1)
    if L > 3:
        scores[5, 1] = float("nan")                                # NaN counts as the largest (torch.sort)
        scores[5, 3] = float("-inf")
    idx = K.select_tokens(scores.to(dev), k)
    ref = ops.select_tokens(scores, k)
    assert torch.equal(idx.cpu().long(), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", SEQS)
@pytest.mark.parametrize("L,k", SCALES)
@pytest.mark.parametrize("C", WIDTHS)
def test_gather_scatter(dev, K, dtype, S, L, k, C):
    g = _gen(S + L + C)
    x = torch.randn(S, L, C, generator=g).to(dtype).to(dev)
    idx = ops.select_tokens(torch.randn(S, L, generator=g), k).int().to(dev)
    upd = torch.randn(S, k, C, generator=g).to(dtype).to(dev)
    # gather into a poisoned buffer
    sel = _poison(torch.empty(S, k, C, dtype=dtype, device=dev))
    K.gather_tokens(x, idx, out=sel)
    assert torch.equal(sel, ops.gather_tokens(x, idx))
    # out-of-place scatter into a poisoned buffer
    out = _poison(torch.empty_like(x))
    K.scatter_tokens(x, idx, upd, out=out)
    ref = ops.scatter_tokens(x, idx, upd)
    assert torch.equal(out, ref)
    # in place: only the selected rows change
    y = x.clone()
    K.scatter_tokens(y, idx, upd, inplace=True)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,L,k,C", [(3, 7, 3, 1), (1, 1, 1, 5), (2, 33, 17, 3), (5, 100, 60, 77), (4, 64, 64, 8)])
def test_gather_scatter_odd_shapes(dev, K, dtype, S, L, k, C):
    """Rows whose byte size is not a multiple of 16 take the narrower copy paths."""
    g = _gen(S * 1000 + L * 10 + C)
    x = torch.randn(S, L, C, generator=g).to(dtype).to(dev)
    idx = torch.stack([torch.randperm(L, generator=g)[:k].sort().values for _ in range(S)]).int().to(dev)
    upd = torch.randn(S, k, C, generator=g).to(dtype).to(dev)
    sel = _poison(torch.empty(S, k, C, dtype=dtype, device=dev))
    assert torch.equal(K.gather_tokens(x, idx, out=sel), ops.gather_tokens(x, idx))
    out = _poison(torch.empty_like(x))
    assert torch.equal(K.scatter_tokens(x, idx, upd, out=out), ops.scatter_tokens(x, idx, upd))


# ---------------------------------------------------------------- expert routing
@pytest.mark.parametrize("T,N,k", [(24576, 16, 12), (1, 16, 12), (1000, 16, 16), (777, 8, 1), (300, 32, 5),
                                   (257, 64, 48), (100, 3, 2)])
def test_route_experts(dev, K, T, N, k):
    g = _gen(T + N + k)
    logits = torch.randn(T, N, generator=g)
    logits[: T // 2] = torch.randint(0, 3, (T // 2, N), generator=g).float()   # ties in half the rows
    ex = K.route_experts(logits.to(dev), k)
    assert torch.equal(ex.cpu().long(), ops.route_experts(logits, k))


# ---------------------------------------------------------------- expert FFN
def _ffn_inputs(T, C, N, dtype, dev, seed, tie_logits=False):
    g = _gen(seed)
    H = 4 * C
    # weights scaled like a trained FFN so activations stay O(1) and GELU is exercised on both sides of 0
    h = torch.randn(T, C, generator=g)
    w1 = torch.randn(H, C, generator=g) / C ** 0.5
    b1 = torch.randn(H, generator=g) * 0.1
    w2 = torch.randn(C, H, generator=g) / H ** 0.5
    b2 = torch.randn(C, generator=g) * 0.1
    logits = torch.randn(T, N, generator=g)
    if tie_logits:
        logits[::3] = torch.randint(0, 2, logits[::3].shape, generator=g).float()
    cast = lambda t: t.to(dtype).to(dev)  # noqa: E731
    return cast(h), logits.to(dev), cast(w1), cast(b1), cast(w2), cast(b2)


def _check_ffn(K, h, logits, w1, b1, w2, b2, k, dtype, rows_checked=2048):
    T, C = h.shape
    N = logits.shape[1]
    out = _poison(torch.empty(T, C, dtype=dtype, device=h.device))
    ws_bytes = K.expert_ffn_workspace_size(T, C, w1.shape[0], N, k, dtype)
    ws = torch.full((ws_bytes,), 0xFF, dtype=torch.uint8, device=h.device)   # NaN bit patterns everywhere
    out, ex = K.expert_ffn(h, logits, w1, b1, w2, b2, k, return_experts=True, out=out, workspace=ws)
    torch.cuda.synchronize()
    ref_ex = ops.route_experts(logits.cpu(), k)
    assert torch.equal(ex.cpu().long(), ref_ex), "expert choice differs from the reference"
    assert torch.isfinite(out.float()).all(), "unwritten (poisoned) or non-finite output elements"
    # float64 reference on a random subset of rows (rows are independent)
    rows = torch.randperm(T, generator=_gen(T))[:rows_checked].to(h.device)
    d = lambda t: t.double()  # noqa: E731
    ref = ops.expert_ffn(d(h[rows]), ref_ex.to(h.device)[rows], d(w1), d(b1), d(w2), d(b2), N)
    err = _rel(out[rows], ref)
    _ERRORS.setdefault(str(dtype).split(".")[-1], []).append(err)
    assert err <= TOL[dtype], f"relative error {err:.3e} > {TOL[dtype]:.0e}"
    return err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", SEQS)
@pytest.mark.parametrize("L,kt", SCALES)
@pytest.mark.parametrize("C", WIDTHS)
def test_expert_ffn_shapes(dev, K, dtype, S, L, kt, C):
    T = S * kt
    args = _ffn_inputs(T, C, N_EXPERTS, dtype, dev, seed=T + C)
    _check_ffn(K, *args, TOP_K, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_expert_ffn_random_shapes(dev, K, dtype, seed):
    g = _gen(1000 + seed)
    C = [64, 72, 96, 200, 256, 1024][seed]          # 72 and 200 take the SIMT fallback for fc1 (C % 32 != 0)
    N = [4, 16, 6, 8, 16, 16][seed]
    k = int(torch.randint(1, N + 1, (1,), generator=g))
    T = int(torch.randint(1, 3000, (1,), generator=g))
    args = _ffn_inputs(T, C, N, dtype, dev, seed=seed, tie_logits=True)
    _check_ffn(K, *args, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expert_ffn_sparse_routing_with_an_unchosen_expert(dev, K, dtype):
    """Top-1 of 16 at d30 width and 6144 tokens (routed path): each expert holds ~1/16 of the tokens, so the
    gathered fc1 walks far fewer m-tiles than its host-side bound (T) allows, and one expert that no token chooses
    has all its slices of H written by the zero fill alone. The workspace is NaN-poisoned: a missed zero or a
    skipped tile shows up as a non-finite output row (fc2 reads every slice)."""
    h, logits, w1, b1, w2, b2 = _ffn_inputs(6144, 1920, 16, dtype, dev, seed=77)
    logits[:, 5] = -1e4          # expert 5: chosen by no token
    _check_ffn(K, h, logits, w1, b1, w2, b2, 1, dtype)
    assert not (K.route_experts(logits, 1) == 5).any()


def test_expert_ffn_equals_loop_formulation(dev, K):
    """Cross-check against the independent per-expert loop of ops (fp32, all rows)."""
    h, logits, w1, b1, w2, b2 = _ffn_inputs(513, 256, 16, torch.float32, dev, seed=5)
    out = K.expert_ffn(h, logits, w1, b1, w2, b2, 12)
    ex = ops.route_experts(logits, 12)
    d = lambda t: t.double()  # noqa: E731
    ref = ops.expert_ffn_loop(d(h), ex, d(w1), d(b1), d(w2), d(b2), 16)
    assert _rel(out, ref) <= 1e-5


def test_expert_ffn_full_ratio_is_dense(dev, K):
    """top_k == N must reproduce the dense FFN."""
    h, logits, w1, b1, w2, b2 = _ffn_inputs(300, 128, 8, torch.float32, dev, seed=9)
    out = K.expert_ffn(h, logits, w1, b1, w2, b2, 8)
    d = lambda t: t.double()  # noqa: E731
    ref = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(d(h), d(w1), d(b1)), approximate="tanh"), d(w2), d(b2))
    assert _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("T", [100, 4096, 4097, 6144])
def test_expert_ffn_path_is_the_path_taken(dev, K, T):
    """expert_ffn_path (the library's own answer, used for the benchmark's row labels) names the path whose kernels
    actually run: the dense path's routing/masking kernel, the masked path's routing kernel without token lists, or
    the routed path's token lists. Also run in every forced-path child process below (other thresholds)."""
    from torch.profiler import ProfilerActivity, profile
    args = _ffn_inputs(T, 256, N_EXPERTS, torch.bfloat16, dev, seed=T)
    path = K.expert_ffn_path(T, torch.bfloat16)
    K.expert_ffn(*args, TOP_K)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        K.expert_ffn(*args, TOP_K)
        torch.cuda.synchronize()
    names = " ".join(e.key for e in prof.key_averages())
    marker = {"dense-lt": "routeZeroKernel", "masked": "routeBitsKernel", "routed": "expertListsKernel"}[path]
    assert marker in names, f"{path} reported, kernels run: {names[:1500]}"
    if path != "routed":
        assert "expertListsKernel" not in names, f"{path} reported but the routed path ran"


def test_invalid_arguments(dev, K):
    h, logits, w1, b1, w2, b2 = _ffn_inputs(10, 64, 16, torch.float16, dev, seed=1)
    with pytest.raises(K.KernelError):
        K.expert_ffn(h, logits, w1, b1, w2, b2, 17)          # top_k > N
    with pytest.raises(K.KernelError):
        K.select_tokens(torch.randn(2, 5, device=dev), 6)    # k > L
    assert K.expert_ffn_workspace_size(0, 64, 256, 16, 12, torch.float16) == 0


ROUTED = {"ACTVAR_DENSE_MAX_T": "0", "ACTVAR_MASKED_DENSE_MAX_T": "0"}


@pytest.mark.parametrize("forced", [ROUTED,
                                    {"ACTVAR_DENSE_MAX_T": "1000000"},
                                    {"ACTVAR_MASKED_DENSE_MAX_T": "1000000", "ACTVAR_DISABLE_CUBLASLT": "1"},
                                    {**ROUTED, "ACTVAR_FC2_CFG": "11"},
                                    {"ACTVAR_DENSE_MAX_T": "0", "ACTVAR_FC2_CFG": "12", "ACTVAR_FC1_CFG": "12"},
                                    {**ROUTED, "ACTVAR_FC1_CFG": "11"},
                                    {**ROUTED, "ACTVAR_FC1_CFG": "4"},
                                    {**ROUTED, "ACTVAR_ZERO_PASS": "1"},
                                    {**ROUTED, "ACTVAR_DISABLE_CUBLASLT": "1"},
                                    {**ROUTED, "ACTVAR_FC1_CLUSTER": "1"},
                                    {**ROUTED, "ACTVAR_FC1_BAND": "3"},
                                    {**ROUTED, "ACTVAR_FC1_BAND": "0"},
                                    {**ROUTED, "ACTVAR_FC1_N224": "0"}],
                         ids=["routed", "dense_cublaslt", "masked_dense_own", "fc2_tma_256", "tma_pingpong",
                              "fc1_gather_tma_coop", "fc1_gather_cp_async", "routed_zero_pass", "routed_own_fc2",
                              "fc1_single_cta", "fc1_bands_of_3", "fc1_unbanded", "fc1_no_n224"])
def test_expert_ffn_both_paths(dev, forced):
    """Every Hopper path must meet the reference on every expert shape: rerun the expert tests with the routed
    path forced for all T, the dense path forced for all T (cuBLASLt GEMMs; and the plugin's own
    masked-dense kernels with cuBLASLt disabled), the TMA fc2 kernel with 128 x 256
    tiles everywhere (partial column tiles at C = 1920), the ping-pong TMA kernel for fc2 and for both fc1s
    (gathered rows by a cp.async producer), the cooperative TMA kernel for the gathered fc1, the
    2-CTA-per-SM cp.async kernel for it, the routed path with the unchosen slices of H zeroed by the separate
    pass instead of fc1's producer, and the routed path without cuBLASLt (its fc2 then by the plugin's own kernel
    with the automatic tile choice; with cuBLASLt, fc2 runs through it unless ACTVAR_FC2_CFG forces a tiling), and
    the gathered fc1 on single CTAs instead of the default clusters of two that share B, and the gathered fc1's
    tiles walked in bands of 3 m-units (every width; remainder bands) and unbanded (by default C = 1920 walks bands of
    8, C = 1024 unbanded), and the gathered fc1's last n-tiles of <= 224 columns multiplied 256 wide (by default
    m64n224). The settings are read once per process, hence a child process."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(forced)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "gpu", __file__,
                        "-k", "expert_ffn and not both_paths"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_small_t_dense_path_uses_cublaslt(dev):
    """On the device (ACTVAR_REQUIRE_PLUGINS=1, torch's CUDA 13 cuBLASLt present) the small-T dense path must
    actually run through cuBLASLt, so that the expert tests above exercise it (else they would silently test the
    fallback): built with the header (not -1) and opened (1), unless disabled on purpose."""
    from actvar_export import kernels
    state = kernels.expert_ffn_uses_cublaslt()
    if os.environ.get("ACTVAR_DISABLE_CUBLASLT", "0") not in ("", "0"):
        assert state == 0
    elif os.environ.get("ACTVAR_REQUIRE_PLUGINS"):
        assert state == 1, f"cuBLASLt state {state} (-1: built without cublasLt.h, 0: libcublasLt.so.13 not opened)"
    else:
        assert state in (-1, 0, 1)
