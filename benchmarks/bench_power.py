"""Power, SM clock and energy per call of the expert FFN against the dense FFN and its cuBLAS GEMMs, each run
as a sustained load (GPU machine; NVML through libnvidia-ml.so.1, no extra package).

Why: under the H100's 700 W cap a long GEMM runs at whatever clock its power allows, so two kernels with the
same cycle count can differ in time by their energy per cycle. This shows which workload is clocked down and
what one call costs in energy (mean power x time per call).

Each workload is captured into a CUDA graph (R calls over rotated inputs, as bench_kernels.py) and replayed
back to back for --seconds; NVML is sampled every 50 ms from a second thread and the first second is dropped
(NVML's power reading on Hopper is a one-second average). Prints a table and writes JSON ($OUT/bench_power.json).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import N_EXPERTS, capture, ffn_calls  # noqa: E402

from actvar_export.fsutil import write_json_atomic  # noqa: E402

NVML_CLOCK_SM = 1
SW_POWER_CAP = 0x4   # nvmlClocksEventReasonSwPowerCap


class Nvml:
    """The three NVML readings used here, for the GPU at NVML index `index`."""

    def __init__(self, index: int):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        self.dev = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.dev)), "GetHandleByIndex")

    @staticmethod
    def _check(rc: int, what: str):
        if rc != 0:
            raise RuntimeError(f"NVML {what} failed with code {rc}")

    def sample(self):
        mw, mhz, reasons = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetPowerUsage(self.dev, ctypes.byref(mw)), "GetPowerUsage")
        self._check(self.lib.nvmlDeviceGetClockInfo(self.dev, NVML_CLOCK_SM, ctypes.byref(mhz)), "GetClockInfo")
        self._check(self.lib.nvmlDeviceGetCurrentClocksThrottleReasons(self.dev, ctypes.byref(reasons)),
                    "GetCurrentClocksThrottleReasons")
        return mw.value / 1000.0, mhz.value, bool(reasons.value & SW_POWER_CAP)


def sustained(nvml: Nvml, fns, seconds: float):
    """Replays the graph of fns for `seconds`; returns (us per call, mean W, mean SM MHz, share of samples at the
    software power cap) over the time after the first second."""
    g = capture(fns)
    samples, stop = [], threading.Event()

    def sampler():
        t0 = time.time()
        while not stop.is_set():
            samples.append((time.time() - t0, *nvml.sample()))
            time.sleep(0.05)

    th = threading.Thread(target=sampler)
    th.start()
    t0, calls, t_meas, calls_meas = time.time(), 0, None, 0
    while time.time() - t0 < seconds:
        g.replay()
        torch.cuda.synchronize()
        calls += len(fns)
        if t_meas is None and time.time() - t0 >= 1.0:
            t_meas, calls_meas = time.time(), calls
    elapsed = time.time() - t_meas
    stop.set()
    th.join()
    kept = [x for x in samples if x[0] >= 1.0] or samples
    return (elapsed / max(calls - calls_meas, 1) * 1e6, statistics.mean(x[1] for x in kept),
            statistics.mean(x[2] for x in kept), sum(x[3] for x in kept) / len(kept))


def workloads(C: int, T: int, dtype=torch.bfloat16, R: int = 2):
    """The FFNs of bench_kernels.py (R rotated input sets) and the dense FFN's two cuBLAS GEMMs alone."""
    dense, expert, x = ffn_calls(C, T, R, dtype)
    hid = [torch.randn(T, 4 * C, device="cuda", dtype=dtype) for _ in range(R)]
    return {
        "dense FFN": dense,
        "expert FFN": expert,
        "cuBLAS fc1 (dense)": [lambda i=i: F.linear(x["h"][i], x["w1"][i], x["b1"][i]) for i in range(R)],
        "cuBLAS fc2 (dense)": [lambda i=i: F.linear(hid[i], x["w2"][i], x["b2"][i]) for i in range(R)],
    }


def _shape(text):
    try:
        C, T = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxT (e.g. 1920x24576), got {text!r}") from None
    if C <= 0 or T <= 0 or C % N_EXPERTS:
        raise argparse.ArgumentTypeError(f"C and T must be positive and C a multiple of {N_EXPERTS}: {text!r}")
    return C, T


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", type=_shape, default=[(1024, 24576), (1920, 24576)], metavar="CxT",
                    help="widths C and token counts T (default 1024x24576 1920x24576)")
    ap.add_argument("--seconds", type=float, default=4.0, help="sustained time per workload (default 4)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_power.json"))
    args = ap.parse_args()
    if args.seconds <= 1.0:   # the first second is dropped (NVML's one-second power average)
        ap.error(f"--seconds must be more than 1 (got {args.seconds})")
    if not torch.cuda.is_available():
        sys.exit("Error: bench_power.py needs a CUDA GPU")
    nvml = Nvml(torch.cuda.current_device())
    torch.manual_seed(0)
    rows = []
    for C, T in args.shapes:
        for name, fns in workloads(C, T).items():
            us, watts, mhz, capped = sustained(nvml, fns, args.seconds)
            rows.append(dict(C=C, T=T, workload=name, us_per_call=us, watts=watts, sm_mhz=mhz,
                             power_capped_share=capped, mJ_per_call=watts * us * 1e-3))
            torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(), "seconds": args.seconds, "rows": rows}
    write_json_atomic(args.json, res)
    print(f"\n{res['device']}: sustained loads of {args.seconds:.0f} s (first second dropped), bf16, N=16, K_w=12")
    print(f"{'C':>5} {'T':>6} {'workload':20} {'us/call':>9} {'W':>6} {'SM MHz':>7} {'at cap':>6} {'mJ/call':>8}")
    for r in rows:
        print(f"{r['C']:>5} {r['T']:>6} {r['workload']:20} {r['us_per_call']:9.1f} {r['watts']:6.0f} "
              f"{r['sm_mhz']:7.0f} {100 * r['power_capped_share']:5.0f}% {r['mJ_per_call']:8.2f}")
    print(f"JSON written to {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()
