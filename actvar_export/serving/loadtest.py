"""`actvar-export loadtest`: N concurrent clients send M requests to a served `actvar` model; images/second,
latency percentiles, and every response checked against the expected images of its classes and seed.

Expected images come from one of two references (the report says which ran):
- `bundle`: the in-process bundle runtime on the same bundle computes each distinct request once;
- `determinism`: without a bundle, the first response to each distinct request is its reference and every later
  response to it must equal it byte for byte (the noise definition makes a request's images depend on its
  classes, seed, cfg and top_p alone). This catches mix-ups and nondeterminism, not a wrong model.
Request i is distinct request i mod D: the same classes, seed + (i mod D).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ActVarError
from .generator import DEFAULT_CFG, DEFAULT_TOP_P, Job, check_job


def plan(classes: Sequence[int], seed: int, distinct: int, cfg: float = DEFAULT_CFG,
         top_p: float = DEFAULT_TOP_P) -> List[Job]:
    """The D distinct requests (checked as the server checks them)."""
    if distinct < 1:
        raise ActVarError(f"--distinct: {distinct} must be at least 1")
    return [check_job(classes, seed + d, cfg, top_p) for d in range(distinct)]


def _counts(concurrency: int, requests: int) -> None:
    if concurrency < 1 or requests < 1:
        raise ActVarError(f"--concurrency {concurrency} and --requests {requests} must be at least 1")


def expected_images(bundle_dir, jobs: Sequence[Job], device: Optional[str] = None) -> Dict[Job, np.ndarray]:
    """Each job's images from the in-process bundle runtime (one packed run over all jobs)."""
    from .generator import load_generator
    return dict(zip(jobs, load_generator(bundle_dir, device).run(list(jobs))))


class ImageCheck:
    """Counts wrong images of responses, thread-safe. With `expected` ({job: images}) each response is compared
    with its job's; without, with the first well-formed response to the same job (the determinism rule)."""

    def __init__(self, expected: Optional[Dict[Job, np.ndarray]] = None):
        self.mode = "determinism" if expected is None else "bundle"
        self.reference: Dict[Job, np.ndarray] = dict(expected or {})
        self.checked = self.wrong = self.wrong_requests = 0
        self._lock = threading.Lock()

    def __call__(self, job: Job, images) -> int:
        """The number of wrong images in this response (all of them when its shape or dtype is wrong)."""
        n = len(job.labels)
        images = np.asarray(images)
        with self._lock:
            ref = self.reference.get(job)
            if images.shape != (n, 256, 256, 3) or images.dtype != np.uint8:
                bad = n
            elif ref is None:          # determinism rule: the first response is the reference
                self.reference[job] = images
                return 0
            else:
                bad = sum(not np.array_equal(a, b) for a, b in zip(images, ref))
            self.checked += n
            self.wrong += bad
            self.wrong_requests += bad > 0
            return bad


def run_loadtest(url: str, concurrency: int, requests: int, jobs: Sequence[Job], check: ImageCheck,
                 protocol: str = "http", progress: bool = True, timeout_s: float = 600) -> dict:
    """`concurrency` threads, each with its own client, send `requests` requests (request i: jobs[i % len(jobs)]);
    returns the report (see `format_report`)."""
    from tqdm import tqdm
    from .client import ActVarClient
    _counts(concurrency, requests)
    clients = [ActVarClient(url, protocol, timeout_s=timeout_s) for _ in range(min(concurrency, requests))]
    try:
        latency = [0.0] * requests
        failures: List[str] = []
        next_i = iter(range(requests))
        lock = threading.Lock()
        bar = tqdm(total=requests, desc="requests", unit="req", disable=not progress)

        def worker(client):
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                job = jobs[i % len(jobs)]
                t = time.perf_counter()
                try:
                    images = client.images(job.labels, job.seed, job.cfg, job.top_p)
                    latency[i] = time.perf_counter() - t
                    check(job, images)
                except Exception as e:   # a failed request is counted and reported, the run goes on
                    latency[i] = float("nan")
                    with lock:
                        failures.append(f"request {i}: {type(e).__name__}: {e}")
                bar.update(1)

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        bar.close()
    finally:
        for c in clients:
            c.close()
    ok = np.array([x for x in latency if x == x]) * 1e3
    images_done = sum(len(jobs[i % len(jobs)].labels) for i in range(requests) if latency[i] == latency[i])
    pct = dict(zip(("p50", "p90", "p99"), np.percentile(ok, [50, 90, 99]).round(2).tolist())) if len(ok) else {}
    return {"url": url, "protocol": protocol, "check": check.mode, "concurrency": concurrency, "requests": requests,
            "distinct_requests": len(jobs), "images_per_request": sorted({len(j.labels) for j in jobs}),
            "seconds": round(seconds, 3), "images": images_done, "images_per_s": round(images_done / seconds, 3),
            "requests_per_s": round(len(ok) / seconds, 3),
            "latency_ms": {**pct, **({"mean": round(float(ok.mean()), 2), "max": round(float(ok.max()), 2)} if len(ok) else {})},
            "checked_images": check.checked, "wrong_images": check.wrong, "wrong_requests": check.wrong_requests,
            "failed_requests": len(failures), "failures": failures[:10]}


def passed(report: dict) -> bool:
    return report["wrong_images"] == 0 and report["failed_requests"] == 0


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    rows = [("images/s", f"{r['images_per_s']:.2f}"), ("requests/s", f"{r['requests_per_s']:.2f}")]
    rows += [(f"latency {k}", f"{lat[k]:.1f} ms") for k in ("p50", "p90", "p99") if k in lat]
    rows += [("wrong images", f"{r['wrong_images']} of {r['checked_images']} checked"),
             ("failed requests", f"{r['failed_requests']} of {r['requests']}")]
    head = (f"loadtest {r['url']} ({r['protocol']}): {r['concurrency']} clients, {r['requests']} requests "
            f"({r['images']} images) in {r['seconds']:.1f}s, {r['distinct_requests']} distinct requests\n"
            f"check: {r.get('reference', r['check'])}")
    w = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k:<{w}}  {v}" for k, v in rows] + [f"  ! {f}" for f in r["failures"][:3]])


def loadtest(url: str, concurrency: int, requests: int, classes: Sequence[int], seed: int = 0, distinct: int = 4,
             protocol: Optional[str] = None, bundle=None, device: Optional[str] = None, progress: bool = True,
             say: Callable[[str], None] = print) -> dict:
    """The whole command: options checked, the server's readiness, the expected images, the run; returns the
    report with `reference` (what the responses were checked against)."""
    from .client import ActVarClient, split_url
    address, protocol = split_url(url, protocol)
    _counts(concurrency, requests)
    jobs = plan(classes, seed, distinct)
    with ActVarClient(address, protocol) as c:   # before the (slow) expected images
        c.check_ready()
    if bundle is not None:
        say(f"expected images: {len(jobs)} distinct requests through the in-process runtime of {bundle} ...")
        check = ImageCheck(expected_images(bundle, jobs, device))
        reference = f"bundle {bundle} (in-process runtime, every response compared with its request's images)"
    else:
        check = ImageCheck()
        reference = ("determinism rule (no --bundle: the responses to the same classes and seed must be identical; "
                     "a wrong model that is consistent passes)")
    r = run_loadtest(address, concurrency, requests, jobs, check, protocol, progress)
    r["reference"] = reference
    return r
