"""The multi-scale VQVAE of VAR (vae_ch160v4096z32): encoder, decoder, codebook and Phi.

Module names follow the official state_dict keys so that `load_state_dict(strict=True)` applies.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CVAE, PATCH_NUMS, PHI_INDEX, VOCAB

CH = 160
CH_MULT = (1, 1, 2, 2, 4)
NUM_RES_BLOCKS = 2


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=-1)  # B, HWq, HWk
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)
        return x + self.proj_out(h)


class Upsample2x(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Level(nn.Module):
    pass


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        n = len(CH_MULT)
        self.conv_in = nn.Conv2d(3, CH, 3, 1, 1)
        mult_in = (1,) + CH_MULT
        self.down = nn.ModuleList()
        for i in range(n):
            lvl, cin, cout = _Level(), CH * mult_in[i], CH * CH_MULT[i]
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(NUM_RES_BLOCKS):
                lvl.block.append(ResnetBlock(cin, cout))
                cin = cout
                if i == n - 1:
                    lvl.attn.append(AttnBlock(cin))
            if i != n - 1:
                lvl.downsample = Downsample2x(cin)
            self.down.append(lvl)
        self.mid = _Level()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, CVAE, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, lvl in enumerate(self.down):
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        n = len(CH_MULT)
        cin = CH * CH_MULT[-1]
        self.conv_in = nn.Conv2d(CVAE, cin, 3, 1, 1)
        self.mid = _Level()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)
        ups = []
        for i in reversed(range(n)):
            lvl, cout = _Level(), CH * CH_MULT[i]
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(NUM_RES_BLOCKS + 1):
                lvl.block.append(ResnetBlock(cin, cout))
                cin = cout
                if i == n - 1:
                    lvl.attn.append(AttnBlock(cin))
            if i != 0:
                lvl.upsample = Upsample2x(cin)
            ups.insert(0, lvl)
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            lvl = self.up[i]
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Phi(h) = 0.5·h + 0.5·conv3x3(h)."""

    def __init__(self):
        super().__init__(CVAE, CVAE, 3, 1, 1)

    def forward(self, h):
        return h * 0.5 + super().forward(h) * 0.5


class _QuantResi(nn.Module):
    def __init__(self):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi() for _ in range(4)])


class Quantizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, CVAE)
        self.quant_resi = _QuantResi()
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(PATCH_NUMS), VOCAB))

    def phi(self, si: int) -> Phi:
        return self.quant_resi.qresi_ls[PHI_INDEX[si]]


class VQVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = Encoder(), Decoder()
        self.quantize = Quantizer()
        self.quant_conv = nn.Conv2d(CVAE, CVAE, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(CVAE, CVAE, 3, 1, 1)

    # ---- the pieces of VAR's inference loop ----
    def fhat_update(self, si: int, f_hat_BChw: torch.Tensor, idx_Bl: torch.Tensor = None,
                    h_BlC: torch.Tensor = None) -> torch.Tensor:
        """f_hat + Phi(bicubic_up(h)) for codebook entries idx (or given embeddings h)."""
        pn, last = PATCH_NUMS[si], PATCH_NUMS[-1]
        if h_BlC is None:
            h_BlC = self.quantize.embedding(idx_Bl)
        B = h_BlC.shape[0]
        h = h_BlC.transpose(1, 2).reshape(B, CVAE, pn, pn)
        if si != len(PATCH_NUMS) - 1:
            h = F.interpolate(h, size=(last, last), mode="bicubic")
        return f_hat_BChw + self.quantize.phi(si)(h)

    @staticmethod
    def next_input(si: int, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """area-downsampled f_hat for scale si+1 as (B, pn², Cvae)."""
        pn = PATCH_NUMS[si + 1]
        B = f_hat_BChw.shape[0]
        return F.interpolate(f_hat_BChw, size=(pn, pn), mode="area").view(B, CVAE, -1).transpose(1, 2)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Image in [0, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1) * 0.5 + 0.5

    def img_to_idx(self, img_B3HW: torch.Tensor) -> List[torch.Tensor]:
        """Multi-scale token ids of an image in [-1, 1] (VAR's residual quantisation)."""
        f = self.quant_conv(self.encoder(img_B3HW))
        B, C, H, W = f.shape
        rest, f_hat, out = f.clone(), torch.zeros_like(f), []
        emb = self.quantize.embedding.weight
        for si, pn in enumerate(PATCH_NUMS):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if si != len(PATCH_NUMS) - 1 else rest
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            d = (z_NC.square().sum(1, keepdim=True) + emb.square().sum(1) - 2 * z_NC @ emb.T)
            idx = d.argmin(dim=1).view(B, pn * pn)
            out.append(idx)
            h = self.fhat_update(si, torch.zeros_like(f_hat), idx)
            f_hat, rest = f_hat + h, rest - h
        return out
