"""Reference semantics of ActVAR's two dynamic ops (design file §2), in plain PyTorch.

These functions are the single source of truth that the reference model, the ONNX lowerings,
the ONNX Runtime custom ops and the CUDA kernels are all tested against.

Shapes: S sequences (2B with CFG), L tokens, C channels, K selected tokens,
T routed tokens (flattened), N experts, E selected experts per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the lower index;
    result sorted in ascending index order (int64)."""
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"top-k size {k} outside [1, {n}]")
    # a stable descending sort keeps equal scores in index order, so ties favour lower indices
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :k], dim=-1).values


def select_tokens(scores_SL: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sequence token selection: idx_SK, ascending positions."""
    return topk_ascending(scores_SL, k)


def gather_tokens(x_SLC: torch.Tensor, idx_SK: torch.Tensor) -> torch.Tensor:
    return torch.gather(x_SLC, 1, idx_SK.long().unsqueeze(-1).expand(-1, -1, x_SLC.shape[-1]))


def scatter_tokens(x_SLC: torch.Tensor, idx_SK: torch.Tensor, upd_SKC: torch.Tensor) -> torch.Tensor:
    """Reconstruction: a copy of x with rows idx replaced by upd (unselected rows unchanged)."""
    idx = idx_SK.long().unsqueeze(-1).expand(-1, -1, x_SLC.shape[-1])
    return x_SLC.scatter(1, idx, upd_SKC.to(x_SLC.dtype))


def route_experts(logits_TN: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token expert choice: experts_TE, ascending expert ids, ties to the lower id."""
    return topk_ascending(logits_TN, k)


def expert_mask(experts_TE: torch.Tensor, num_experts: int) -> torch.Tensor:
    """One-hot membership mask_TN (float 0/1) of the chosen experts."""
    mask = torch.zeros(experts_TE.shape[0], num_experts, dtype=torch.float32, device=experts_TE.device)
    return mask.scatter_(1, experts_TE.long(), 1.0)


def expert_ffn(h_TC: torch.Tensor, experts_TE: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor,
               fc2_w: torch.Tensor, fc2_b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Σ_{e∈E(t)} GELU_tanh(h W1_eᵀ + b1_e) W2_eᵀ + b2, expert e owning hidden units
    [e·d_e, (e+1)·d_e) of the dense FFN (rows of fc1, columns of fc2); b2 added once.

    Computed as the dense hidden activation times a per-unit 0/1 mask: exactly the sum over
    the chosen experts, since unchosen units contribute zero."""
    hidden = fc1_w.shape[0]
    if hidden % num_experts:
        raise ValueError(f"hidden size {hidden} not divisible by {num_experts} experts")
    d_e = hidden // num_experts
    a_TH = F.gelu(F.linear(h_TC, fc1_w, fc1_b), approximate="tanh")
    mask_TH = expert_mask(experts_TE, num_experts).repeat_interleave(d_e, dim=1).to(a_TH.dtype)
    return F.linear(a_TH * mask_TH, fc2_w, fc2_b)


def expert_ffn_loop(h_TC, experts_TE, fc1_w, fc1_b, fc2_w, fc2_b, num_experts):
    """The same function as expert_ffn, written as an explicit loop over experts and their tokens
    (an independent formulation used to cross-check expert_ffn and the kernels)."""
    d_e = fc1_w.shape[0] // num_experts
    out = fc2_b.to(h_TC.dtype).expand(h_TC.shape[0], -1).clone()
    for e in range(num_experts):
        rows = (experts_TE == e).any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        sl = slice(e * d_e, (e + 1) * d_e)
        a = F.gelu(h_TC[rows] @ fc1_w[sl].T + fc1_b[sl], approximate="tanh")
        out[rows] += a @ fc2_w[:, sl].T
    return out
