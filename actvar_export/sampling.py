"""Token samplers (design file §3).

`official`: VAR's top-k / top-p filter and torch.multinomial with a seeded generator.
`noise`:    the same filter, then an inverse-CDF draw in vocabulary order from a caller-supplied
            uniform u in [0, 1): the sampled id is the first id whose cumulative probability
            exceeds u (u is scaled by the total so rounding can never run past the last id).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import TOTAL_TOKENS
from .errors import ActVarError

SAMPLERS = ("official", "noise")


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """A filtered copy of the logits (removed entries are -inf), VAR's rule with its ties made
    deterministic (design §3): top-k keeps every logit >= the k-th largest (ties at the cut all survive);
    top-p orders the survivors by logit descending, equal logits by ascending id, normalises over ALL
    survivors and, walking from the end, removes a token while the mass of it and everything after it
    is <= 1 - top_p; the first (most likely) token is always kept."""
    logits = logits_BlV.clone()
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        # VAR's arithmetic (ascending order, cumulative sum from the smallest); the order of equal logits
        # is the design's: descending by id in this ascending walk, from a stable descending sort flipped
        desc, desc_idx = logits.sort(dim=-1, descending=True, stable=True)
        sorted_logits, sorted_idx = desc.flip(-1), desc_idx.flip(-1)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        logits.masked_fill_(remove_sorted.scatter(sorted_idx.ndim - 1, sorted_idx, remove_sorted), -torch.inf)
    return logits


def sample_official(logits_BlV: torch.Tensor, top_k: int, top_p: float,
                    rng: Optional[torch.Generator]) -> torch.Tensor:
    """idx_Bl drawn with torch.multinomial from the filtered softmax (VAR's stream for a seeded rng)."""
    return multinomial(filter_top_k_top_p(logits_BlV, top_k, top_p), rng)


def multinomial(filtered_BlV: torch.Tensor, rng: Optional[torch.Generator]) -> torch.Tensor:
    """One torch.multinomial draw per token from the softmax of already filtered logits."""
    B, l, V = filtered_BlV.shape
    probs = filtered_BlV.softmax(dim=-1)
    return torch.multinomial(probs.view(-1, V), num_samples=1, replacement=True, generator=rng).view(B, l)


def inverse_cdf(weights_BlV: torch.Tensor, u_Bl: torch.Tensor, sequential: bool = True) -> torch.Tensor:
    """First id (vocabulary order) whose cumulative weight exceeds u·total (weights need not sum to 1).
    fp32 weights are summed in fp32, one after the other in vocabulary order, as the exported graphs
    do (torch's CPU cumsum accumulates in fp64, which moves u·total across a boundary once in ~10^4 rows);
    sequential=False: torch's cumsum on the weights' device instead (timing only, see SampleSettings.device_cdf)."""
    if weights_BlV.dtype == torch.float32 and sequential:
        cdf = torch.from_numpy(np.cumsum(weights_BlV.cpu().numpy(), axis=-1, dtype=np.float32)).to(weights_BlV.device)
    else:
        cdf = weights_BlV.cumsum(dim=-1)
    thresh = u_Bl.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    return (cdf <= thresh).sum(dim=-1).clamp_max(weights_BlV.shape[-1] - 1)


def sample_noise(logits_BlV: torch.Tensor, u_Bl: torch.Tensor, top_k: int, top_p: float,
                 sequential: bool = True) -> torch.Tensor:
    """The `noise` sampler: the filter, then the inverse CDF over exp(logit - max) of the kept ids
    (the unnormalised weights the exported graphs accumulate, in fp32)."""
    logits = logits_BlV.float()
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k, top_p))
    w = torch.where(kept, (logits - logits.amax(dim=-1, keepdim=True)).exp(), 0.0)
    return inverse_cdf(w, u_Bl, sequential)


def gumbel_soft(logits: torch.Tensor, tau: float, rng: Optional[torch.Generator]) -> torch.Tensor:
    """VAR's `more_smooth` relaxation: softmax((logits + Gumbel noise) / tau) drawn from rng."""
    if rng is None:
        return F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    g = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    return ((logits + g) / tau).softmax(dim=-1)


# §3.1 constants: the seed and counter multipliers, then SplitMix64's finaliser (Stafford's mix 13).
_SEED_MUL, _CTR_MUL = 0xD1B54A32D192ED03, 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2 ** 64:
        raise ActVarError(f"invalid --seed {seed}: seeds are unsigned 64-bit integers (0 .. 2^64-1)")


def noise_for(n_images: int, seed: int, total_tokens: int = TOTAL_TOKENS, first_image: int = 0) -> torch.Tensor:
    """The canonical uniforms u (n_images, total_tokens) float32 of design §3.1 for images
    first_image .. first_image + n_images - 1 of a request: a counter-based hash of (seed, image,
    token), so image b gets the same u whatever the batching, device or language."""
    check_seed(seed)
    if not 0 < total_tokens <= TOTAL_TOKENS or n_images < 0 or first_image < 0:
        raise ActVarError(f"invalid noise request: {n_images} images from {first_image}, {total_tokens} tokens")
    b = np.arange(first_image, first_image + n_images, dtype=np.uint64)[:, None]
    t = np.arange(total_tokens, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):     # uint64 arithmetic wraps modulo 2^64, as §3.1 specifies
        c = b * np.uint64(TOTAL_TOKENS) + t + np.uint64(1)
        z = (np.uint64(seed) * np.uint64(_SEED_MUL)) ^ (c * np.uint64(_CTR_MUL))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)   # < 2^24: exact in float32
    return torch.from_numpy(u)


def request_noise(n_images: int, seed: int) -> np.ndarray:
    """The uniforms u (n_images, 680) float32 of one request: what a request's images depend on, with its
    classes, cfg and top_p (never on how requests are packed into batches). Every serving path takes
    them from here."""
    return noise_for(n_images, seed).numpy()
