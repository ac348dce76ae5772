"""Samplers against independent computations (numpy, explicit loops)."""
import numpy as np
import pytest
import torch

from actvar_export.generate import SampleSettings, generate
from actvar_export.errors import ActVarError
from actvar_export.sampling import filter_top_k_top_p, inverse_cdf, noise_for, sample_noise, sample_official
from actvar_export.config import ActVarConfig

from .conftest import make_model


def np_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Keep-mask by the official rule, written independently on one row in float64 numpy."""
    keep = np.ones_like(logits, dtype=bool)
    if top_k > 0:
        kth = np.sort(logits)[::-1][top_k - 1]
        keep &= logits >= kth
    if top_p > 0:
        x = np.where(keep, logits, -np.inf)
        order = np.argsort(x, kind="stable")           # ascending
        p = np.exp(x[order] - x.max())
        p /= p.sum()
        asc = np.cumsum(p)
        removed = asc <= 1 - top_p
        removed[-1] = False
        keep[order[removed]] = False
    return keep


def np_draw(logits, keep, u):
    p = np.where(keep, np.exp(logits - logits[keep].max()), 0.0)
    p /= p.sum()
    c = 0.0
    for i, pi in enumerate(p):
        c += pi
        if c > u:
            return i
    return int(np.nonzero(p)[0][-1])


@pytest.mark.parametrize("top_k, top_p", [(0, 0.0), (900, 0.0), (0, 0.9), (900, 0.96), (50, 0.5), (1, 0.9)])
def test_noise_sampler_is_inverse_cdf(top_k, top_p):
    g = torch.Generator().manual_seed(top_k + int(100 * top_p))
    logits = torch.randn(2, 40, 4096, generator=g, dtype=torch.float64) * 3
    u = torch.rand(2, 40, generator=g, dtype=torch.float64)
    got = sample_noise(logits, u, top_k, top_p)
    for b in range(2):
        for t in range(40):
            row = logits[b, t].numpy()
            keep = np_filter(row, top_k, top_p)
            assert keep[got[b, t]]
            assert got[b, t].item() == np_draw(row, keep, u[b, t].item())


def test_filter_matches_independent_rule():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4096, generator=g, dtype=torch.float64) * 2
    for k, p in [(900, 0.96), (0, 0.95), (4000, 0.5)]:
        f = filter_top_k_top_p(logits.unsqueeze(0), k, p)[0]
        for r in range(3):
            assert np.array_equal(torch.isfinite(f[r]).numpy(), np_filter(logits[r].numpy(), k, p))


def test_inverse_cdf_never_runs_past_the_end():
    probs = torch.tensor([[0.2, 0.3, 0.5, 0.0]], dtype=torch.float32)
    assert inverse_cdf(probs, torch.tensor([0.9999999])).item() == 2
    assert inverse_cdf(probs, torch.tensor([0.0])).item() == 0
    assert inverse_cdf(probs, torch.tensor([0.2])).item() == 1  # first id whose cumulative EXCEEDS u


def test_official_sampler_reproduces_multinomial_stream():
    g0 = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 30, 4096, generator=g0) * 3
    for seed in (0, 1, 123):
        ref_rng = torch.Generator().manual_seed(seed)
        probs = []
        for b in range(2):
            for t in range(30):
                keep = torch.from_numpy(np_filter(logits[b, t].double().numpy(), 900, 0.95))
                probs.append(torch.where(keep, logits[b, t], -torch.inf).softmax(-1))
        want = torch.multinomial(torch.stack(probs), 1, replacement=True, generator=ref_rng).view(2, 30)
        got = sample_official(logits, 900, 0.95, torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)


M64 = 2 ** 64


def u_by_hand(seed: int, b: int, t: int) -> float:
    """Design §3.1 written out with Python integers, one step per line, each reduced mod 2^64."""
    c = (b * 680 + t + 1) % M64
    z = ((seed * 0xD1B54A32D192ED03) % M64) ^ ((c * 0x9E3779B97F4A7C15) % M64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
    z = z ^ (z >> 31)
    return (z >> 40) / 2 ** 24


@pytest.mark.parametrize("seed, b, t", [(0, 0, 0), (0, 0, 1), (7, 3, 679), (2 ** 64 - 1, 1, 5), (123456789, 2, 424)])
def test_canonical_noise_pinned_by_hand(seed, b, t):
    u = noise_for(b + 1, seed, 680)
    assert u.dtype == torch.float32 and u.shape == (b + 1, 680)
    assert u[b, t].item() == u_by_hand(seed, b, t)      # exact: (z >> 40) < 2^24 is exact in float32


def test_canonical_noise_anchored_to_splitmix64():
    """With seed 0, z before mixing is c·0x9E3779B97F4A7C15, SplitMix64's state after c steps from 0,
    so u's top 24 bits are the published SplitMix64(0) outputs 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
    0x06C45D188009454F (Vigna's reference splitmix64.c)."""
    u = noise_for(1, 0, 680)[0, :3].tolist()
    assert u == [0xE220A8 / 2 ** 24, 0x6E789E / 2 ** 24, 0x06C45D / 2 ** 24]
    assert [u_by_hand(0, 0, t) for t in range(3)] == u


def test_canonical_noise_is_independent_of_batching():
    whole = noise_for(7, 99, 680)
    assert torch.equal(noise_for(3, 99, 680, first_image=4), whole[4:])
    assert torch.equal(noise_for(1, 99, 680, first_image=2)[0], whole[2])
    assert not torch.equal(whole[0], whole[1]) and not torch.equal(whole, noise_for(7, 100, 680))
    assert 0.0 <= whole.min() and whole.max() < 1.0 and abs(whole.mean().item() - 0.5) < 0.01
    for bad in (-1, 2 ** 64):
        with pytest.raises(ActVarError, match="seed"):
            noise_for(1, bad, 680)


def test_seeds(vae):
    m = make_model(2, ActVarConfig(), seed=9)
    labels = torch.tensor([1])
    a = generate(m, vae, labels, SampleSettings(), seed=11)
    b = generate(m, vae, labels, SampleSettings(), seed=11)
    c = generate(m, vae, labels, SampleSettings(), seed=12, decode=False)  # the image is a function of f_hat
    assert torch.equal(a.images_B3HW, b.images_B3HW)
    assert all(torch.equal(x, y) for x, y in zip(a.idx, b.idx))
    assert not torch.equal(a.idx[-1], c.idx[-1])
    assert (a.f_hat - c.f_hat).abs().mean() > 1e-2
    assert a.images_B3HW.std() > 0.05  # not a flat image


def test_more_smooth_uses_filtered_logits(vae):
    """VAR smooths the *filtered* logits: with top_k=1 only the argmax survives, so the Gumbel-smoothed
    embedding is exactly that codebook entry and f_hat equals plain top-1 sampling, whatever the noise."""
    m = make_model(2, ActVarConfig(), seed=9)
    labels = torch.tensor([3, 4])
    smooth = generate(m, vae, labels, SampleSettings(top_k=1, top_p=0.0, more_smooth=True), seed=5, decode=False)
    plain = generate(m, vae, labels, SampleSettings(top_k=1, top_p=0.0), seed=6, decode=False)
    assert all(torch.equal(a, b) for a, b in zip(smooth.idx, plain.idx))
    assert torch.allclose(smooth.f_hat, plain.f_hat, atol=1e-5)
