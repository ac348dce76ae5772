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


def inverse_cdf(weights_BlV: torch.Tensor, u_Bl: torch.Tensor) -> torch.Tensor:
    """First id (vocabulary order) whose cumulative weight exceeds u·total (weights need not sum to 1).
    fp32 weights are summed in fp32, one after the other in vocabulary order, as the exported graphs
    do (torch's CPU cumsum accumulates in fp64, which moves u·total across a boundary once in ~10^4 rows)."""
    if weights_BlV.dtype == torch.float32:
        cdf = torch.from_numpy(np.cumsum(weights_BlV.cpu().numpy(), axis=-1, dtype=np.float32)).to(weights_BlV.device)
    else:
        cdf = weights_BlV.cumsum(dim=-1)
    thresh = u_Bl.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    return (cdf <= thresh).sum(dim=-1).clamp_max(weights_BlV.shape[-1] - 1)


def sample_noise(logits_BlV: torch.Tensor, u_Bl: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The `noise` sampler: the filter, then the inverse CDF over exp(logit - max) of the kept ids
    (the unnormalised weights the exported graphs accumulate, in fp32)."""
    logits = logits_BlV.float()
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k, top_p))
    w = torch.where(kept, (logits - logits.amax(dim=-1, keepdim=True)).exp(), 0.0)
    return inverse_cdf(w, u_Bl)


def gumbel_soft(logits: torch.Tensor, tau: float, rng: Optional[torch.Generator]) -> torch.Tensor:
    """VAR's `more_smooth` relaxation: softmax((logits + Gumbel noise) / tau) drawn from rng."""
    if rng is None:
        return F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    g = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    return ((logits + g) / tau).softmax(dim=-1)


def noise_for(batch: int, seed: int, total_tokens: int) -> torch.Tensor:
    """The canonical uniform tensor u (B, 680) for a seed: what every backend is fed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(batch, total_tokens, generator=g, dtype=torch.float32)
