"""The reference ActVAR against dense VAR, and the tie / reconstruction / cache rules of design §2."""

import pytest
import torch
import torch.nn.functional as F

from actvar_export import ops
from actvar_export.config import SCALE_LENS, ActVarConfig
from actvar_export.generate import SampleSettings, generate, teacher_forced

from .conftest import make_model

LABELS = torch.tensor([3, 980])


def _copy_into(dst, src):
    """Load the VAR part of an ActVAR model into a dense one (strict on the dense key set)."""
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if "selector" not in k and "router" not in k})


def test_ratio_one_equals_dense_on_every_scale(vae):
    """ρ_t = ρ_w = 1 on every scale reproduces VAR's logits (fp32, max abs ≤ 1e-5)."""
    act = ActVarConfig(num_experts=16, expert_ratio=1.0, token_ratio=1.0, active_scales=tuple(range(10)))
    sparse = make_model(2, act, seed=5)
    dense = make_model(2, None)
    _copy_into(dense, sparse)
    ref = generate(dense, vae, LABELS, SampleSettings(sampler="official"), seed=0, decode=False)
    a = teacher_forced(dense, vae, LABELS, ref.idx, cfg=1.5)
    b = teacher_forced(sparse, vae, LABELS, ref.idx, cfg=1.5)
    for si in range(10):
        assert b.aux[si][0].idx_SK is not None  # the dynamic path really ran
        err = (a.logits[si] - b.logits[si]).abs().max().item()
        assert err <= 1e-5, (si, err)
        assert a.logits[si].std() > 0.5  # logits carry signal (non-vacuous weights)


def test_default_actvar_differs_from_dense(vae):
    """At the default ratios the dynamic blocks change the last two scales' logits, and only those."""
    sparse = make_model(2, ActVarConfig(), seed=5)
    dense = make_model(2, None)
    _copy_into(dense, sparse)
    ref = generate(dense, vae, LABELS, SampleSettings(), seed=0, decode=False)
    a = teacher_forced(dense, vae, LABELS, ref.idx, cfg=1.5)
    b = teacher_forced(sparse, vae, LABELS, ref.idx, cfg=1.5)
    for si in range(8):
        assert torch.equal(a.logits[si], b.logits[si])
    for si in (8, 9):
        assert (a.logits[si] - b.logits[si]).abs().max() > 0.1


def test_all_experts_equal_dense_ffn():
    torch.manual_seed(0)
    T, C, N = 37, 64, 8
    fc1, fc2 = torch.nn.Linear(C, 4 * C).double(), torch.nn.Linear(4 * C, C).double()
    h = torch.randn(T, C, dtype=torch.float64)
    dense = fc2(F.gelu(fc1(h), approximate="tanh"))
    experts = ops.route_experts(torch.randn(T, N), N)
    assert torch.equal(experts, torch.arange(N).expand(T, N))
    out = ops.expert_ffn(h, experts, fc1.weight, fc1.bias, fc2.weight, fc2.bias, N)
    assert (out - dense).abs().max() < 1e-12


def test_expert_ffn_matches_explicit_slices():
    """The masked formulation equals the definition: a sum over each chosen expert's weight slices."""
    torch.manual_seed(1)
    T, C, N, K = 50, 32, 4, 3
    w1, b1 = torch.randn(4 * C, C, dtype=torch.float64), torch.randn(4 * C, dtype=torch.float64)
    w2, b2 = torch.randn(C, 4 * C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    h = torch.randn(T, C, dtype=torch.float64)
    experts = ops.route_experts(torch.randn(T, N), K)
    d = 4 * C // N
    manual = torch.stack([
        b2 + sum(F.gelu(h[t] @ w1[e * d:(e + 1) * d].T + b1[e * d:(e + 1) * d], approximate="tanh") @ w2[:, e * d:(e + 1) * d].T
                 for e in experts[t].tolist())
        for t in range(T)])
    assert (ops.expert_ffn(h, experts, w1, b1, w2, b2, N) - manual).abs().max() < 1e-10
    assert (ops.expert_ffn_loop(h, experts, w1, b1, w2, b2, N) - manual).abs().max() < 1e-10


def test_tie_rules():
    # tokens: equal scores go to the lower position, output ascending
    scores = torch.tensor([[1.0, 5.0, 3.0, 5.0, 3.0, 3.0, 0.0]])
    assert ops.select_tokens(scores, 3).tolist() == [[1, 2, 3]]
    assert ops.select_tokens(scores, 4).tolist() == [[1, 2, 3, 4]]
    assert ops.select_tokens(torch.zeros(2, 9), 4).tolist() == [[0, 1, 2, 3]] * 2
    # experts: equal logits go to the lower expert id
    logits = torch.tensor([[0.5, 2.0, 2.0, 2.0, -1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert ops.route_experts(logits, 2).tolist() == [[1, 2], [0, 1]]
    # randomised against a brute-force rule with many ties
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.randint(0, 4, (3, 20), generator=g).float()
        k = int(torch.randint(1, 20, (1,), generator=g))
        for row, got in zip(s.tolist(), ops.select_tokens(s, k).tolist()):
            want = sorted(sorted(range(20), key=lambda i: (-row[i], i))[:k])
            assert got == want


def test_reconstruction_and_cache_rule(vae):
    """Unselected tokens pass through unchanged; each block caches exactly K_t keys per scale."""
    act = ActVarConfig(num_experts=4, expert_ratio=0.5, token_ratio=0.5, active_scales=(7, 9))
    m = make_model(2, act, seed=2)
    x, cond = m.first_input(LABELS)
    caches = [None] * m.depth
    for si in range(10):
        xin = x if si == 0 else torch.randn(4, SCALE_LENS[si], m.C) * 0.1
        blk_in = xin
        out = m.step(si, xin, cond, caches)
        for b, kv in enumerate(out.kv):
            assert kv[0].shape[2] == act.k_t(si)
        caches = m.extend_caches(caches, out.kv)
        if si in (7, 9):
            # block 0 only touched its selected rows
            x0, _, aux = m.blocks[0](blk_in, cond, [None, None][0] if si == 0 else _prefix(caches, si, act), act.k_t(si), act.k_w)
            keep = torch.ones(4, SCALE_LENS[si], dtype=torch.bool)
            keep.scatter_(1, aux.idx_SK, False)
            assert torch.equal(x0[keep], blk_in[keep])
            assert not torch.equal(x0[~keep], blk_in[~keep])
            assert aux.experts_SKE.shape == (4, act.k_t(si), act.k_w)
    assert caches[0][0].shape[2] == sum(act.k_t(s) for s in range(10))


def _prefix(caches, si, act):
    n = sum(act.k_t(s) for s in range(si))
    return caches[0][0][:, :, :n], caches[0][1][:, :, :n]


def test_residual_updates_are_of_the_order_of_the_input(vae):
    """The random init is not vacuous: every block's update has a norm comparable to its input."""
    m = make_model(3, ActVarConfig(), seed=7)
    ratios = []

    def hook(mod, inp, out):
        x_in, x_out = inp[0], out[0]
        ratios.append(((x_out - x_in).norm() / x_in.norm()).item())
    hs = [b.register_forward_hook(hook) for b in m.blocks]
    generate(m, vae, LABELS, SampleSettings(), seed=1, decode=False)
    for h in hs:
        h.remove()
    assert len(ratios) == 30
    assert min(ratios) > 0.2 and max(ratios) < 5, ratios


@pytest.mark.parametrize("precision, tol", [("bf16", 6e-2), ("fp16", 1e-2)])
def test_autocast_close_to_fp32(vae, precision, tol):
    """Relative error of autocast logits vs fp32: bf16 has 8 mantissa bits (~4e-3 per rounding),
    fp16 11 bits (~5e-4); two blocks of accumulated roundings stay within these bounds."""
    m = make_model(2, ActVarConfig(token_ratio=1.0, expert_ratio=1.0), seed=4)
    ref = generate(m, vae, LABELS, SampleSettings(), seed=0, decode=False)
    a = teacher_forced(m, vae, LABELS, ref.idx, cfg=1.5)
    b = teacher_forced(m, vae, LABELS, ref.idx, cfg=1.5, precision=precision)
    for si in range(10):
        rel = ((a.logits[si] - b.logits[si]).norm() / a.logits[si].norm()).item()
        assert rel < tol, (si, rel)
