"""Random-weight checkpoints in the official layout, scaled so that the model is not vacuous.

The official initialisation sets the AdaLN gamma rows near 1e-5, so each block barely changes its
input and any two implementations agree trivially. Here every block's gamma is calibrated so that
each residual update has the norm of the block's input, logits have a spread that makes sampling
and top-k/top-p decisions matter, and the VQVAE decodes to images of full contrast.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import CVAE, NUM_SCALES, SCALE_LENS, ActVarConfig, ModelSpec, VarConfig
from .model import VAR
from .vqvae import VQVAE

RANDOM_NOTE = "RANDOM WEIGHTS (actvar-export init-ckpt): not a trained model; images are noise-like textures"
LOGIT_STD = 3.0
# each sub-update (attention, FFN) gets ~0.35 of its input's norm, so a block (both sub-updates)
# changes its input by ~0.5 of its norm: far from vacuous, yet the residual stream grows only
# ~1.12x per block (d30: ~30x in all), which keeps gammas and activations inside fp16's range
SUB_UPDATE_RATIO = 0.35


def _trunc(t: torch.Tensor, std: float, g: torch.Generator):
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=g).clamp_(-2, 2) * std)


@torch.no_grad()
def init_var(spec: ModelSpec, seed: int) -> VAR:
    g = torch.Generator().manual_seed(seed)
    m = VAR(spec)
    C = m.C
    std = math.sqrt(1 / C / 3)
    for name, p in m.named_parameters():
        if name.endswith(".bias"):
            p.zero_()
        elif "scale_mul_1H11" in name:
            p.copy_(torch.full_like(p, math.log(4.0)) + 0.3 * torch.randn(p.shape, generator=g))
        else:
            _trunc(p, std, g)
    for blk in m.blocks:
        _trunc(blk.attn.q_bias, 0.02, g)
        _trunc(blk.attn.v_bias, 0.02, g)
        ada = blk.ada_lin[1]
        _trunc(ada.weight[2 * C:], 0.5 / math.sqrt(C), g)      # scale1, scale2, shift1, shift2 vary with the class
        _trunc(ada.bias[2 * C:], 0.1, g)
        if hasattr(blk, "selector"):
            _trunc(blk.selector.weight, 1 / math.sqrt(C), g)
            _trunc(blk.ffn.router.weight, 1 / math.sqrt(C), g)
    _trunc(m.word_embed.weight, math.sqrt(1 / CVAE), g)
    # the first scale's input (class + start + level/position embeddings) gets the magnitude of the
    # later scales' word embeddings (std ~0.3-0.7 for this VQVAE init), so one gamma suits every scale
    _trunc(m.class_emb.weight, 0.3, g)
    _trunc(m.pos_start, 0.15, g)
    _trunc(m.pos_1LC, 0.1, g)
    _trunc(m.lvl_embed.weight, 0.1, g)
    _calibrate(m, g)
    return m


@torch.no_grad()
def _calibrate(m: VAR, g: torch.Generator):
    """Set each block's gamma so ‖update‖ ≈ SUB_UPDATE_RATIO·‖input‖, and the head so logits have std LOGIT_STD,
    measured on a sequence like the last scale's (dense path, no cache)."""
    C, S = m.C, 4
    label = torch.randint(0, m.num_classes, (S // 2,), generator=g)
    x, cond = m.first_input(label)
    lat = 0.5 * torch.randn(S // 2, SCALE_LENS[-1], CVAE, generator=g)
    x = m.scale_input(NUM_SCALES - 1, lat) + x[:, :1]
    for blk in m.blocks:
        ada = blk.ada_lin[1]
        _g1, _g2, s1, s2, b1, b2 = blk.ada(cond)
        a, _ = blk.attn(blk.ln(x) * (1 + s1) + b1, None)
        g1 = SUB_UPDATE_RATIO * (x.norm() / a.norm()).item()
        ada.bias[:C].fill_(g1)
        _trunc(ada.weight[:C], 0.1 * g1 / math.sqrt(C), g)
        x = x + a * blk.ada(cond)[0]
        f = blk.ffn(blk.ln(x) * (1 + s2) + b2)
        g2 = SUB_UPDATE_RATIO * (x.norm() / f.norm()).item()
        ada.bias[C:2 * C].fill_(g2)
        _trunc(ada.weight[C:2 * C], 0.1 * g2 / math.sqrt(C), g)
        x = x + f * blk.ada(cond)[1]
    logits = m.head(m.head_nm(x, cond))
    m.head.weight.mul_(LOGIT_STD / logits.std().item())


@torch.no_grad()
def init_vae(seed: int, decode_check: bool = True) -> VQVAE:
    g = torch.Generator().manual_seed(seed + 1)
    v = VQVAE()
    for name, p in v.named_parameters():
        if "norm" in name:
            p.fill_(1.0) if name.endswith("weight") else p.zero_()
        elif name.endswith(".bias"):
            _trunc(p, 0.01, g)
        elif p.dim() == 4:
            fan_in = p.shape[1] * p.shape[2] * p.shape[3]
            _trunc(p, 1.0 / math.sqrt(fan_in), g)
    _trunc(v.quantize.embedding.weight, 0.5, g)
    for phi in v.quantize.quant_resi.qresi_ls:
        _trunc(phi.weight, 0.5 / math.sqrt(CVAE * 9), g)
    if decode_check:
        # scale the output conv so a random latent decodes to values of std ~0.6 (before clamping)
        f = torch.randn(1, CVAE, 16, 16, generator=g)
        out = v.decoder(v.post_quant_conv(f))
        v.decoder.conv_out.weight.mul_(0.6 / out.std().item())
    return v


def init_checkpoint(depth: int, dense: bool = False, experts: int = 16, seed: int = 0,
                    actvar: Optional[ActVarConfig] = None) -> dict:
    act = None if dense else (actvar or ActVarConfig(num_experts=experts))
    spec = ModelSpec(var=VarConfig(depth=depth), actvar=act)
    ck = {"model": init_var(spec, seed).state_dict(), "vae": init_vae(seed).state_dict(), "info": RANDOM_NOTE}
    if act is not None:
        ck["actvar"] = act.to_dict()
    return ck
