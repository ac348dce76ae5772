"""Where a closed loop of clients loses time between two executions of the `actvar` model, from Triton's request
traces (`--trace-config level=TIMESTAMPS`, rate 1, one JSON file). Each trace is one request; requests that share a
COMPUTE_START ran in one execution. For each pair of consecutive executions the gap from the first's execute()
returning (COMPUTE_OUTPUT_START) to the next's COMPUTE_START is split into: the output stage (to COMPUTE_END), the
first and last responses leaving the server (GRPC_SEND_END / HTTP_SEND_END, else REQUEST_END), the next execution's
first and last requests arriving (REQUEST_START), and the batcher handing them to the model. Beside them: the
execution's own execute() time and response_spacing, the time between two of its responses becoming complete (the
backend hands them over one by one)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Dict, List


def read_traces(path) -> List[Dict[str, int]]:
    """{timestamp name: ns} per traced request of the model (traces without COMPUTE_START dropped)."""
    ts: Dict[int, Dict[str, int]] = defaultdict(dict)
    for e in json.loads(Path(path).read_text()):
        for t in e.get("timestamps", []):
            ts[e["id"]].setdefault(t["name"], int(t["ns"]))
    return [t for t in ts.values() if "COMPUTE_START" in t and "REQUEST_START" in t]


def _sent(t: Dict[str, int]) -> int:
    return t.get("GRPC_SEND_END", t.get("HTTP_SEND_END", t.get("REQUEST_END")))


def gap_breakdown(traces: List[Dict[str, int]]) -> dict:
    """Median milliseconds, over consecutive executions, of each stage from one execute() returning to the next
    execute() starting (see the module docstring), with the execution count."""
    runs = defaultdict(list)
    for t in traces:
        runs[t["COMPUTE_START"]].append(t)
    ex = [runs[k] for k in sorted(runs)]
    rows = []
    for a, b in zip(ex, ex[1:]):
        out0 = min(t["COMPUTE_OUTPUT_START"] for t in a)
        arrive = sorted(t["REQUEST_START"] for t in b)
        if arrive[0] < out0:        # requests already queued: not a closed-loop gap
            continue
        rows.append({"output_stage": max(t["COMPUTE_END"] for t in a) - out0,
                     "first_response_sent": min(_sent(t) for t in a) - out0,
                     "last_response_sent": max(_sent(t) for t in a) - out0,
                     "first_request_in": arrive[0] - out0,
                     "last_request_in": arrive[-1] - out0,
                     "next_execute": b[0]["COMPUTE_START"] - out0,
                     "execute": out0 - min(t["COMPUTE_START"] for t in a),
                     "response_spacing": (max(t["INFER_RESPONSE_COMPLETE"] for t in a)
                                          - min(t["INFER_RESPONSE_COMPLETE"] for t in a)) / max(1, len(a) - 1)})
    if not rows:
        return {"executions": len(ex), "gaps": 0}
    return {"executions": len(ex), "gaps": len(rows),
            **{k: round(median(r[k] for r in rows) / 1e6, 3) for k in rows[0]}}
