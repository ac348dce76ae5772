"""What the expert FFN could reach if its GEMMs ran at cuBLAS speed (GPU machine; see plugins/NOTES.md).

For each shape (d16/d30 widths, T = S * K_t tokens, N = 16 experts, K_w = 12, bf16) this times with
torch/cuBLAS only, each as a CUDA graph over rotated input sets (same timer as bench_kernels.py):
  dense        F.linear + F.gelu(tanh) + F.linear                (the baseline of bench_kernels.py)
  dense_fused  fc1 with the GELU fused into the cuBLASLt epilogue + fc2 (all FLOPs, no sparsity)
  ours_bound   the formulation the plugin implements, data movement left out: fc1 as 16 per-expert GEMMs
               (GELU fused) over token rows that are already contiguous per expert (0.75 of fc1's FLOPs),
               fc2 dense over a [T, 4C] buffer (all of fc2's FLOPs)
  exact_bound  the 1.33x-ideal formulation, reduction left out: fc1 and fc2 both as 16 per-expert GEMMs
               (0.75 of all FLOPs), the 12 partial outputs per token neither written back nor summed
Speed-ups are dense / x. A bound below the target says the target is out of reach for that formulation
even with cuBLAS's GEMMs. Prints a table and writes JSON (--json).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import N_EXPERTS, SCALES, TOP_K, WIDTHS, graph_time, rotations  # noqa: E402

from actvar_export.fsutil import write_json_atomic  # noqa: E402


def bounds(C, T, dtype=torch.bfloat16):
    Hd, d = 4 * C, 4 * C // N_EXPERTS
    Te = T * TOP_K // N_EXPERTS      # tokens per expert (balanced routing)
    R = rotations(T * C * 2 + 2 * Hd * C * 2, target=300e6, lo=2, hi=8)
    x = [torch.randn(T, C, device="cuda", dtype=dtype) for _ in range(R)]
    xe = [torch.randn(N_EXPERTS, Te, C, device="cuda", dtype=dtype) for _ in range(R)]   # pre-gathered rows
    w1 = [(torch.randn(Hd, C, device="cuda") / C ** 0.5).to(dtype) for _ in range(R)]
    b1 = [(torch.randn(Hd, device="cuda") * 0.1).to(dtype) for _ in range(R)]
    w2 = [(torch.randn(C, Hd, device="cuda") / Hd ** 0.5).to(dtype) for _ in range(R)]
    b2 = [(torch.randn(C, device="cuda") * 0.1).to(dtype) for _ in range(R)]
    h = [torch.empty(T, Hd, device="cuda", dtype=dtype) for _ in range(R)]
    he = [torch.empty(N_EXPERTS, Te, d, device="cuda", dtype=dtype) for _ in range(R)]
    oe = [torch.empty(N_EXPERTS, Te, C, device="cuda", dtype=dtype) for _ in range(R)]

    def dense(i):
        return lambda: F.linear(F.gelu(F.linear(x[i], w1[i], b1[i]), approximate="tanh"), w2[i], b2[i])

    def dense_fused(i):
        return lambda: F.linear(torch._addmm_activation(b1[i], x[i], w1[i].t(), use_gelu=True), w2[i], b2[i])

    def fc1_experts(i):
        for e in range(N_EXPERTS):
            sl = slice(e * d, (e + 1) * d)
            torch._addmm_activation(b1[i][sl], xe[i][e], w1[i][sl].t(), use_gelu=True, out=he[i][e])

    def ours(i):
        def f():
            fc1_experts(i)
            torch.addmm(b2[i], h[i], w2[i].t())
        return f

    def exact(i):
        def f():
            fc1_experts(i)
            for e in range(N_EXPERTS):
                torch.mm(he[i][e], w2[i][:, e * d:(e + 1) * d].t(), out=oe[i][e])
        return f

    row = {"C": C, "T": T}
    for name, fn in (("dense", dense), ("dense_fused", dense_fused), ("ours_bound", ours), ("exact_bound", exact)):
        t, _ = graph_time([fn(i) for i in range(R)])
        row[name + "_us"] = t * 1e6
    for name in ("dense_fused", "ours_bound", "exact_bound"):
        row[name + "_speedup"] = row["dense_us"] / row[name + "_us"]
    del x, xe, w1, b1, w2, b2, h, he, oe
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2, 32, 128], help="sequence counts (default 2 32 128)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_ffn_bounds.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ffn_bounds: no CUDA device", file=sys.stderr)
        return 2
    rows = []
    for wname, C in WIDTHS.items():
        for sname, (_, Kt) in SCALES.items():
            for S in args.seqs:
                r = bounds(C, S * Kt)
                r.update(width=wname, scale=sname, S=S)
                rows.append(r)
    print(f"{'width':5} {'scale':5} {'S':>3} {'T':>6} | {'dense':>8} {'fused':>8} {'ours_b':>8} {'exact_b':>8} µs"
          f" | speed-up fused / ours_bound / exact_bound")
    for r in rows:
        print(f"{r['width']:5} {r['scale']:5} {r['S']:3d} {r['T']:6d} | {r['dense_us']:8.1f} {r['dense_fused_us']:8.1f} "
              f"{r['ours_bound_us']:8.1f} {r['exact_bound_us']:8.1f} | {r['dense_fused_speedup']:.2f} / "
              f"{r['ours_bound_speedup']:.2f} / {r['exact_bound_speedup']:.2f}")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    write_json_atomic(args.json, res)
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
