"""C++ runtime (`actvar-run`, engines/) against the Python runtime on the same bundle and GPU: sampled ids
identical for the same classes and seed, and images/second at each batch. Both sides are timed in-process over
the same number of generations after two untimed ones (CUDA graph capture), each doing the same work: classes
and seed in, uint8 images out (the noise of the seed, the generation, the conversion of the images to uint8).
Python: `noise_for`, the runtime's `generate`, `to_uint8`; C++: actvar-run's own median ms per generation
(`--iters N --warmup 2`, its last stdout line, JSON). Neither side counts process start-up or session creation.
Prints a table, writes JSON.

    python3 benchmarks/bench_cpp.py --actvar-run build/engines/actvar-run --depth 16 --precision fp16 \
        --lowering portable --batches 1,16 --json $OUT/bench_cpp.json [--custom-op-library LIB]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cuda_library_dirs() -> list:
    """Directories of the NVIDIA libraries this process has mapped (after the Python runtime ran on CUDA: the
    CUDA runtime, cuBLAS, cuDNN, ... of the nvidia wheels), for actvar-run's LD_LIBRARY_PATH: its ONNX Runtime
    CUDA provider needs the same libraries and, unlike Python (torch loads them first), finds them only there."""
    dirs = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(None, 5)[5] if len(line.split(None, 5)) == 6 else ""
        d = str(Path(path).parent)
        if "/nvidia/" in path and ".so" in Path(path).name and d not in dirs:
            dirs.append(d)
    return dirs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actvar-run", required=True)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--lowering", default="portable", choices=["portable", "plugin"])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--custom-op-library", default=None, help="plugin bundles: the ONNX Runtime custom-op library")
    ap.add_argument("--workdir", default="/tmp/cppbench")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import onnxruntime as ort
    import torch
    from actvar_export.bundle import Bundle, build_bundle
    from actvar_export.checkpoint import save_atomic
    from actvar_export.fsutil import write_json_atomic
    from actvar_export.init import init_checkpoint
    from actvar_export.runtime.custom_ops import ENV_VAR
    from actvar_export.runtime.ort_runtime import Runtime
    from actvar_export.images import to_uint8
    from actvar_export.sampling import noise_for

    if a.custom_op_library:    # the Python runtime finds the same library through its environment variable
        os.environ[ENV_VAR] = a.custom_op_library
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ck = work / f"d{a.depth}.pt"
    if not ck.exists():
        save_atomic(init_checkpoint(a.depth, seed=0), ck)
    rows, status = [], 0
    for B in [int(b) for b in a.batches.split(",")]:
        bpath = build_bundle(ck, work / f"bundle_d{a.depth}_{a.precision}_{a.lowering}_b{B}", batch=B,
                             precision=a.precision, lowering=a.lowering, force=True, show_progress=False)
        labels = [(37 * i) % 1000 for i in range(B)]
        backend = Runtime(Bundle.open(bpath), "cuda")                 # the Python runtime (CUDA graphs, bound buffers)
        lab = np.array(labels, np.int64)

        def job():                                                     # classes and seed in, uint8 images out
            images, ids = backend.generate(lab, noise_for(B, a.seed, 680).numpy(), 1.5, 0.96)
            return to_uint8(images), ids
        for _ in range(2):                                             # warm-up (graph capture), and its ids
            _, ids = job()
        times = []
        for _ in range(a.iters):
            t = time.perf_counter()
            job()
            times.append(time.perf_counter() - t)
        py_ips = B / float(np.median(times))
        py_graphs = backend.graph_report()
        del backend
        lib_path = ":".join(cuda_library_dirs() + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p])
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            cmd = [a.actvar_run, "--bundle", str(bpath), "--classes", ",".join(map(str, labels)), "--seed", str(a.seed),
                   "--cfg", "1.5", "--top-p", "0.96", "--device", "cuda", "--iters", str(a.iters), "--warmup", "2",
                   "--out", f"{tmp}/g.png", "--ids", f"{tmp}/ids.npy"]
            if a.custom_op_library:
                cmd += ["--custom-op-library", a.custom_op_library]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, LD_LIBRARY_PATH=lib_path))
            if r.returncode:
                print(r.stderr, file=sys.stderr)
                return 1
            cpp_ids = np.load(f"{tmp}/ids.npy")
        timing = json.loads(r.stdout.strip().splitlines()[-1])
        cpp_ips = B / (timing["median_ms"] / 1e3)
        same = bool(np.array_equal(cpp_ids, np.concatenate([np.asarray(i).reshape(B, -1) for i in ids], axis=1)))
        status |= not same or cpp_ips < py_ips
        rows.append({"batch": B, "ids_identical": same, "cpp_images_per_s": cpp_ips, "python_images_per_s": py_ips,
                     "python_seconds_per_batch": times, "cpp_median_ms": timing["median_ms"],
                     "cpp_cuda_graphs": timing["cuda_graphs"], "python_cuda_graphs": py_graphs})
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "unknown",
           "onnxruntime": ort.__version__, "depth": a.depth, "precision": a.precision, "lowering": a.lowering,
           "seed": a.seed, "iters": a.iters, "rows": rows}
    if a.json:
        write_json_atomic(a.json, res)
    print(f"\n{'d%d %s %s on %s' % (a.depth, a.precision, a.lowering, res['device']):<40} {'ids same':>9} {'C++ img/s':>10} {'Python img/s':>12}")
    for r in rows:
        print(f"{'batch %d' % r['batch']:<40} {str(r['ids_identical']):>9} {r['cpp_images_per_s']:>10.2f} {r['python_images_per_s']:>12.2f}")
        print(f"  C++ {r['cpp_cuda_graphs']}\n  Python {r['python_cuda_graphs']}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
