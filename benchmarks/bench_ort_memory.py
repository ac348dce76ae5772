"""Memory of a bundle's ONNX Runtime sessions: one shared copy of the weights vs one per session.

Creates every session of a bundle (10 steps + decoder) in a fresh process, once through the Runtime
(weights handed to all sessions from one memory map with add_initializer) and once the default way
(each session loads its own external data), and reports the growth of the resident set.

    python3 benchmarks/bench_ort_memory.py --bundle DIR [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


CHILD = r"""
import sys, json, resource
import numpy as np, onnxruntime as ort
from actvar_export.bundle import Bundle
from actvar_export.runtime.ort_runtime import Runtime

def rss():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS'):
                return int(line.split()[1]) * 1024

b = Bundle.open(sys.argv[1], verify=False)
names = [f"step_{i}" for i in range(10)] + ["decoder"]
before = rss()
if sys.argv[2] == "shared":
    be = Runtime(b, "cpu")
    sessions = [be.session(n) for n in names]
else:
    so = ort.SessionOptions()
    sessions = [ort.InferenceSession(str(b.graph_path(n)), so, providers=["CPUExecutionProvider"]) for n in names]
after = rss()
print(json.dumps({"mode": sys.argv[2], "rss_growth_bytes": after - before, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    m = json.load(open(f"{a.bundle}/manifest.json"))
    res = {"bundle": a.bundle, "weights_bytes": m["files"]["weights.bin"]["bytes"], "depth": m["model"]["depth"],
           "precision": m["precision"], "batch": m["batch"]}
    for mode in ("shared", "per-session"):
        out = subprocess.run([sys.executable, "-c", CHILD, a.bundle, mode], capture_output=True, text=True, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    if a.json:
        from actvar_export.fsutil import write_json_atomic
        write_json_atomic(a.json, res)
    w = res["weights_bytes"]
    print(f"{'sessions (10 steps + decoder)':<32} {'RSS growth MB':>14} {'x weights.bin':>14}")
    for mode in ("shared", "per-session"):
        g = res[mode]["rss_growth_bytes"]
        print(f"{mode:<32} {g / 1e6:>14.1f} {g / w:>14.2f}")
    print(f"weights.bin: {w / 1e6:.1f} MB (d{res['depth']}, {res['precision']}, batch {res['batch']})")


if __name__ == "__main__":
    main()
