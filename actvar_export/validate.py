"""Validation of a bundle against the PyTorch reference (design §4).

Teacher forcing: every scale's graph is fed the reference's own inputs for that scale, so one flipped
decision cannot cascade across scales. Discrete outputs (selected tokens, experts, sampled ids) may
differ only where the reference's own margin is below the tolerance; a scale whose selection or
routing flipped is reported as diverged-but-explained and its continuous outputs are not compared.
All failures are collected before one error is raised. End to end, the same uniforms u drive the
reference and the bundle, and token agreement and image PSNR are reported; once one sampled id
differs the two runs follow different samples, so that first differing scale must be explained by
the reference's own sampler margin there (u within rounding of a CDF boundary).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from .config import PATCH_NUMS, SCALE_BEGIN, SCALE_LENS, TOTAL_TOKENS
from .errors import ActVarError
from .generate import SampleSettings, generate
from .model import VAR
from .sampling import filter_top_k_top_p
from .vqvae import VQVAE

# per precision: max-abs tolerance of continuous outputs (fp32) or relative-norm tolerance (fp16/bf16),
# and the decision margin below which a flipped discrete choice counts as explained.
# fp32: outputs of size ~10 carry rounding of ~1e-6 after a few thousand-term dot products -> 1e-4.
# fp16: 11-bit mantissa, ~5e-4 per rounding, compounded over blocks -> 1e-2 relative.
# bf16: 8-bit mantissa, ~4e-3 per rounding -> 5e-2 relative.
TOLERANCES = {
    "fp32": {"mode": "abs", "continuous": 1e-4, "margin": 1e-4},
    "fp16": {"mode": "rel", "continuous": 1e-2, "margin": 5e-2},
    "bf16": {"mode": "rel", "continuous": 5e-2, "margin": 2e-1},
}
CONTINUOUS = ("logits", "f_hat_out", "kv_out", "x_next")


class ValidationError(ActVarError):
    pass


def _pack_kv(caches) -> torch.Tensor:
    return torch.stack([torch.stack(kv) for kv in caches])          # (D, 2, S, H, L, 64)


def _gap_at(sorted_desc: torch.Tensor, k: int) -> torch.Tensor:  # noqa: D401
    """Score gap between the k-th and (k+1)-th largest (inf when all are chosen)."""
    if k >= sorted_desc.shape[-1]:
        return torch.full(sorted_desc.shape[:-1], math.inf)
    return sorted_desc[..., k - 1] - sorted_desc[..., k]


def reference_steps(model: VAR, vae: VQVAE, labels: torch.Tensor, u: torch.Tensor, s: SampleSettings,
                    decode: bool = True):
    """One reference generation (the `generate` loop itself, traced): every scale's inputs, outputs and
    decision margins in the graphs' I/O names, and the Generation with its decoded images."""
    np_ = lambda t: t.detach().cpu().numpy()
    steps = []

    def record(t: dict):
        si, a, l = t["si"], SCALE_BEGIN[t["si"]], SCALE_LENS[t["si"]]
        lc, idx, st = t["logits"], t["idx"], t["step"]
        u_l = u[:, a:a + l].to(lc.device)
        ins = {"labels": np_(labels), "u": np_(u_l), "cfg": np.array([s.cfg], np.float32),
               "top_p": np.array([s.top_p], np.float32)}
        if si:
            ins.update({"x_in": np_(t["x_in"]), "kv_in": np_(_pack_kv(t["caches_in"])), "f_hat_in": np_(t["f_hat_in"])})
        # sampler margin: distance of u to the chosen id's CDF interval ends, and to the top-k cut
        cdf = filter_top_k_top_p(lc, s.top_k, s.top_p).softmax(-1).cumsum(-1)
        target = u_l * cdf[..., -1]
        hi = cdf.gather(-1, idx.unsqueeze(-1))[..., 0]
        lo = torch.where(idx > 0, cdf.gather(-1, (idx - 1).clamp_min(0).unsqueeze(-1))[..., 0], torch.zeros_like(hi))
        m_cdf = torch.minimum(hi - target, target - lo)
        m_k = (_gap_at(lc.sort(-1, descending=True).values.cpu(), s.top_k).to(hi.device) if s.top_k
               else torch.full_like(hi, math.inf))
        outs = {"idx": np_(idx), "logits": np_(lc), "f_hat_out": np_(t["f_hat_out"]), "kv_out": np_(_pack_kv(t["caches_out"]))}
        margins = {"idx": np_(torch.minimum(m_cdf, m_k))}
        if t["x_next"] is not None:
            outs["x_next"] = np_(t["x_next"])
        k_t, k_w = model.sizes(si)
        if k_t is not None:
            outs["sel_idx"] = np_(torch.stack([ax.idx_SK for ax in st.aux]))
            outs["experts"] = np_(torch.stack([ax.experts_SKE for ax in st.aux]))
            margins["sel_idx"] = np_(torch.stack([_gap_at(ax.scores_SL.sort(-1, descending=True).values.cpu(), k_t)
                                                  for ax in st.aux]))
            margins["experts"] = np_(torch.stack([_gap_at(ax.router_SKN.sort(-1, descending=True).values.cpu(), k_w)
                                                  for ax in st.aux]))
        steps.append({"inputs": ins, "outputs": outs, "margins": margins})

    gen = generate(model, vae, labels, s, u_BL=u, decode=decode, trace=record)
    return steps, gen


@dataclass
class ScaleResult:
    scale: int
    errors: Dict[str, float] = field(default_factory=dict)          # continuous: max abs (fp32) or rel
    agreement: Dict[str, float] = field(default_factory=dict)        # discrete: fraction identical
    explained: Dict[str, int] = field(default_factory=dict)          # discrete mismatches within margin
    diverged: Optional[str] = None
    failures: List[str] = field(default_factory=list)


@dataclass
class Report:
    precision: str
    tolerances: dict
    scales: List[ScaleResult]
    token_agreement: Optional[float] = None
    per_scale_token_agreement: Optional[List[float]] = None
    psnr_db: Optional[float] = None
    divergence: Optional[str] = None                            # end to end: where the ids first differ
    end_to_end_failures: List[str] = field(default_factory=list)
    images: Optional[dict] = field(default=None, repr=False)   # {"reference", "bundle"} arrays, not serialised

    @property
    def failures(self) -> List[str]:
        return [msg for s in self.scales for msg in s.failures] + self.end_to_end_failures

    def to_dict(self):
        d = asdict(self)
        d.pop("images", None)
        return d | {"failures": self.failures}

    def table(self) -> str:
        mode = "max abs" if self.tolerances["mode"] == "abs" else "rel"
        lines = [f"{'scale':>5} {'pn':>3} {'logits':>9} {'f_hat':>9} {'kv':>9} {'x_next':>9} {'ids':>7} {'tokens':>7} {'experts':>7}  ({mode} error; agreement)"]
        for s in self.scales:
            e, a = s.errors, s.agreement
            fmt = lambda k: f"{e[k]:9.2e}" if k in e else f"{'-':>9}"
            pct = lambda k: f"{100 * a[k]:6.2f}%" if k in a else f"{'-':>7}"
            note = f"  {s.diverged}" if s.diverged else ""
            lines.append(f"{s.scale:>5} {PATCH_NUMS[s.scale]:>3} {fmt('logits')} {fmt('f_hat_out')} {fmt('kv_out')} "
                         f"{fmt('x_next')} {pct('idx')} {pct('sel_idx')} {pct('experts')}{note}")
        if self.token_agreement is not None:
            lines.append(f"end to end: token agreement {100 * self.token_agreement:.3f}%, image PSNR {self.psnr_db:.1f} dB")
        if self.divergence:
            lines.append(f"end to end: {self.divergence}")
        return "\n".join(lines)


def _error(got: np.ndarray, ref: np.ndarray, mode: str) -> float:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    if not np.all(np.isfinite(got)):
        return math.inf
    if mode == "abs":
        return float(np.abs(got - ref).max())
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def compare_scale(si: int, got: Dict[str, np.ndarray], step: dict, tol: dict) -> ScaleResult:
    r = ScaleResult(scale=si)
    ref, margins = step["outputs"], step["margins"]
    skip_continuous = set()
    for name in ("sel_idx", "experts"):
        if name not in ref:
            continue
        g, e = got[name], ref[name]
        if g.shape != e.shape:
            r.failures.append(f"scale {si} {name}: shape {g.shape} != reference {e.shape}")
            continue
        eq = (g == e).all(axis=-1)                        # per (block, row): the whole chosen set
        r.agreement[name] = float(eq.mean())
        if r.diverged:
            continue
        for b in range(eq.shape[0]):                      # blocks in order: the first flip decides
            bad = ~eq[b]
            if not bad.any():
                continue
            m = margins[name][b][bad]
            if np.all(m < tol["margin"]):
                r.explained[name] = int(bad.sum())
                r.diverged = f"{name} differ at block {b} where the reference margin is {m.max():.1e} < {tol['margin']:.0e}"
                skip_continuous.update(CONTINUOUS)
            else:
                r.failures.append(f"scale {si} {name}: block {b}, {int(bad.sum())} rows differ with reference margin up to {m.max():.2e} >= {tol['margin']:.0e}")
            break
    gi, ei = got["idx"], ref["idx"]
    eq = gi == ei
    r.agreement["idx"] = float(eq.mean())
    if not eq.all() and not r.diverged:
        m = margins["idx"][~eq]
        if np.all(m < tol["margin"]):
            r.explained["idx"] = int((~eq).sum())
            skip_continuous.update({"f_hat_out", "x_next"})
        else:
            r.failures.append(f"scale {si} sampled ids: {int((~eq).sum())} differ with reference margin up to {m.max():.2e}")
    for name in CONTINUOUS:
        if name not in ref or name in skip_continuous:
            continue
        if got[name].shape != ref[name].shape:
            r.failures.append(f"scale {si} {name}: shape {got[name].shape} != reference {ref[name].shape}")
            continue
        r.errors[name] = _error(got[name], ref[name], tol["mode"])
        if not r.errors[name] <= tol["continuous"]:
            r.failures.append(f"scale {si} {name}: error {r.errors[name]:.2e} > {tol['continuous']:.0e}")
    return r


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def first_divergence(ids: List[np.ndarray], steps: List[dict], tol: dict):
    """End to end: (None, None) when every sampled id matches the reference; else (message, ok) for the
    first scale that differs, ok when every differing id there has a reference margin below tolerance."""
    for si, got in enumerate(ids):
        eq = got == steps[si]["outputs"]["idx"]
        if eq.all():
            continue
        m = steps[si]["margins"]["idx"][~eq]
        ok = bool(np.all(m < tol["margin"]))
        msg = (f"sampled ids first differ at scale {si} ({int((~eq).sum())} tokens) where the reference margin "
               f"is up to {m.max():.1e} {'<' if ok else '>='} {tol['margin']:.0e}; later scales follow different samples")
        return msg, ok
    return None, None


def validate_bundle(backend, model: VAR, vae: VQVAE, labels: List[int], seed: int, settings: SampleSettings,
                    precision: str, end_to_end: bool = True, progress=None) -> Report:
    from .runtime.loop import run_bundle
    from .sampling import noise_for
    B = backend.bundle.batch
    if len(labels) != B:
        raise ActVarError(f"the bundle was built for batch {B}; got {len(labels)} classes")
    lab = torch.tensor(labels)
    u = noise_for(B, seed, TOTAL_TOKENS)
    tol = TOLERANCES[precision]
    steps, ref = reference_steps(model, vae, lab, u, settings, decode=end_to_end)
    results = []
    for si, step in enumerate(steps):
        got = backend.infer(f"step_{si}", step["inputs"])
        results.append(compare_scale(si, got, step, tol))
        if progress:
            progress(si)
    rep = Report(precision=precision, tolerances=tol, scales=results)
    if end_to_end:
        images, ids, _, _ = run_bundle(backend, lab.numpy(), u.numpy(), settings.cfg, settings.top_p)
        per = [float((a == r.cpu().numpy()).mean()) for a, r in zip(ids, ref.idx)]
        rep.per_scale_token_agreement = per
        rep.token_agreement = float(sum(p * n for p, n in zip(per, SCALE_LENS)) / TOTAL_TOKENS)
        rep.divergence, ok = first_divergence(ids, steps, tol)
        if ok is False:
            rep.end_to_end_failures.append(f"end to end: {rep.divergence}")
        rep.psnr_db = psnr(images, ref.images_B3HW.cpu().numpy())
        rep.images = {"reference": ref.images_B3HW.cpu().numpy(), "bundle": images}
    return rep
