"""ONNX Runtime bundle on the GPU: export a random-weight ActVAR, validate it against the PyTorch
reference running on the same GPU, and measure images/second. Prints a table and writes JSON.

    python3 benchmarks/bench_ort.py --depth 16 --batch 16 --precision fp16 --json $OUT/bench_ort.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--lowering", default="portable", choices=["portable", "plugin"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/ortbench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--providers", default="CUDAExecutionProvider,CPUExecutionProvider")
    a = ap.parse_args()

    from actvar_export.bundle import Bundle, build_bundle
    from actvar_export.fsutil import write_json_atomic
    from actvar_export.checkpoint import build_models, load_checkpoint, save_atomic
    from actvar_export.config import TOTAL_TOKENS
    from actvar_export.generate import SampleSettings, generate
    from actvar_export.init import init_checkpoint
    from actvar_export.runtime.loop import run_bundle_device
    from actvar_export.runtime.ort_backend import OrtBackend
    from actvar_export.sampling import noise_for
    from actvar_export.validate import validate_bundle
    import onnxruntime as ort

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ck = work / f"d{a.depth}.pt"
    t0 = time.time()
    if not ck.exists():
        save_atomic(init_checkpoint(a.depth, seed=0), ck)
    t_init = time.time() - t0
    t0 = time.time()
    bpath = build_bundle(ck, work / f"bundle_d{a.depth}_{a.precision}_{a.lowering}_b{a.batch}", batch=a.batch,
                         precision=a.precision, lowering=a.lowering, force=True, show_progress=False)
    t_build = time.time() - t0
    bundle = Bundle.open(bpath)
    providers = a.providers.split(",")
    if a.precision == "fp32":   # true fp32 on the GPU: no TF32 in ONNX Runtime's CUDA matmuls/convolutions
        providers = [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in providers]
    backend = OrtBackend(bundle, providers)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False    # the reference stays true fp32 (no TF32)
    torch.backends.cudnn.allow_tf32 = False
    model, vae = build_models(load_checkpoint(ck), dev)
    labels = [(37 * i) % 1000 for i in range(a.batch)]
    settings = SampleSettings(sampler="noise", cfg=1.5, top_k=900, top_p=0.96)
    t0 = time.time()
    rep = validate_bundle(backend, model, vae, labels, seed=0, settings=settings, precision=a.precision)
    t_val = time.time() - t0
    print(rep.table())
    print("failures:", rep.failures or "none")

    lab = np.array(labels, np.int64)
    u = noise_for(a.batch, 1, TOTAL_TOKENS).numpy()
    run_bundle_device(backend, lab, u, 1.5, 0.96)               # warm-up (session init, cuDNN search)
    times = []
    for i in range(a.iters):
        t = time.perf_counter()
        img, _ = run_bundle_device(backend, lab, u, 1.5, 0.96)
        times.append(time.perf_counter() - t)
    ort_ips = a.batch / float(np.median(times))

    # the PyTorch reference on the same GPU, autocast at the same precision, for context
    lab_t, u_t = torch.tensor(labels, device=dev), torch.from_numpy(u).to(dev)
    generate(model, vae, lab_t, settings, u_BL=u_t, precision=a.precision)
    rt = []
    for i in range(a.iters):
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        generate(model, vae, lab_t, settings, u_BL=u_t, precision=a.precision)
        sync()
        rt.append(time.perf_counter() - t)
    ref_ips = a.batch / float(np.median(rt))

    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "onnxruntime": ort.__version__, "torch": torch.__version__,
           "providers": backend.provider_names, "depth": a.depth, "batch": a.batch, "precision": a.precision,
           "lowering": a.lowering, "bundle_bytes": sum(f["bytes"] for f in bundle.manifest["files"].values()),
           "init_s": t_init, "build_s": t_build, "validate_s": t_val,
           "ort_seconds_per_batch": times, "ort_images_per_s": ort_ips,
           "torch_reference_seconds_per_batch": rt, "torch_reference_images_per_s": ref_ips,
           "validation": rep.to_dict()}
    if a.json:
        write_json_atomic(a.json, res)
        print("JSON:", a.json)
    print(f"\n{'what':<44} {'value':>12}")
    print(f"{'device':<44} {res['device']:>12}")
    print(f"{'d%d %s %s batch %d bundle (MB)' % (a.depth, a.precision, a.lowering, a.batch):<44} {res['bundle_bytes'] / 1e6:>12.1f}")
    print(f"{'ORT %s images/s (median of %d)' % (backend.provider_names[0].replace('ExecutionProvider', ''), a.iters):<44} {ort_ips:>12.2f}")
    print(f"{'PyTorch reference %s autocast images/s' % a.precision:<44} {ref_ips:>12.2f}")
    print(f"{'token agreement end to end (%)':<44} {100 * rep.token_agreement:>12.3f}")
    print(f"{'image PSNR vs fp32 reference (dB)':<44} {rep.psnr_db:>12.1f}")
    return 1 if (rep.failures and a.precision == "fp32") else 0   # low precision: errors are recorded


if __name__ == "__main__":
    sys.exit(main())
