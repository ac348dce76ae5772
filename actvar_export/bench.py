"""`bench`: the bundle runtime's latency, images/s, time per scale and peak memory, and with a checkpoint
the eager PyTorch reference (autocast at the bundle's precision) on the same device in the same run."""
from __future__ import annotations

import gc
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .config import NUM_SCALES, PATCH_NUMS, TOTAL_TOKENS
from .errors import ActVarError


class _Clock:
    """Marks on the device stream (CUDA events) or the host clock (CPU, where ONNX Runtime runs synchronously)."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda, self.marks = torch, cuda, []

    def mark(self, *_):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def scales_ms(self) -> List[float]:
        """Milliseconds of each scale (mark 0 is the start)."""
        m = self.marks
        if self.cuda:
            self.torch.cuda.synchronize()
            return [m[i].elapsed_time(m[i + 1]) for i in range(NUM_SCALES)]
        return [1e3 * (m[i + 1] - m[i]) for i in range(NUM_SCALES)]


def _device_used(torch) -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def _timed(torch, cuda: bool, run: Callable[[Callable], None], iters: int, tick: Callable[[], None]):
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    lat, scales = [], []
    for _ in range(iters):
        clock = _Clock(torch, cuda)
        sync()
        t = time.perf_counter()
        clock.mark()
        run(clock.mark)
        sync()
        lat.append(time.perf_counter() - t)
        scales.append(clock.scales_ms())
        tick()
    return lat, [float(np.median([s[i] for s in scales])) for i in range(NUM_SCALES)]


def _summary(lat: List[float], per_scale: List[float], batch: int) -> dict:
    med = float(np.median(lat))
    return {"seconds_per_batch": lat, "median_seconds_per_batch": med, "ms_per_image": 1e3 * med / batch,
            "images_per_s": batch / med, "ms_per_scale": per_scale}


def bench_bundle(bundle_dir, ckpt: Optional[Path] = None, iters: int = 10, warmup: int = 2, device: Optional[str] = None,
                 cuda_graphs: bool = True, seed: int = 0, cfg: float = 1.5, top_p: float = 0.96,
                 progress: bool = True, log: Callable[[str], None] = print, profile: Optional[Path] = None,
                 check_ids: bool = False) -> dict:
    """Run the bundle `iters` times after `warmup` runs (and the eager reference likewise, when `ckpt` is given).
    The eager reference runs first, so that its peak (torch.cuda.max_memory_allocated) and the runtime's
    (device memory in use after its runs, minus before: ONNX Runtime's arena never shrinks) are measured
    from an empty device."""
    import torch
    from tqdm import tqdm
    from . import __version__
    from .bundle import Bundle
    from .runtime.loop import run_bundle
    from .runtime.ort_runtime import Runtime, default_device
    from .sampling import noise_for

    if iters < 1 or warmup < 0:
        raise ActVarError(f"--iters must be >= 1 (got {iters})")
    b = Bundle.open(bundle_dir, verify=False)
    if ckpt is not None:
        b.check_checkpoint(ckpt)
    device = device or default_device()
    cuda = device == "cuda"
    m = b.manifest
    B = b.batch
    labels = np.array([(37 * i) % 1000 for i in range(B)], np.int64)
    u = noise_for(B, seed, TOTAL_TOKENS).numpy()
    res = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "driver": _driver(), "versions": _versions(torch, __version__),
           "bundle": {"path": str(b.path), "depth": m["model"]["depth"], "batch": B, "precision": m["precision"],
                      "lowering": m["lowering"], "target": m.get("target"), "attention": m.get("attention"),
                      "actvar": m["actvar"] is not None, "weights_bytes": m["files"]["weights.bin"]["bytes"]},
           "iters": iters, "warmup": warmup, "cfg": cfg, "top_p": top_p, "seed": seed, "scales": list(PATCH_NUMS)}
    bar = tqdm(total=(iters + warmup) * (2 if ckpt else 1), desc="bench", unit="run", disable=not progress)
    if ckpt is not None:
        res["eager"] = _bench_eager(torch, b, ckpt, labels, u, cfg, top_p, iters, warmup, device, bar.update)
    if cuda:
        torch.cuda.empty_cache()
        base = _device_used(torch)
    rt = Runtime(b, device, cuda_graphs=cuda_graphs, log=log)
    for _ in range(warmup):
        rt.generate(labels, u, cfg, top_p)
        bar.update()
    ids = None

    def run(mark):
        nonlocal ids
        _, ids = rt.generate(labels, u, cfg, top_p, progress=mark)
    lat, scales = _timed(torch, cuda, run, iters, bar.update)
    bar.close()
    res["runtime"] = _summary(lat, scales, B)
    res["runtime"]["cuda_graphs"] = rt.graph_report()
    if rt.cuda_options:
        res["runtime"]["cuda_options"] = rt.cuda_options
    if cuda:
        res["runtime"]["peak_device_bytes"] = _device_used(torch) - base
        res["runtime"]["torch_buffers_bytes"] = torch.cuda.max_memory_allocated()
    if check_ids:   # the same generation without CUDA graphs or bound buffers (host inputs, one graph at a time)
        _, plain, _, _ = run_bundle(rt, labels, u, cfg, top_p, decode=False)
        res["ids_equal_without_graphs"] = all(bool((a == p).all()) for a, p in zip(ids, plain))
    if "eager" in res:
        e, r = res["eager"], res["runtime"]
        res["speedup"] = r["images_per_s"] / e["images_per_s"]
        if cuda:
            res["memory_ratio"] = r["peak_device_bytes"] / e["peak_bytes"]
    del rt
    gc.collect()
    if profile:
        res["profile"] = _profile(torch, b, device, Path(profile), labels, u, cfg, top_p)
    return res


def _profile(torch, b, device, out: Path, labels, u, cfg, top_p, top: int = 20) -> List[dict]:
    """Where one generation (without CUDA graphs, after one warm-up) spends its time: on CUDA the device
    kernels by name (CUPTI through torch.profiler sees ONNX Runtime's kernels too), on the CPU ONNX
    Runtime's profiler by operator type."""
    from .runtime.ort_runtime import Runtime, profile_summary
    out.mkdir(parents=True, exist_ok=True)
    if device != "cuda":
        rt = Runtime(b, device, profile=out)
        rt.generate(labels, u, cfg, top_p)
        return profile_summary(rt.end_profiling(), top)
    rt = Runtime(b, device, cuda_graphs=False)
    rt.generate(labels, u, cfg, top_p)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        rt.generate(labels, u, cfg, top_p)
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(out / "trace.json"))
    rows = [{"op": e.key[:90], "ms": round(e.device_time_total / 1e3, 3), "calls": e.count}
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def _bench_eager(torch, b, ckpt, labels, u, cfg, top_p, iters, warmup, device, tick) -> dict:
    from .checkpoint import build_models, load_checkpoint
    from .generate import SampleSettings, generate
    m = b.manifest
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    act = m["actvar"]
    ov = act and {"token_ratio": act["token_ratio"], "expert_ratio": act["expert_ratio"],
                  "active_scales": tuple(act["active_scales"])}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = _device_used(torch)
    model, vae = build_models(load_checkpoint(ckpt, None, ov or None), dev)
    # the eager code a deployment replaces: every op on the GPU (the reference's exact-order cumulative sum runs on
    # the host, a device-host round trip per scale that would slow the baseline)
    settings = SampleSettings(sampler="noise", cfg=cfg, top_k=m["top_k"], top_p=top_p, device_cdf=True)
    lab_t, u_t = torch.from_numpy(labels).to(dev), torch.from_numpy(u).to(dev)
    run = lambda mark: generate(model, vae, lab_t, settings, u_BL=u_t, precision=m["precision"], progress=mark)
    for _ in range(warmup):
        run(lambda si: None)
        tick()
    lat, scales = _timed(torch, cuda, run, iters, tick)
    out = _summary(lat, scales, b.batch)
    out["autocast"] = m["precision"]
    out["sampler_cdf"] = "torch.cumsum on the device"
    if cuda:   # the eager reference's measure, and (comparable with the runtime's) device memory in use after the runs
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["device_bytes"] = _device_used(torch) - base
    del model, vae, lab_t, u_t
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def _versions(torch, ours: str) -> Dict[str, str]:
    import onnxruntime as ort
    v = {"actvar_export": ours, "onnxruntime": ort.__version__, "torch": torch.__version__,
         "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


def _driver() -> Optional[str]:
    p = Path("/proc/driver/nvidia/version")
    if p.exists():
        words = p.read_text().split()
        return next((w for w in words if w[:1].isdigit() and "." in w), None)
    return None


def table(res: dict) -> str:
    """The human-readable summary of a bench result."""
    bd = res["bundle"]
    lines = [f"{res['device']} | d{bd['depth']} {bd['precision']} {bd['lowering']} batch {bd['batch']} | "
             f"attention {bd['attention']} | ONNX Runtime {res['versions']['onnxruntime']}, torch {res['versions']['torch']}",
             res["runtime"]["cuda_graphs"]]
    cols = [("runtime", res["runtime"])] + ([("eager", res["eager"])] if "eager" in res else [])
    lines.append(f"{'':<22}" + "".join(f"{n:>12}" for n, _ in cols) + (f"{'ratio':>10}" if len(cols) == 2 else ""))

    def row(label, key, fmt, scale=1.0, better_low=False):
        vals = [c[key] * scale if key in c else None for _, c in cols]
        s = f"{label:<22}" + "".join(f"{fmt.format(v):>12}" if v is not None else f"{'-':>12}" for v in vals)
        if len(vals) == 2 and None not in vals and vals[0] and vals[1]:
            s += f"{(vals[1] / vals[0] if better_low else vals[0] / vals[1]):>9.2f}x"
        return s
    lines.append(row("latency / batch (ms)", "median_seconds_per_batch", "{:.2f}", 1e3, better_low=True))
    lines.append(row("ms / image", "ms_per_image", "{:.2f}", better_low=True))
    lines.append(row("images / s", "images_per_s", "{:.2f}"))
    r, e = res["runtime"], res.get("eager", {})
    if "peak_device_bytes" in r:
        peak = f"{'peak memory (GB)':<22}{r['peak_device_bytes'] / 1e9:>12.2f}"
        if "peak_bytes" in e:
            peak += f"{e['peak_bytes'] / 1e9:>12.2f}{r['peak_device_bytes'] / e['peak_bytes']:>9.2f}x"
        lines.append(peak)
    for si, pn in enumerate(res["scales"]):
        s = f"{'scale %d (%dx%d) ms' % (si, pn, pn):<22}{r['ms_per_scale'][si]:>12.2f}"
        if e:
            s += f"{e['ms_per_scale'][si]:>12.2f}"
        lines.append(s)
    if "ids_equal_without_graphs" in res:
        lines.append(f"ids with CUDA graphs and bound buffers == without: {res['ids_equal_without_graphs']}")
    for p in res.get("profile", []):
        lines.append(f"  {p['ms']:>9.2f} ms {p['calls']:>6}x  {p['op'][:70]}")
    return "\n".join(lines)
