"""The PyTorch reference: VAR (design §1) with optional ActVAR dynamic activation (design §2).

Parameter names follow the official state_dict keys. The model is written as per-scale steps
(`step`) so that the generation loop, teacher-forced validation and the ONNX export all run the
very same code. Tensor names carry their shapes: B images, S = 2B sequences (CFG), l tokens of
the current scale, Lc cached tokens, H heads, c head dim, C width, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import (NUM_SCALES, SCALE_BEGIN, SCALE_LENS, TOTAL_TOKENS, ActVarConfig, ModelSpec)

KV = Tuple[torch.Tensor, torch.Tensor]  # (k_SHLc, v_SHLc)
MAX_SCALE_MUL = torch.log(torch.tensor(100.0)).item()


class SelfAttention(nn.Module):
    def __init__(self, C: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, C // heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C)

    def qkv(self, x_SlC: torch.Tensor):
        S, l, C = x_SlC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_SlC, self.mat_qkv.weight, bias).view(S, l, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # S H l c
        scale = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), v

    def forward(self, x_SlC: torch.Tensor, cache: Optional[KV]):
        """Attention of the l new tokens over cache + themselves; returns (out_SlC, (k, v) of new tokens)."""
        q, k, v = self.qkv(x_SlC)
        k_all = k if cache is None else torch.cat((cache[0].to(k.dtype), k), dim=2)
        v_all = v if cache is None else torch.cat((cache[1].to(v.dtype), v), dim=2)
        o = F.scaled_dot_product_attention(q, k_all, v_all, scale=1.0)
        S, H, l, c = o.shape
        return self.proj(o.transpose(1, 2).reshape(S, l, H * c)), (k, v)


class FFN(nn.Module):
    def __init__(self, C: int, num_experts: Optional[int]):
        super().__init__()
        self.fc1 = nn.Linear(C, 4 * C)
        self.fc2 = nn.Linear(4 * C, C)
        self.num_experts = num_experts
        if num_experts is not None:
            self.router = nn.Linear(C, num_experts)

    def forward(self, h_TC: torch.Tensor):
        return self.fc2(F.gelu(self.fc1(h_TC), approximate="tanh"))

    def experts(self, h_TC: torch.Tensor, router_TN: torch.Tensor, k_w: int,
                experts_TE: Optional[torch.Tensor] = None):
        """Routed expert FFN on router logits `router_TN` (or the given experts_TE); returns (out_TC, experts_TE)."""
        if experts_TE is None:
            experts_TE = ops.route_experts(router_TN, k_w)
        out = ops.expert_ffn(h_TC, experts_TE, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                             self.fc2.bias, self.num_experts)
        return out, experts_TE


@dataclass
class BlockAux:
    """Discrete decisions of one ActVAR block at one scale (None where dense)."""
    idx_SK: Optional[torch.Tensor] = None
    experts_SKE: Optional[torch.Tensor] = None
    scores_SL: Optional[torch.Tensor] = None
    router_SKN: Optional[torch.Tensor] = None


class Block(nn.Module):
    def __init__(self, C: int, heads: int, num_experts: Optional[int]):
        super().__init__()
        self.C = C
        self.attn = SelfAttention(C, heads)
        self.ffn = FFN(C, num_experts)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        if num_experts is not None:
            self.selector = nn.Linear(C, 1)

    def ada(self, cond_SC: torch.Tensor):
        """gamma1, gamma2, scale1, scale2, shift1, shift2, each (S, 1, C)."""
        return self.ada_lin(cond_SC).view(-1, 1, 6, self.C).unbind(2)

    @staticmethod
    def ln(x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)

    def forward(self, x_SlC, cond_SC, cache: Optional[KV], k_t: Optional[int] = None,
                k_w: Optional[int] = None, force: Optional[BlockAux] = None):
        """One block at one scale. k_t/k_w None: dense VAR block. Returns (x, new (k, v), aux).
        `force` injects decisions (its idx_SK / experts_SKE, where set) in place of the block's own;
        the scores are still the block's (validation measures margins on them)."""
        g1, g2, s1, s2, b1, b2 = self.ada(cond_SC)
        aux = BlockAux()
        if k_t is None:
            xs = x_SlC
        else:
            aux.scores_SL = self.selector(x_SlC).squeeze(-1).float()
            aux.idx_SK = (force.idx_SK if force is not None and force.idx_SK is not None
                          else ops.select_tokens(aux.scores_SL, k_t))
            xs = ops.gather_tokens(x_SlC, aux.idx_SK)
        a, kv = self.attn(self.ln(xs) * (1 + s1) + b1, cache)
        xs = xs + a * g1
        h = self.ln(xs) * (1 + s2) + b2
        if k_w is None:
            f = self.ffn(h)
        else:
            S, K, C = h.shape
            aux.router_SKN = self.ffn.router(h).float()
            forced = None if force is None or force.experts_SKE is None else force.experts_SKE.reshape(S * K, -1)
            f, experts = self.ffn.experts(h.reshape(S * K, C), aux.router_SKN.reshape(S * K, -1), k_w, forced)
            f, aux.experts_SKE = f.view(S, K, C), experts.view(S, K, -1)
        xs = xs + f * g2
        x_out = xs if k_t is None else ops.scatter_tokens(x_SlC, aux.idx_SK, xs)
        return x_out, kv, aux


class HeadNorm(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.C = C
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_SlC, cond_SC):
        scale, shift = self.ada_lin(cond_SC).view(-1, 1, 2, self.C).unbind(2)
        return F.layer_norm(x_SlC, x_SlC.shape[-1:], eps=1e-6) * (1 + scale) + shift


@dataclass
class StepOut:
    logits_SlV: torch.Tensor                 # raw logits of both CFG halves (float32)
    kv: List[KV]                             # per block: keys/values this scale appends
    aux: List[BlockAux] = field(default_factory=list)


class VAR(nn.Module):
    """VAR-dNN; with `spec.actvar` set, the ActVAR variant (selector + router in every block)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        v, C = spec.var, spec.var.width
        self.C, self.V, self.depth = C, v.vocab, v.depth
        self.num_classes = v.num_classes
        n_exp = spec.actvar.num_experts if spec.actvar else None
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, TOTAL_TOKENS, C))
        lvl = torch.cat([torch.full((n,), i) for i, n in enumerate(SCALE_LENS)]).view(1, TOTAL_TOKENS, 1)
        self.register_buffer("lvl_1L", lvl[:, :, 0].contiguous())
        mask = torch.where(lvl >= lvl.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, TOTAL_TOKENS, TOTAL_TOKENS)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())
        self.word_embed = nn.Linear(v.cvae, C)
        self.class_emb = nn.Embedding(v.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(NUM_SCALES, C)
        self.blocks = nn.ModuleList([Block(C, v.heads, n_exp) for _ in range(v.depth)])
        self.head_nm = HeadNorm(C)
        self.head = nn.Linear(C, v.vocab)

    # ---- the static sizes at a scale ----
    def sizes(self, si: int):
        """(k_t, k_w) for scale si: None, None where the dense block runs."""
        act: Optional[ActVarConfig] = self.spec.actvar
        if act is None or not act.is_active(si):
            return None, None
        return act.k_t(si), act.k_w

    # ---- inputs ----
    def lvl_pos(self, si: int) -> torch.Tensor:
        a, n = SCALE_BEGIN[si], SCALE_LENS[si]
        return self.lvl_embed(self.lvl_1L[:, a:a + n]) + self.pos_1LC[:, a:a + n]

    def first_input(self, label_B: torch.Tensor):
        """(x_S1C, cond_SC) for the first scale; the second half carries the null class."""
        label_S = torch.cat((label_B, torch.full_like(label_B, self.num_classes)))
        cond = self.class_emb(label_S)
        x = cond.unsqueeze(1) + self.pos_start + self.lvl_pos(0)
        return x, cond

    def scale_input(self, si: int, next_BlCv: torch.Tensor) -> torch.Tensor:
        """Input tokens of scale si (≥1) from the area-downsampled f_hat, duplicated for CFG."""
        x = self.word_embed(next_BlCv) + self.lvl_pos(si)
        return x.repeat(2, 1, 1)

    # ---- one scale ----
    def step(self, si: int, x_SlC: torch.Tensor, cond_SC: torch.Tensor,
             caches: List[Optional[KV]], force: Optional[List[BlockAux]] = None) -> StepOut:
        k_t, k_w = self.sizes(si)
        out = StepOut(logits_SlV=None, kv=[])
        x = x_SlC
        for b, blk in enumerate(self.blocks):
            x, kv, aux = blk(x, cond_SC, caches[b], k_t, k_w, None if force is None else force[b])
            out.kv.append(kv)
            out.aux.append(aux)
        out.logits_SlV = self.head(self.head_nm(x.float(), cond_SC).float()).float()
        return out

    @staticmethod
    def extend_caches(caches: List[Optional[KV]], kv: List[KV]) -> List[KV]:
        return [new if old is None else (torch.cat((old[0], new[0]), 2), torch.cat((old[1], new[1]), 2))
                for old, new in zip(caches, kv)]


def cfg_logits(logits_SlV: torch.Tensor, si: int, cfg: float) -> torch.Tensor:
    """(1+t)·cond − t·uncond with t = cfg·si/9."""
    B = logits_SlV.shape[0] // 2
    t = cfg * si / (NUM_SCALES - 1)
    return (1 + t) * logits_SlV[:B] - t * logits_SlV[B:]
