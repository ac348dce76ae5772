"""Triton serving throughput: images/second of the `python` repository of a random-weight bundle at
1, 4 and 16 concurrent clients (one image per request, so the dynamic batcher must pack requests into
the bundle's static batch) beside the in-process runtime at the same batch. Each client is its own process (as
independent clients are: no client shares an interpreter lock with another), keeps one connection (gRPC, or HTTP with --protocols) and sends its
next request as soon as its response is back; a level counts the responses received between a common start and stop
time. Triton's statistics give each level's requests per execution: every execution runs one padded static batch,
so images/s ~ in-process x (requests per execution / batch). Prints a table, writes JSON.

    python3 benchmarks/bench_triton.py --depth 16 --batch 16 --precision fp16 --json $OUT/bench_triton.json
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import time
from pathlib import Path


def _client(url: str, protocol: str, k: int, start: float, stop: float, out) -> None:
    """One client process: requests one image at a time from `start` until `stop`; puts the responses received
    in that span (a request still in flight at `stop` is not counted)."""
    from actvar_export.serving.client import ActVarClient
    with ActVarClient(url, protocol.split("+")[0], shared_memory=protocol.endswith("+shm")) as c:
        c.images([k % 1000], k)                     # connected and warm before the span
        while time.time() < start:
            time.sleep(0.001)
        done, i = 0, 0
        while True:
            c.images([(k * 97 + i) % 1000], k * 1000 + i)
            if time.time() > stop:
                break
            done, i = done + 1, i + 1
    out.put(done)


def _level(srv, n: int, protocol: str, a, inproc: float) -> dict:
    """n client processes for a.seconds against a running server: images/s and Triton's batching of the span."""
    from actvar_export.serving.client import ActVarClient, batching_between
    url = srv.grpc_url if protocol.startswith("grpc") else srv.http_url
    with ActVarClient(srv.grpc_url, "grpc") as probe:
        probe.images([0], 0)                      # warm
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        start = time.time() + 10 + 0.5 * n               # the processes import, connect and warm up first
        stop = start + a.seconds
        procs = [ctx.Process(target=_client, args=(url, protocol, k, start, stop, q)) for k in range(n)]
        for pr in procs:
            pr.start()
        while time.time() < start:
            time.sleep(0.01)
        before = probe.batching()
        done, got = 0, 0
        while got < n:                                   # a client that dies fails the level at once
            try:
                done, got = done + q.get(timeout=1), got + 1
            except queue.Empty:
                dead = [pr.exitcode for pr in procs if pr.exitcode not in (None, 0)]
                if dead or time.time() > stop + 600:
                    for pr in procs:
                        pr.kill()
                    raise SystemExit(f"{n} clients ({protocol}): a client process failed (exit {dead}), see above")
        for pr in procs:
            pr.join()
        span = batching_between(before, probe.batching())
    rate = done / a.seconds
    cycle = 1e3 * a.seconds / span["executions"] if span["executions"] else float("nan")
    ex = span["ms_per_execution"]
    print(f"triton, {n:>2} clients ({protocol}, 1 image/request): {rate:.2f} images/s ({100 * rate / inproc:.0f} % of "
          f"in-process); {span['requests_per_execution']} requests per execution of batch {a.batch} "
          f"({span['executions']} executions: {span['batches']}); per execution {cycle:.1f} ms from one to the "
          f"next, of which the model's input {ex.get('compute_input')} ms, execute() {ex.get('compute_infer')} ms, "
          f"output {ex.get('compute_output')} ms; queue {span['queue_ms_per_request']} ms per request "
          f"(in-process {1e3 * a.batch / inproc:.1f} ms per batch)", flush=True)
    return {"protocol": protocol, "images_per_s": round(rate, 2), "ratio_to_in_process": round(rate / inproc, 3),
            **span, "ms_per_cycle": round(cycle, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--protocols", default="grpc", help="Comma list of grpc, http, grpc+shm, http+shm (+shm: the images "
                    "come through a system shared-memory region of the client's): every level runs once per protocol.")
    ap.add_argument("--seconds", type=float, default=30, help="Measured time per concurrency level.")
    ap.add_argument("--delay-us", type=int, default=None,
                    help="Dynamic batcher's max queue delay (default: the repository writer's).")
    ap.add_argument("--trace", action="store_true", help="Run the last level once more with Triton's request traces "
                    "and print where each cycle's time between two executions goes.")
    ap.add_argument("--workdir", default="/tmp/tritonbench")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from actvar_export.bundle import build_bundle
    from actvar_export.checkpoint import save_atomic
    from actvar_export.fsutil import write_json_atomic
    from actvar_export.init import init_checkpoint
    from actvar_export.serving.generator import Job, load_generator
    from actvar_export.serving.repository import DEFAULT_MAX_QUEUE_DELAY_US, write_repository
    from actvar_export.serving.server import TritonServer

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    ck = wd / f"d{a.depth}.pt"
    if not ck.exists():
        save_atomic(init_checkpoint(a.depth, seed=0), ck)
    bdir = wd / f"d{a.depth}_{a.precision}_b{a.batch}"
    if not bdir.exists():
        build_bundle(ck, bdir, batch=a.batch, precision=a.precision)

    gen = load_generator(bdir)
    jobs = [Job((i % 1000,), i) for i in range(a.batch)]
    gen.run(jobs)                                   # warm-up
    t, runs = time.time(), 0
    while time.time() - t < a.seconds or runs < 3:
        gen.run(jobs)
        runs += 1
    inproc = runs * a.batch / (time.time() - t)
    rows = {"in-process": {"images_per_s": round(inproc, 2), "runtime": gen.name}}
    print(f"in-process ({gen.name}), batch {a.batch}: {inproc:.2f} images/s", flush=True)
    del gen

    delay = DEFAULT_MAX_QUEUE_DELAY_US if a.delay_us is None else a.delay_us
    repo = write_repository(bdir, wd / "repo", max_queue_delay_us=delay, force=True)
    levels = [(int(c), p) for c in a.clients.split(",") for p in a.protocols.split(",")]
    res = {"depth": a.depth, "batch": a.batch, "precision": a.precision, "seconds": a.seconds, "delay_us": delay,
           "clients": f"one process each ({a.protocols})", "results": rows}
    with TritonServer(repo) as srv:
        for n, protocol in levels:
            key = f"triton_{n}_clients" + ("" if protocol == "grpc" else f"_{protocol}")
            rows[key] = _level(srv, n, protocol, a, inproc)
            if a.json:      # after every level: a later failure keeps what was measured
                write_json_atomic(a.json, res)
    if a.trace:   # one more run of the last level with Triton's request traces: where each cycle's gap goes
        from actvar_export.serving.trace import gap_breakdown, read_traces
        n, protocol = levels[-1]
        tfile = wd / "trace.json"
        tfile.unlink(missing_ok=True)
        with TritonServer(repo, extra_args=[f"--trace-config=triton,file={tfile}", "--trace-config=level=TIMESTAMPS",
                                            "--trace-config=rate=1", "--trace-config=triton,log-frequency=0"],
                          log_path=wd / "tritonserver_traced.log") as srv:
            try:
                row = _level(srv, n, protocol, a, inproc)
            except SystemExit:
                print(f"traced server's log ({srv.log_path}), last lines:\n{srv.log_tail()}", flush=True)
                raise
        row["gap_ms"] = gap_breakdown(read_traces(tfile))      # written when the server stops
        rows[f"triton_{n}_clients_{protocol}_traced"] = row
        g = row["gap_ms"]
        print(f"traced, {n} clients ({protocol}), median over {g.get('gaps')} cycles, ms after execute() returns: output "
              f"stage done {g.get('output_stage')}, first / last response sent {g.get('first_response_sent')} / "
              f"{g.get('last_response_sent')} ({g.get('response_spacing')} apart), first / last next request in "
              f"{g.get('first_request_in')} / {g.get('last_request_in')}, next execute() {g.get('next_execute')} "
              f"(execute() {g.get('execute')})", flush=True)
    if a.json:
        write_json_atomic(a.json, res)


if __name__ == "__main__":
    main()
