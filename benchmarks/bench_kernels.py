"""Benchmarks of the CUDA plugin kernels on the GPU machine (see docs/benchmarks.md).

Measures first the two ceilings of the device (large device-to-device copy, bytes read + written; bf16
8192^3 matmul through torch/cuBLAS), then:
  tokens:  top-K selection, gather, in-place scatter (and out-of-place scatter) at d16/d30 widths,
           2/32/128 sequences, scales 13x13 (L=169, K=127) and 16x16 (L=256, K=192); bf16.
           Bytes counted: gather reads K*C and writes K*C elements per sequence; in-place scatter
           (the intended use) reads K*C of upd and writes K*C into x per sequence (idx reads counted too).
  experts: routed expert FFN (routing + permutation + fc1 + GELU + fc2 + b2, N=16, K_w=12) vs the dense
           FFN (F.linear + F.gelu(tanh) + F.linear, bf16, cuBLAS) for T = S*K_t tokens.
Timing: each measured call is captured R times (rotating over R input sets so that caches do not hold
the inputs) into a CUDA graph; the graph is replayed after warm-up; the median replay time / R is reported.
The expert/dense comparison alternates the two graphs' replays (21 pairs, the order flipped every pair) and
reports the median of the per-pair time ratios with its spread, so that the GPU's clock drift under its power
limit (seconds-scale, up to ~15 % between separate measurements) falls on both sides alike.
Prints a table and writes JSON (default $OUT/bench_kernels.json).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from actvar_export import kernels, ops  # noqa: E402
from actvar_export.fsutil import write_json_atomic  # noqa: E402

WIDTHS = {"d16": 1024, "d30": 1920}
SEQS = [2, 32, 128]
SCALES = {"13x13": (169, 127), "16x16": (256, 192)}
N_EXPERTS, TOP_K = 16, 12


def capture(fns, warm=3):
    """fns: list of R zero-arg callables (one per rotated input set), run once eagerly, then captured into one
    CUDA graph, which is replayed `warm` times. Returns the graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(warm):
        g.replay()
    torch.cuda.synchronize()
    return g


def replay_s(g, calls):
    """Seconds per call of one replay of graph g holding `calls` calls."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e-3 / calls


def graph_time(fns, reps=20, warm=3):
    """Seconds per call (median of `reps` replays) and all replay times."""
    g = capture(fns, warm)
    times = [replay_s(g, len(fns)) for _ in range(reps)]
    return statistics.median(times), times


def paired_time(fns_a, fns_b, pairs=21):
    """Alternating replays of two graphs (order flipped every pair). Returns median seconds per call of each,
    and the median, min and max of the per-pair ratios time_a / time_b."""
    ga, gb = capture(fns_a), capture(fns_b)
    ta, tb = [], []
    for i in range(pairs):
        if i % 2 == 0:
            ta.append(replay_s(ga, len(fns_a)))
            tb.append(replay_s(gb, len(fns_b)))
        else:
            tb.append(replay_s(gb, len(fns_b)))
            ta.append(replay_s(ga, len(fns_a)))
    ratios = [x / y for x, y in zip(ta, tb)]
    del ga, gb
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios), min(ratios), max(ratios)


def rotations(bytes_per_set, target=400e6, lo=2, hi=16):
    return int(max(lo, min(hi, -(-target // max(bytes_per_set, 1)))))


def ceilings():
    n = 1 << 30  # 1 GiB
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t_memcpy, _ = graph_time([lambda: b.copy_(a)], reps=20)            # cudaMemcpyAsync D2D
    af, bf = a.view(torch.float32), b.view(torch.float32)
    t_kernel, _ = graph_time([lambda: torch.mul(af, 1.0, out=bf)], reps=20)  # vectorised elementwise kernel
    t = min(t_memcpy, t_kernel)
    copy_bw = 2 * n / t
    M = 8192
    x = torch.randn(M, M, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(M, M, device="cuda", dtype=torch.bfloat16)
    z = torch.empty(M, M, device="cuda", dtype=torch.bfloat16)
    t2, _ = graph_time([lambda: torch.matmul(x, y, out=z)], reps=20)
    del a, b, x, y, z
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_bw / 1e9, "copy_bytes": 2 * n, "copy_s": t,
            "memcpy_GBps": 2 * n / t_memcpy / 1e9, "elementwise_copy_GBps": 2 * n / t_kernel / 1e9,
            "bf16_matmul_TFLOPs": 2 * M ** 3 / t2 / 1e12, "bf16_matmul_s": t2}


def bench_tokens(ceil, dtype=torch.bfloat16):
    rows = []
    es = torch.finfo(dtype).bits // 8
    for wname, C in WIDTHS.items():
        for sname, (L, K) in SCALES.items():
            for S in SEQS:
                R = rotations(S * L * C * es * 2)
                xs = [torch.randn(S, L, C, device="cuda", dtype=dtype) for _ in range(R)]
                scs = [torch.randn(S, L, device="cuda") for _ in range(R)]
                idxs = [ops.select_tokens(s, K).int() for s in scs]
                sels = [torch.empty(S, K, C, device="cuda", dtype=dtype) for _ in range(R)]
                upds = [torch.randn(S, K, C, device="cuda", dtype=dtype) for _ in range(R)]
                outs = [torch.empty_like(x) for x in xs]
                buf = [torch.empty(S, K, dtype=torch.int32, device="cuda") for _ in range(R)]
                lib = kernels.load_library()

                def sel_fn(i):
                    return lambda: lib.actvarTokenSelect(kernels._ptr(scs[i]), kernels._ptr(buf[i]), S, L, K,
                                                         kernels._stream(scs[i]))

                def gat_fn(i):
                    return lambda: kernels.gather_tokens(xs[i], idxs[i], out=sels[i])

                def sca_fn(i):
                    return lambda: kernels.scatter_tokens(xs[i], idxs[i], upds[i], inplace=True)

                def sco_fn(i):
                    return lambda: kernels.scatter_tokens(xs[i], idxs[i], upds[i], out=outs[i])

                t_sel, _ = graph_time([sel_fn(i) for i in range(R)])
                t_g, _ = graph_time([gat_fn(i) for i in range(R)])
                t_s, _ = graph_time([sca_fn(i) for i in range(R)])
                t_so, _ = graph_time([sco_fn(i) for i in range(R)])
                kc = S * K * C * es
                b_g = 2 * kc + S * K * 4
                b_s = 2 * kc + S * K * 4
                b_so = 2 * S * L * C * es + 2 * kc + S * K * 4
                rows.append(dict(width=wname, C=C, scale=sname, L=L, K=K, S=S, dtype=str(dtype).split(".")[-1],
                                 select_us=t_sel * 1e6, gather_us=t_g * 1e6, scatter_inplace_us=t_s * 1e6,
                                 scatter_outofplace_us=t_so * 1e6,
                                 gather_GBps=b_g / t_g / 1e9, scatter_inplace_GBps=b_s / t_s / 1e9,
                                 scatter_outofplace_GBps=b_so / t_so / 1e9,
                                 gather_scatter_GBps=(b_g + b_s) / (t_g + t_s) / 1e9,
                                 gather_scatter_frac_of_copy=(b_g + b_s) / (t_g + t_s) / 1e9 / ceil["copy_GBps"]))
                del xs, scs, idxs, sels, upds, outs, buf
                torch.cuda.empty_cache()
    return rows


def ffn_calls(C, T, R, dtype=torch.bfloat16):
    """R rotated input sets of the FFN at width C and T tokens (random bf16/fp16 data, N_EXPERTS router logits).
    Returns (dense, expert, inputs): lists of R zero-arg callables running the dense FFN (F.linear, GELU(tanh),
    F.linear) and the plugin's expert FFN (TOP_K of N_EXPERTS, one shared workspace: calls are serial), and the
    inputs as a dict of lists (h, logits, w1, b1, w2, b2, out)."""
    Hd = 4 * C
    x = {"h": [torch.randn(T, C, device="cuda", dtype=dtype) for _ in range(R)],
         "logits": [torch.randn(T, N_EXPERTS, device="cuda") for _ in range(R)],
         "w1": [(torch.randn(Hd, C, device="cuda") / C ** 0.5).to(dtype) for _ in range(R)],
         "b1": [(torch.randn(Hd, device="cuda") * 0.1).to(dtype) for _ in range(R)],
         "w2": [(torch.randn(C, Hd, device="cuda") / Hd ** 0.5).to(dtype) for _ in range(R)],
         "b2": [(torch.randn(C, device="cuda") * 0.1).to(dtype) for _ in range(R)],
         "out": [torch.empty(T, C, device="cuda", dtype=dtype) for _ in range(R)]}
    ws = torch.empty(kernels.expert_ffn_workspace_size(T, C, Hd, N_EXPERTS, TOP_K, dtype), dtype=torch.uint8,
                     device="cuda")

    def dense(i):
        return lambda: F.linear(F.gelu(F.linear(x["h"][i], x["w1"][i], x["b1"][i]), approximate="tanh"),
                                x["w2"][i], x["b2"][i])

    def expert(i):
        return lambda: kernels.expert_ffn(x["h"][i], x["logits"][i], x["w1"][i], x["b1"][i], x["w2"][i], x["b2"][i],
                                          TOP_K, out=x["out"][i], workspace=ws)

    return [dense(i) for i in range(R)], [expert(i) for i in range(R)], x


def bench_experts(ceil, dtype=torch.bfloat16, seqs=SEQS):
    rows = []
    es = 2
    for wname, C in WIDTHS.items():
        Hd = 4 * C
        for sname, (L, Kt) in SCALES.items():
            for S in seqs:
                T = S * Kt
                per_set = (T * C * es + T * N_EXPERTS * 4 + 2 * Hd * C * es)
                R = rotations(per_set, target=300e6, lo=2, hi=8)
                dense_fns, exp_fns, inputs = ffn_calls(C, T, R, dtype)
                t_d, t_e, sp, sp_lo, sp_hi = paired_time(dense_fns, exp_fns)
                fl_dense = 16.0 * T * C * C
                fl_exp = fl_dense * TOP_K / N_EXPERTS
                rows.append(dict(width=wname, C=C, scale=sname, S=S, T=T, dtype="bfloat16", path=kernels.expert_ffn_path(T, dtype),
                                 dense_us=t_d * 1e6, expert_us=t_e * 1e6, speedup=sp, speedup_min=sp_lo,
                                 speedup_max=sp_hi,
                                 dense_TFLOPs=fl_dense / t_d / 1e12, expert_TFLOPs=fl_exp / t_e / 1e12,
                                 expert_frac_of_matmul=fl_exp / t_e / 1e12 / ceil["bf16_matmul_TFLOPs"],
                                 dense_frac_of_matmul=fl_dense / t_d / 1e12 / ceil["bf16_matmul_TFLOPs"]))
                del dense_fns, exp_fns, inputs
                torch.cuda.empty_cache()
    return rows


def profile_experts(shapes=((1024, 254), (1024, 24576), (1920, 24576)), dtype=torch.bfloat16):
    """Per-kernel time breakdown of one expert-FFN call (torch.profiler / CUPTI), for the notes."""
    from torch.profiler import ProfilerActivity, profile
    out = []
    for C, T in shapes:
        Hd = 4 * C
        h = torch.randn(T, C, device="cuda", dtype=dtype)
        lg = torch.randn(T, N_EXPERTS, device="cuda")
        w1 = (torch.randn(Hd, C, device="cuda") / C ** 0.5).to(dtype)
        b1 = torch.zeros(Hd, device="cuda", dtype=dtype).normal_()
        w2 = (torch.randn(C, Hd, device="cuda") / Hd ** 0.5).to(dtype)
        b2 = torch.zeros(C, device="cuda", dtype=dtype).normal_()
        ws = torch.empty(kernels.expert_ffn_workspace_size(T, C, Hd, N_EXPERTS, TOP_K, dtype), dtype=torch.uint8,
                         device="cuda")
        o = torch.empty(T, C, device="cuda", dtype=dtype)
        for _ in range(3):
            kernels.expert_ffn(h, lg, w1, b1, w2, b2, TOP_K, out=o, workspace=ws)
        torch.cuda.synchronize()
        reps = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                kernels.expert_ffn(h, lg, w1, b1, w2, b2, TOP_K, out=o, workspace=ws)
            torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            dt = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if dt > 0:
                rows.append((ev.key[:70], dt / reps))
        rows.sort(key=lambda r: -r[1])
        print(f"\nexpert FFN kernel breakdown C={C} T={T} (us per call)")
        for k, v in rows[:10]:
            print(f"  {v:9.1f}  {k}")
        out.append({"C": C, "T": T, "kernels_us": rows})
    return out


def _shape(text):
    """'CxT' -> (C, T) for --profile-shapes."""
    try:
        C, T = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxT (e.g. 1024x4064), got {text!r}") from None
    if C <= 0 or T <= 0:
        raise argparse.ArgumentTypeError(f"C and T must be positive, got {text!r}")
    return C, T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    ap.add_argument("--only", choices=["tokens", "experts", "none"], default=None)
    ap.add_argument("--profile", action="store_true", help="print a per-kernel breakdown of the expert FFN")
    ap.add_argument("--profile-shapes", nargs="+", metavar="CxT", type=_shape, default=None,
                    help="shapes of the --profile breakdown, e.g. 1024x4064 1920x24576 (default: 1024x254 "
                         "1024x24576 1920x24576)")
    ap.add_argument("--seqs", type=int, nargs="+", default=SEQS, help="sequence counts of the expert benchmark")
    ap.add_argument("--single", nargs=2, type=int, metavar=("C", "T"),
                    help="only run the expert FFN a few times at this shape (for ncu / compute-sanitizer)")
    args = ap.parse_args()
    if args.single:
        C, T = args.single
        dt = torch.bfloat16
        h = torch.randn(T, C, device="cuda", dtype=dt)
        lg = torch.randn(T, N_EXPERTS, device="cuda")
        w1 = (torch.randn(4 * C, C, device="cuda") / C ** 0.5).to(dt)
        w2 = (torch.randn(C, 4 * C, device="cuda") / (4 * C) ** 0.5).to(dt)
        b1, b2 = torch.zeros(4 * C, device="cuda", dtype=dt), torch.zeros(C, device="cuda", dtype=dt)
        for _ in range(3):
            kernels.expert_ffn(h, lg, w1, b1, w2, b2, TOP_K)
        torch.cuda.synchronize()
        return
    torch.manual_seed(0)
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    ceil = ceilings()
    res = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
           "ceilings": ceil}
    if args.only in (None, "tokens"):
        res["tokens"] = bench_tokens(ceil)
    if args.only in (None, "experts"):
        res["experts"] = bench_experts(ceil, seqs=args.seqs)
    if args.profile:
        res["expert_profile"] = profile_experts(args.profile_shapes) if args.profile_shapes else profile_experts()
    res["wall_s"] = time.time() - t0
    write_json_atomic(args.json, res)

    print(f"\ndevice {props.name}  copy {ceil['copy_GBps']:.0f} GB/s (read+write; memcpy "
          f"{ceil['memcpy_GBps']:.0f}, elementwise {ceil['elementwise_copy_GBps']:.0f})  "
          f"bf16 matmul 8192^3 {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    if "tokens" in res:
        print("\ntokens (bf16; GB/s counts K*C read + K*C written per sequence; in-place scatter)")
        print(f"{'width':5} {'scale':5} {'S':>4} {'select us':>9} {'gather us':>9} {'scat us':>8} {'scatOOP us':>10} "
              f"{'g GB/s':>7} {'s GB/s':>7} {'g+s %copy':>9}")
        for r in res["tokens"]:
            print(f"{r['width']:5} {r['scale']:5} {r['S']:>4} {r['select_us']:9.1f} {r['gather_us']:9.1f} "
                  f"{r['scatter_inplace_us']:8.1f} {r['scatter_outofplace_us']:10.1f} {r['gather_GBps']:7.0f} "
                  f"{r['scatter_inplace_GBps']:7.0f} {100 * r['gather_scatter_frac_of_copy']:8.1f}%")
    if "experts" in res:
        print("\nexpert FFN (bf16, N=16, K_w=12, routing included) vs dense FFN (F.linear+gelu+F.linear, cuBLAS)")
        print("speed-up: median of 21 alternating dense/expert replay pairs (min-max of the pairs)")
        print(f"{'width':5} {'scale':5} {'S':>4} {'T':>6} {'dense us':>9} {'expert us':>9} {'speedup':>7} "
              f"{'(min-max)':>11} {'dense TF/s':>10} {'exp TF/s':>9} {'exp %mm':>7} {'path':>8}")
        for r in res["experts"]:
            print(f"{r['width']:5} {r['scale']:5} {r['S']:>4} {r['T']:>6} {r['dense_us']:9.1f} {r['expert_us']:9.1f} "
                  f"{r['speedup']:7.2f} {r['speedup_min']:5.2f}-{r['speedup_max']:4.2f} {r['dense_TFLOPs']:10.0f} "
                  f"{r['expert_TFLOPs']:9.0f} {100 * r['expert_frac_of_matmul']:6.1f}% {r['path']:>8}")
    print(f"\nJSON written to {os.path.abspath(args.json)}  (wall {res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
