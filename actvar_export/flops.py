"""Analytic FLOPs per image (one multiply-add = 2 FLOPs), dense VAR vs ActVAR, per scale.

Counted: every matrix product of the transformer for both CFG halves (qkv, attention scores and
values over the KV cache, proj, FFN or routed experts, AdaLN linears, selector and router, head),
and the VQVAE decoder (+ post_quant_conv) once per image. Not counted: normalisation, softmax,
activations, sampling, Phi and the interpolations (all O(L·C), well under 0.1%).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .config import NUM_SCALES, PATCH_NUMS, SCALE_LENS, ActVarConfig, VarConfig, cache_len_after

PAPER_SAVING = {16: 20.2, 20: 21.2, 24: 21.8, 30: 22.3}


def block_flops(C: int, l: int, kv_len: int, k_w: Optional[int] = None, n_exp: Optional[int] = None,
                selector_on: int = 0) -> float:
    """One block, one sequence: l query tokens attending over kv_len keys."""
    f = 2 * l * C * 3 * C                 # qkv
    f += 2 * l * kv_len * C * 2           # q·kᵀ and attn·v over all heads
    f += 2 * l * C * C                    # proj
    hidden = 4 * C if k_w is None else 4 * C * k_w // n_exp
    f += 2 * l * C * hidden * 2           # fc1 + fc2 (only chosen experts' slices)
    f += 2 * C * 6 * C                    # ada_lin (once per sequence)
    if k_w is not None:
        f += 2 * l * C * n_exp            # router on selected tokens
        f += 2 * selector_on * C          # selector on all tokens of the scale
    return f


def transformer_flops(var: VarConfig, act: Optional[ActVarConfig]) -> List[float]:
    """Per scale, per image with CFG (two sequences)."""
    C, out = var.width, []
    for si in range(NUM_SCALES):
        n = SCALE_LENS[si]
        if act is not None and act.is_active(si):
            l, kw, ne = act.k_t(si), act.k_w, act.num_experts
        else:
            l, kw, ne = n, None, None
        kv = cache_len_after(act, si)
        f = var.depth * block_flops(C, l, kv, kw, ne, selector_on=n if kw else 0)
        f += 2 * C * 2 * C + 2 * n * C * var.vocab  # head ada_lin + head
        out.append(2 * f)
    return out


_DECODER_FLOPS = None


def decoder_flops() -> float:
    """post_quant_conv + decoder on one 16×16×32 latent, counted from the module's conv/linear/bmm shapes."""
    global _DECODER_FLOPS
    if _DECODER_FLOPS is None:
        from .vqvae import VQVAE
        with torch.device("meta"):
            v = VQVAE()
        total = [0.0]

        def conv_hook(mod, inp, out):
            k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
            total[0] += 2 * out.numel() * k

        hooks = [m.register_forward_hook(conv_hook) for m in list(v.decoder.modules()) + [v.post_quant_conv]
                 if isinstance(m, nn.Conv2d)]
        orig_bmm = torch.bmm

        def bmm(a, b):
            total[0] += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
            return orig_bmm(a, b)
        torch.bmm = bmm
        try:
            v.decoder(v.post_quant_conv(torch.empty(1, 32, 16, 16, device="meta")))
        finally:
            torch.bmm = orig_bmm
            for h in hooks:
                h.remove()
        _DECODER_FLOPS = total[0]
    return _DECODER_FLOPS


def report(var: VarConfig, act: Optional[ActVarConfig]) -> Dict:
    dense = transformer_flops(var, None)
    sparse = transformer_flops(var, act) if act is not None else dense
    saving = 100.0 * (1 - sum(sparse) / sum(dense))
    return {
        "per_scale": [{"scale": si, "pn": PATCH_NUMS[si], "dense_gflop": d / 1e9, "actvar_gflop": s / 1e9}
                      for si, (d, s) in enumerate(zip(dense, sparse))],
        "dense_tflop": sum(dense) / 1e12,
        "actvar_tflop": sum(sparse) / 1e12,
        "vae_decoder_tflop": decoder_flops() / 1e12,
        "saving_percent": saving,
        "paper_saving_percent": PAPER_SAVING.get(var.depth),
    }
