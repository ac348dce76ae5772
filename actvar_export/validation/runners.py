"""Polygraphy runners over one scale's step graph: the teacher-forced PyTorch reference, a bundle
backend (ONNX Runtime sessions with the project's options and custom ops), and TensorRT where it can run."""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from .. import ops
from ..config import NUM_SCALES
from ..export.step import is_cache
from ..model import VAR, BlockAux, cfg_logits
from ..sampling import sample_noise
from ..vqvae import VQVAE

NP_TYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


BF16 = "bfloat16"    # numpy has none: bf16 inputs travel as fp32 arrays holding bf16 values


def graph_types(manifest: dict, graph: str) -> Dict[str, object]:
    """Input name -> numpy dtype of a bundle graph ('P' is the bundle's precision; BF16 for bf16)."""
    p = {"fp32": np.float32, "fp16": np.float16, "bf16": BF16}[manifest["precision"]]
    types = {n: (p if t == "P" else NP_TYPES[t]) for n, (t, _) in manifest["graphs"][graph]["inputs"].items()}
    if any(is_cache(n) for n in types):
        types["kv_in"] = p                  # the per-block caches packed into validation's kv_in (`pack_cache`)
    return types


def as_graph_feed(feed: Dict[str, np.ndarray], types: Dict[str, object]) -> Dict[str, np.ndarray]:
    """The feed in the graph's own input types (bf16: rounded to nearest even, kept as fp32): both runners
    then see bit-identical inputs."""
    def cast(v, t):
        if t == BF16:
            return torch.from_numpy(np.ascontiguousarray(v, np.float32)).bfloat16().float().numpy()
        return np.ascontiguousarray(v, dtype=t)
    return OrderedDict((k, cast(v, types.get(k, v.dtype))) for k, v in feed.items())


def pack_cache(d: Dict[str, np.ndarray], side: str) -> "OrderedDict[str, np.ndarray]":
    """Validation's view of the KV cache: the per-block tensors k_{side}.b, v_{side}.b (S, H, L, 64) of a step
    graph stacked into one kv_{side} (D, 2, S, H, L, 64), in place of the first of them; other entries as they are.
    The rules (tolerances, the pass-through check) read the cache of all blocks as one output."""
    names = [n for n in d if is_cache(n) and n.split(".")[0].endswith(side)]
    if not names:
        return OrderedDict(d)
    depth = len(names) // 2
    packed = np.stack([np.stack([d[f"k_{side}.{b}"], d[f"v_{side}.{b}"]]) for b in range(depth)])
    out = OrderedDict()
    for k, v in d.items():
        if k == names[0]:
            out[f"kv_{side}"] = packed
        elif k not in names:
            out[k] = v
    return out


def unpack_cache(d: Dict[str, np.ndarray], side: str) -> "OrderedDict[str, np.ndarray]":
    """The inverse of `pack_cache`: kv_{side} (D, 2, ...) back into the graph's k_{side}.b / v_{side}.b."""
    out = OrderedDict()
    for k, v in d.items():
        if k == f"kv_{side}":
            for b in range(v.shape[0]):
                out[f"k_{side}.{b}"], out[f"v_{side}.{b}"] = v[b, 0], v[b, 1]
        else:
            out[k] = v
    return out


class _StepRunner(BaseRunner):
    """Inputs in validation's view: the graph's own, with the per-block caches as one kv_in (`pack_cache`)."""

    def __init__(self, manifest: dict, graph: str, prefix: str):
        super().__init__(name=f"{prefix}:{graph}")
        self.graph = graph
        self._meta = TensorMetadata()
        types = graph_types(manifest, graph)
        for n, (_, shape) in manifest["graphs"][graph]["inputs"].items():
            if is_cache(n):                  # k_in.0 stands for all: kv_in (D, 2, S, H, Lc, 64)
                if n != "k_in.0":
                    continue
                n, shape = "kv_in", [manifest["model"]["depth"], 2, *shape]
            self._meta.add(n, np.float32 if types[n] == BF16 else types[n], shape)

    def get_input_metadata_impl(self):
        return self._meta


class BackendRunner(_StepRunner):
    """One bundle graph through a backend's `infer(graph, feed) -> dict` (the one adapter: ONNX Runtime's
    the bundle runtime, or any backend with the same contract). Outputs come back in fp32/int64."""

    def __init__(self, backend, graph: str, label: str):
        super().__init__(backend.bundle.manifest, graph, label)
        self.backend = backend

    def infer_impl(self, feed_dict):
        t = time.time()
        out = pack_cache(self.backend.infer(self.graph, dict(unpack_cache(feed_dict, "in"))), "out")
        self.inference_time = time.time() - t
        self.last = OrderedDict((k, v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in out.items())
        return self.last


class ReferenceRunner(_StepRunner):
    """The PyTorch reference of one scale, fed the graph's inputs (teacher forcing across scales).
    With `force_from` (a BackendRunner run before it on the same feed) the backend's decisions (sel_idx,
    experts, idx) are injected in place of the reference's own, so its continuous outputs stay comparable
    after a flip (teacher forcing on decisions); `scores` keeps the reference's selector/router scores and CFG logits of the
    last call (the margins of its decisions)."""

    def __init__(self, model: VAR, vae: VQVAE, manifest: dict, si: int, force_from: Optional[BackendRunner] = None):
        super().__init__(manifest, f"step_{si}", "reference")
        self.model, self.vae, self.si, self.top_k = model, vae, si, manifest["top_k"]
        self.force_from = force_from
        self.scores: dict = {}

    @torch.no_grad()
    def infer_impl(self, feed_dict):
        t0 = time.time()
        model, si, f = self.model, self.si, {k: torch.from_numpy(np.asarray(v)) for k, v in feed_dict.items()}
        B = f["labels"].shape[0]
        x, cond = model.first_input(f["labels"])
        caches = [None] * model.depth
        f_hat = torch.zeros(B, 32, 16, 16)
        if si:
            x, f_hat = f["x_in"].float(), f["f_hat_in"].float()
            kv = f["kv_in"].float()
            caches = [(kv[b, 0], kv[b, 1]) for b in range(model.depth)]
        force, forced = None, (self.force_from.last if self.force_from is not None else None)
        k_t, _ = model.sizes(si)
        if forced is not None and k_t is not None:
            sel, exp = torch.from_numpy(forced["sel_idx"]), torch.from_numpy(forced["experts"])
            force = [BlockAux(idx_SK=sel[b], experts_SKE=exp[b]) for b in range(model.depth)]
        st = model.step(si, x, cond, caches, force=force)
        lc = cfg_logits(st.logits_SlV, si, float(f["cfg"][0]))
        top_p = float(f["top_p"][0])
        idx = torch.from_numpy(forced["idx"]) if forced is not None else sample_noise(lc, f["u"], self.top_k, top_p)
        f_hat_out = self.vae.fhat_update(si, f_hat, idx)
        new = model.extend_caches(caches, st.kv)
        out = OrderedDict(idx=idx.numpy(), logits=lc.numpy(), f_hat_out=f_hat_out.numpy(),
                          kv_out=torch.stack([torch.stack(kv) for kv in new]).numpy())
        if si < NUM_SCALES - 1:
            out["x_next"] = model.scale_input(si + 1, self.vae.next_input(si, f_hat_out)).numpy()
        self.scores = {"logits": lc.numpy()}
        self.own = {"idx": sample_noise(lc, f["u"], self.top_k, top_p).numpy()}   # its own decisions, upstream injected
        if k_t is not None:
            out["sel_idx"] = torch.stack([a.idx_SK for a in st.aux]).numpy()
            out["experts"] = torch.stack([a.experts_SKE for a in st.aux]).numpy()
            self.scores["sel_idx"] = torch.stack([a.scores_SL for a in st.aux]).numpy()
            self.scores["experts"] = torch.stack([a.router_SKN for a in st.aux]).numpy()
            _, k_w = model.sizes(si)
            self.own["sel_idx"] = np.stack([ops.select_tokens(a.scores_SL, k_t).numpy() for a in st.aux])
            self.own["experts"] = np.stack([ops.route_experts(a.router_SKN.reshape(-1, a.router_SKN.shape[-1]), k_w)
                                            .reshape(a.router_SKN.shape[:-1] + (k_w,)).numpy() for a in st.aux])
        self.inference_time = time.time() - t0
        return out


def tensorrt_note(bundle) -> str:
    """One line: why no TensorRT runner takes part in this validation."""
    if not torch.cuda.is_available():
        return "TensorRT: not run (no CUDA GPU on this machine); the rest is validated"
    if not any(bundle.path.glob("step_*.engine")):
        return "TensorRT: not run (no serialized engines in the bundle: `actvar-export engines`); the rest is validated"
    return "TensorRT: not run (validate has no runner over the bundle's engines yet); the rest is validated"
