"""The validation rules (docs/validation.md): tolerances derived from the precision, the
per-element margins of discrete decisions, and Polygraphy compare functions for both kinds of output."""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch
from polygraphy.comparator import SimpleCompareFunc

from .. import ops
from ..sampling import filter_top_k_top_p, sample_noise
from ..vqvae import CH, CH_MULT, NUM_RES_BLOCKS

UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
# safety factors over the derived error scale eps·sqrt(stages)·magnitude (calibration: docs/validation.md)
ALPHA_MEAN, ALPHA_MAX = 1.25, 16.0
# explained flips allowed per scale and output, as a share of its decisions (at least 2)
FLIP_CAP = {"fp32": 0.002, "fp16": 0.05, "bf16": 0.1}
ID_FLIP_CAP = {"fp32": 0.01, "fp16": 0.25, "bf16": 0.4}
CONTINUOUS = ("logits", "kv_out", "f_hat_out", "x_next")
DISCRETE = ("sel_idx", "experts", "idx")


@dataclass(frozen=True)
class Tolerances:
    precision: str
    width: int
    depth: int

    @property
    def eps(self) -> float:
        """Relative error of one matmul stage: storage rounding of the graph precision plus fp32
        accumulation over a width-long dot product."""
        return UNIT_ROUNDOFF[self.precision] + UNIT_ROUNDOFF["fp32"] * math.sqrt(self.width)

    def stages(self, name: str, block: int = 0) -> int:
        """Matmul stages behind an output: 4 per block (qkv, proj, fc1, fc2) plus its own."""
        D = self.depth
        return {"logits": 4 * D + 1, "kv_out": 4 * D, "f_hat_out": 1, "x_next": 1,
                "sel_idx": 4 * block + 1, "experts": 4 * block + 3}[name]

    def scale(self, name: str, block: int = 0) -> float:
        return self.eps * math.sqrt(self.stages(name, block))

    def continuous(self, ref: Dict[str, np.ndarray], cached: int = 0):
        """Per-output absolute tolerances for CompareFunc.simple: (mean stat, max stat). The first `cached`
        positions of kv_out are the input cache passed through (checked exactly elsewhere): magnitudes come
        from the appended entries, and the mean over the whole tensor is diluted by their share."""
        mean, mx = {}, {}
        for n in CONTINUOUS:
            if n in ref:
                r = np.abs(ref[n].astype(np.float64))
                share = 1.0
                if n == "kv_out" and cached:
                    share = 1.0 - cached / r.shape[4]
                    r = r[:, :, :, :, cached:]
                mean[n] = ALPHA_MEAN * self.scale(n) * float(r.mean()) * share
                mx[n] = ALPHA_MAX * self.scale(n) * float(np.sqrt((r ** 2).mean()))
        return mean, mx

    def to_dict(self):
        return {"precision": self.precision, "eps": self.eps, "alpha_mean": ALPHA_MEAN, "alpha_max": ALPHA_MAX,
                "flip_cap": FLIP_CAP[self.precision], "id_flip_cap": ID_FLIP_CAP[self.precision],
                "end_to_end": END_TO_END[self.precision]}


@dataclass(frozen=True)
class DecoderTolerances:
    """The decoder graph (f_hat -> image) against the reference VQVAE's fp32 decode of the same f_hat, derived
    like the step outputs': eps of the decoder's precision (manifest `decoder_precision`) with fp32 accumulation
    over the longest reduction, times sqrt(stages), times the reference image's magnitude."""
    precision: str

    @property
    def reduction(self) -> int:
        """The longest dot product: a 3x3 convolution over the widest level's channels (160·4·9 = 5760)."""
        return CH * CH_MULT[-1] * 9

    @property
    def eps(self) -> float:
        return UNIT_ROUNDOFF[self.precision] + UNIT_ROUNDOFF["fp32"] * math.sqrt(self.reduction)

    @property
    def stages(self) -> int:
        """Conv/MatMul stages on the longest path from f_hat to the image, each one rounding to the decoder's
        precision: post_quant_conv and conv_in (2); the middle ResnetBlock, attention, ResnetBlock (2 + 4 + 2);
        per level, NUM_RES_BLOCKS + 1 ResnetBlocks of two 3x3 convs each (the 1x1 shortcut runs beside them, one
        stage, so it is not the longest path), at the lowest resolution an attention block after each (qkv,
        q·k, w·v, proj_out: 4), and an upsampling conv on every level but the last; conv_out (1). Every branch
        adds into the residual stream, so each stage's rounding reaches the image: 57 for vae_ch160v4096z32."""
        blocks = NUM_RES_BLOCKS + 1
        levels = sum(2 * blocks + (4 * blocks if i == len(CH_MULT) - 1 else 0) + (1 if i else 0)
                     for i in range(len(CH_MULT)))
        return 2 + (2 + 4 + 2) + levels + 1

    def limits(self, ref: np.ndarray):
        """(mean tolerance, max tolerance) of the absolute error against the reference image `ref`."""
        r, s = np.abs(ref.astype(np.float64)), self.eps * math.sqrt(self.stages)
        return ALPHA_MEAN * s * float(r.mean()), ALPHA_MAX * s * float(np.sqrt((r ** 2).mean()))


# end to end (same u, no teacher forcing): fp32 must reproduce the reference; fp16/bf16 must not diverge
# more than the reference itself does under torch autocast at that precision (agreement >= half of it,
# PSNR >= its PSNR - 6 dB), since explained flips legitimately cascade through later scales.
END_TO_END = {"fp32": {"token_agreement": 0.99, "psnr_db": 40.0},
              "fp16": {"relative_agreement": 0.5, "psnr_slack_db": 6.0},
              "bf16": {"relative_agreement": 0.5, "psnr_slack_db": 6.0}}


def continuous_funcs(tol: Tolerances, ref: Dict[str, np.ndarray], cached: int = 0):
    """Two Polygraphy simple compare functions (CompareFunc.simple, now SimpleCompareFunc): mean and max
    absolute error per output."""
    mean, mx = tol.continuous(ref, cached)
    zeros = {n: 0.0 for n in mean}
    return (SimpleCompareFunc(atol=mean, rtol=zeros, check_error_stat="mean"),
            SimpleCompareFunc(atol=mx, rtol=zeros, check_error_stat="max"))


def element_margins(scores: np.ndarray, k: int) -> np.ndarray:
    """Per element: distance of its score to the cut on its own side (chosen: score - (k+1)-th
    largest; not chosen: k-th largest - score). inf when every element is chosen."""
    if k >= scores.shape[-1]:
        return np.full(scores.shape, np.inf)
    s = -np.sort(-scores, axis=-1)
    kth, nxt = s[..., k - 1:k], s[..., k:k + 1]
    return np.where(scores >= kth, scores - nxt, kth - scores)


@dataclass
class Finding:
    output: str
    differing: int = 0
    explained: int = 0
    max_margin: float = 0.0
    failures: List[str] = field(default_factory=list)


def check_selection(si: int, name: str, got: np.ndarray, scores: np.ndarray, tol: Tolerances, k: int) -> Finding:
    """Tokens (sel_idx (D,S,K), scores (D,S,L)) or experts (experts (D,S,K,E), router (D,S,K,N)): the
    backend's chosen sets against the reference's own top-k of its scores (upstream decisions injected)."""
    f = Finding(name)
    cap = max(2, int(FLIP_CAP[tol.precision] * got.size))
    for b in range(got.shape[0]):
        sc = scores[b].astype(np.float64)
        own = ops.topk_ascending(torch.from_numpy(sc), k).numpy()
        chosen_got = np.zeros(sc.shape, bool)
        np.put_along_axis(chosen_got, got[b], True, axis=-1)
        chosen_ref = np.zeros(sc.shape, bool)
        np.put_along_axis(chosen_ref, own, True, axis=-1)
        diff = chosen_got != chosen_ref
        n = int(diff.sum())
        if not n:
            continue
        rms = np.sqrt((sc ** 2).mean(axis=-1, keepdims=True))
        allowed = ALPHA_MAX * tol.scale(name, b) * rms
        m = element_margins(sc, k)
        ratio = np.where(diff, m / allowed, 0.0)
        f.differing += n
        f.max_margin = max(f.max_margin, float(ratio.max()))
        bad = diff & (m > allowed)
        if bad.any():
            f.failures.append(f"scale {si} {name}: block {b}, {int(bad.sum())} of {n} differing choices have a "
                              f"reference margin above tolerance (worst {ratio.max():.1f}x)")
        f.explained += int((diff & ~bad).sum())
    if f.explained > cap:
        f.failures.append(f"scale {si} {name}: {f.explained} explained flips exceed the cap {cap} for {tol.precision}")
    return f


def cdf_edges(logits: torch.Tensor, top_k: int, top_p: float):
    """Normalised CDF (vocabulary order) of the noise sampler: (lo, hi) per id, fp64."""
    kept = torch.isfinite(filter_top_k_top_p(logits.double(), top_k, top_p))
    w = torch.where(kept, (logits.double() - logits.double().amax(-1, keepdim=True)).exp(), 0.0)
    hi = w.cumsum(-1) / w.sum(-1, keepdim=True)
    return hi - w / w.sum(-1, keepdim=True), hi


def near_top_p_mass(ref_logits: np.ndarray, top_k: int, top_p: float, delta: np.ndarray) -> np.ndarray:
    """Per row, the mass (normalised over the ids the reference keeps) of the ids whose top-p membership a logit
    change of at most delta can flip. The sampler removes an id while the tail mass T of it and every smaller
    survivor is <= 1 - top_p. delta moves T by at most T(1-T)(e^(2 delta)-1) with the order fixed, and ids whose
    logits lie within 2 delta of the id's may change sides of it, moving T by at most their mass."""
    if top_p <= 0 or not ref_logits.size:
        return np.zeros(delta.shape)
    asc = filter_top_k_top_p(torch.from_numpy(ref_logits.astype(np.float64)), top_k, 0.0).sort(dim=-1, stable=True)[0].numpy()
    p = torch.softmax(torch.from_numpy(asc), -1).numpy()
    T = np.cumsum(p, -1)
    kept = T > 1 - top_p
    kept[..., -1] = True
    rows, d = asc.reshape(-1, asc.shape[-1]), delta.reshape(-1)
    cum = np.concatenate([np.zeros((rows.shape[0], 1)), T.reshape(rows.shape)], -1)
    swap = np.stack([cum[r, np.searchsorted(rows[r], rows[r] + 2 * d[r], "right")] - cum[r, np.searchsorted(rows[r], rows[r] - 2 * d[r])]
                     for r in range(rows.shape[0])]).reshape(asc.shape) - p          # mass within 2 delta, the id excluded
    near = np.abs(T - (1 - top_p)) <= T * (1 - T) * np.expm1(2 * delta[..., None]) + swap
    return (p * near).sum(-1) / (p * kept).sum(-1)


def check_ids(si: int, got_idx: np.ndarray, got_logits: np.ndarray, ref_logits: np.ndarray, u: np.ndarray,
              top_k: int, top_p: float, tol: Tolerances) -> List[Finding]:
    """Sampled ids. (a) The backend's ids are its own sampler applied to its own logits: a difference is
    explained only within fp32 summation rounding of an edge. (b) Against the reference: a differing id is
    explained only if u lies within the mass the measured logit difference of that row can move an edge
    (|dc| <= c(1-c)(e^(2d)-1) for |d logit| <= d), plus the mass of ids within d of the top-k cut and of the
    ids whose top-p membership d can flip."""
    out = []
    g = torch.from_numpy(got_logits.astype(np.float32))
    own = sample_noise(g, torch.from_numpy(u), top_k, top_p).numpy()
    fa = Finding("idx (sampler on the graph's own logits)")
    d = got_idx != own
    if d.any():
        lo, hi = cdf_edges(g, top_k, top_p)
        pick = torch.from_numpy(got_idx).unsqueeze(-1)
        lo_g, hi_g = lo.gather(-1, pick)[..., 0].numpy(), hi.gather(-1, pick)[..., 0].numpy()
        dist = np.maximum(np.maximum(lo_g - u, u - hi_g), 0.0)
        allowed = 64 * UNIT_ROUNDOFF["fp32"] * math.sqrt(got_logits.shape[-1])
        fa.differing = int(d.sum())
        bad = d & (dist > allowed)
        fa.max_margin = float((dist[d] / allowed).max())
        if bad.any():
            fa.failures.append(f"scale {si} idx: {int(bad.sum())} of {d.size} sampled ids are not the sampler's on the "
                               f"graph's own logits (u up to {dist[bad].max():.2e} of mass from the id's interval)")
        fa.explained = int((d & ~bad).sum())
    out.append(fa)
    r = torch.from_numpy(ref_logits.astype(np.float64))
    ref_ids = sample_noise(r.float(), torch.from_numpy(u), top_k, top_p).numpy()
    fb = Finding("idx")
    d = got_idx != ref_ids
    if d.any():
        lo, hi = cdf_edges(r, top_k, top_p)
        pick = torch.from_numpy(got_idx).unsqueeze(-1)
        lo_g, hi_g = lo.gather(-1, pick)[..., 0].numpy(), hi.gather(-1, pick)[..., 0].numpy()
        dist = np.maximum(np.maximum(lo_g - u, u - hi_g), 0.0)
        delta = np.abs(got_logits.astype(np.float64) - ref_logits).max(-1)
        c = np.clip(np.where(u < lo_g, lo_g, hi_g), 0, 1)
        p = torch.softmax(r, -1).numpy()
        kth = -np.sort(-ref_logits, -1)[..., top_k - 1:top_k] if top_k else np.full(delta.shape + (1,), -np.inf)
        near = np.abs(ref_logits - kth) <= delta[..., None]
        allowed = c * (1 - c) * np.expm1(2 * delta) + (p * near).sum(-1) / np.maximum((p * (ref_logits >= kth)).sum(-1), 1e-30)
        allowed[d] += near_top_p_mass(ref_logits[d], top_k, top_p, delta[d])     # (rows that differ only)
        fb.differing = int(d.sum())
        bad = d & (dist > allowed)
        fb.max_margin = float((dist[d] / np.maximum(allowed[d], 1e-30)).max())
        if bad.any():
            fb.failures.append(f"scale {si} idx: {int(bad.sum())} of {d.size} sampled ids differ from the reference "
                               f"with u farther from the id's interval than the logit difference explains")
        fb.explained = int((d & ~bad).sum())
        cap = max(2, int(ID_FLIP_CAP[tol.precision] * d.size))
        if fb.explained > cap:
            fb.failures.append(f"scale {si} idx: {fb.explained} explained flips exceed the cap {cap} for {tol.precision}")
    out.append(fb)
    return out


class DecisionCompareFunc:
    """Polygraphy compare function (reference IterationResult, backend IterationResult) -> {output: passed}
    for the discrete outputs; `scores` are the reference runner's (upstream decisions injected)."""

    def __init__(self, si: int, reference_runner, feed: dict, tol: Tolerances, top_k: int, k_t, k_w):
        self.si, self.ref, self.feed, self.tol, self.top_k, self.k_t, self.k_w = si, reference_runner, feed, tol, top_k, k_t, k_w
        self.findings: List[Finding] = []

    def __call__(self, ref_result, got_result):
        res, sc, si = OrderedDict(), self.ref.scores, self.si
        if "sel_idx" in got_result:
            self.findings.append(check_selection(si, "sel_idx", got_result["sel_idx"], sc["sel_idx"], self.tol, self.k_t))
            self.findings.append(check_selection(si, "experts", got_result["experts"], sc["experts"], self.tol, self.k_w))
        self.findings += check_ids(si, got_result["idx"], got_result["logits"], sc["logits"], self.feed["u"],
                                   self.top_k, float(self.feed["top_p"][0]), self.tol)
        for f in self.findings:
            res[f.output] = not f.failures
        return res
