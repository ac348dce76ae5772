"""The runtime loop over a bundle's step graphs: the only logic a deployment needs."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from ..config import NUM_SCALES, SCALE_BEGIN, SCALE_LENS
from ..export.step import carried


def step_feed(si: int, labels: np.ndarray, u: np.ndarray, cfg: float, top_p: float,
              prev: Optional[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Inputs of step graph si; the carried tensors (x_in, each block's k_in/v_in, f_hat_in) come from the
    previous step's outputs `prev` when given."""
    a, l = SCALE_BEGIN[si], SCALE_LENS[si]
    feed = {"labels": labels.astype(np.int64), "u": np.ascontiguousarray(u[:, a:a + l], dtype=np.float32),
            "cfg": np.array([cfg], np.float32), "top_p": np.array([top_p], np.float32)}
    if si and prev is not None:
        depth = sum(1 for n in prev if n.startswith("k_out."))
        feed.update({i: prev[o] for i, o in carried(depth).items()})
    return feed


def run_bundle(backend, labels: np.ndarray, u: np.ndarray, cfg: float, top_p: float, decode: bool = True,
               progress: Optional[Callable[[int], None]] = None, keep: bool = False):
    """Generate with a bundle: returns (images (B,3,256,256) or None, per-scale ids, per-scale outputs if keep)."""
    prev, ids, outs = None, [], []
    for si in range(NUM_SCALES):
        prev = backend.infer(f"step_{si}", step_feed(si, labels, u, cfg, top_p, prev))
        ids.append(prev["idx"])
        if keep:
            outs.append(prev)
        if progress:
            progress(si)
    images = backend.infer("decoder", {"f_hat": prev["f_hat_out"]})["image"] if decode else None
    return images, ids, outs, prev["f_hat_out"]
