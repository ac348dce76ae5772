"""The reference 10-scale inference loop (VAR's autoregressive_infer_cfg) and teacher forcing."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .config import CVAE, NUM_SCALES, PATCH_NUMS, SCALE_BEGIN, TOTAL_TOKENS
from .errors import ActVarError
from .model import VAR, BlockAux, cfg_logits
from .sampling import SAMPLERS, filter_top_k_top_p, gumbel_soft, multinomial, sample_noise
from .vqvae import VQVAE

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class SampleSettings:
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    sampler: str = "official"
    more_smooth: bool = False
    # noise sampler: the cumulative sum as torch computes it on the logits' device (on CUDA a parallel scan whose
    # rounding can move a draw at a CDF boundary) instead of design §3's sequential fp32 order, which the
    # reference computes on the host. For timing the eager code a deployment replaces (`bench`), never for validation.
    device_cdf: bool = False

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ActVarError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.top_k < 0:
            raise ActVarError(f"invalid top-k {self.top_k}: must be >= 0 (0 disables)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ActVarError(f"invalid top-p {self.top_p}: must be in [0, 1] (0 disables)")
        if self.more_smooth and self.sampler != "official":
            raise ActVarError("more_smooth draws Gumbel noise from the seeded stream: only with --sampler official")


@dataclass
class Generation:
    images_B3HW: Optional[torch.Tensor]            # in [0, 1], None if decode=False
    idx: List[torch.Tensor]                       # per scale (B, pn²)
    logits: List[torch.Tensor] = field(default_factory=list)  # per scale CFG-combined (B, l, V)
    aux: List[List[BlockAux]] = field(default_factory=list)   # per scale, per block
    f_hat: Optional[torch.Tensor] = None


def autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ActVarError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@torch.no_grad()
def generate(model: VAR, vae: VQVAE, label_B: torch.Tensor, settings: SampleSettings, seed: Optional[int] = None,
             u_BL: Optional[torch.Tensor] = None, precision: str = "fp32", decode: bool = True,
             keep_logits: bool = False, progress: Optional[Callable[[int], None]] = None,
             trace: Optional[Callable[[dict], None]] = None) -> Generation:
    """Generate B images. `official` draws from a torch.Generator seeded with `seed` on the model's
    device (VAR's stream); `noise` needs u_BL (B, 680) uniforms. `trace`, if given, receives every
    scale's inputs and outputs (validation records the reference from this very loop)."""
    dev = next(model.parameters()).device
    B = label_B.shape[0]
    rng = None
    if settings.sampler == "official" and seed is not None:
        rng = torch.Generator(device=dev).manual_seed(seed)
    if settings.sampler == "noise":
        if u_BL is None or tuple(u_BL.shape) != (B, TOTAL_TOKENS):
            raise ActVarError(f"the noise sampler needs u of shape ({B}, {TOTAL_TOKENS})")
        u_BL = u_BL.to(dev)
    label_B = label_B.to(dev)
    out = Generation(images_B3HW=None, idx=[])
    with autocast(dev, precision):
        x, cond = model.first_input(label_B)
        caches = [None] * model.depth
        f_hat = torch.zeros(B, CVAE, PATCH_NUMS[-1], PATCH_NUMS[-1], device=dev)
        for si, pn in enumerate(PATCH_NUMS):
            st = model.step(si, x, cond, caches)
            x_in, caches_in, f_hat_in = x, caches, f_hat
            caches = model.extend_caches(caches, st.kv)
            logits = cfg_logits(st.logits_SlV, si, settings.cfg)
            if settings.sampler == "official":
                # VAR filters in place, so `more_smooth` below sees the filtered logits (removed ids get
                # zero weight); filtering is not idempotent (top-p renormalises), so filter exactly once
                filtered = filter_top_k_top_p(logits, settings.top_k, settings.top_p)
                idx = multinomial(filtered, rng)
            else:
                a = SCALE_BEGIN[si]
                idx = sample_noise(logits, u_BL[:, a:a + pn * pn], settings.top_k, settings.top_p,
                                   sequential=not settings.device_cdf)
            if settings.more_smooth:
                ratio = si / (NUM_SCALES - 1)
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                h = gumbel_soft(filtered.mul(1 + ratio), tau, rng) @ vae.quantize.embedding.weight.unsqueeze(0)
                f_hat = vae.fhat_update(si, f_hat, h_BlC=h.float())
            else:
                f_hat = vae.fhat_update(si, f_hat, idx)
            out.idx.append(idx)
            out.aux.append(st.aux)
            if keep_logits:
                out.logits.append(logits)
            if si != NUM_SCALES - 1:
                x = model.scale_input(si + 1, vae.next_input(si, f_hat))
            if trace:
                trace({"si": si, "x_in": x_in, "caches_in": caches_in, "f_hat_in": f_hat_in, "step": st,
                       "logits": logits, "idx": idx, "f_hat_out": f_hat, "caches_out": caches,
                       "x_next": x if si != NUM_SCALES - 1 else None})
            if progress:
                progress(si)
    out.f_hat = f_hat
    if decode:
        with autocast(dev, precision):
            out.images_B3HW = vae.fhat_to_img(f_hat).float()
    return out


def scale_inputs_from_idx(vae: VQVAE, idx: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The area-downsampled f_hat each scale si ≥ 1 sees, given the token ids of all scales
    (B, l, Cvae) — teacher forcing inputs."""
    B = idx[0].shape[0]
    f_hat = torch.zeros(B, CVAE, PATCH_NUMS[-1], PATCH_NUMS[-1], device=idx[0].device)
    nxt = []
    for si in range(NUM_SCALES - 1):
        f_hat = vae.fhat_update(si, f_hat, idx[si])
        nxt.append(vae.next_input(si, f_hat))
    return nxt


@torch.no_grad()
def teacher_forced(model: VAR, vae: VQVAE, label_B: torch.Tensor, idx: Sequence[torch.Tensor], cfg: float,
                   precision: str = "fp32") -> Generation:
    """Every scale's CFG logits and decisions when each scale is fed the inputs implied by `idx`."""
    dev = next(model.parameters()).device
    out = Generation(images_B3HW=None, idx=list(idx))
    with autocast(dev, precision):
        nxt = scale_inputs_from_idx(vae, idx)
        x, cond = model.first_input(label_B.to(dev))
        caches = [None] * model.depth
        for si in range(NUM_SCALES):
            if si:
                x = model.scale_input(si, nxt[si - 1])
            st = model.step(si, x, cond, caches)
            caches = model.extend_caches(caches, st.kv)
            out.logits.append(cfg_logits(st.logits_SlV, si, cfg))
            out.aux.append(st.aux)
    return out
