"""The `actvar` model of a Triton repository (Python backend): class ids + seed (+ cfg, top_p) in,
uint8 images out. Each `execute` call takes every request Triton's dynamic batcher gathered and packs
them into the bundle's static batch (`generator.BundleGenerator`).

Its `mode` parameter says where the graphs run: `inprocess` (the bundle's runtime inside this model)
or `bls` (the step_i / decoder models of the same repository, called through Triton's BLS API).
Importable only inside Triton's Python backend (`triton_python_backend_utils`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import ActVarError
from .generator import DEFAULT_CFG, DEFAULT_TOP_P, BundleGenerator, check_job, instance_device, load_generator

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class BlsBackend:
    """`infer(graph, feed) -> dict` over the repository's step_i / decoder models."""

    def __init__(self, manifest: dict):
        precision = {"fp32": "float32", "fp16": "float16", "bf16": "float32"}[manifest["precision"]]
        self.io = {name: ({k: _NP[precision if t == "P" else t] for k, (t, _) in g["inputs"].items()}, list(g["outputs"]))
                   for name, g in manifest["graphs"].items()}

    def generate(self, labels_B, u_BL, cfg, top_p, progress=None):
        """The loop over the repository's step_i / decoder models (same contract as the runtime's generate)."""
        from ..runtime.loop import run_bundle
        images, ids, _, _ = run_bundle(self, labels_B, u_BL, cfg, top_p, progress=progress)
        return images, ids

    def infer(self, name, feed):
        types, outputs = self.io[name]
        req = pb_utils.InferenceRequest(
            model_name=name, requested_output_names=outputs,
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v, dtype=types[k])) for k, v in feed.items()])
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(f"model {name}: {resp.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(resp, n).as_numpy() for n in outputs}


def _rows(request, name, k, default, dtype):
    """One value per row of the request's batch dimension (shape [k, 1]); the default where absent."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return [default] * k
    a = t.as_numpy().reshape(k, -1)
    if a.shape[1] != 1:
        raise ActVarError(f"{name}: expected one value per request row, got shape {list(t.as_numpy().shape)}")
    return [dtype(v) for v in a[:, 0]]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        bundle = here / params["bundle"]
        self.cfg = float(params.get("cfg", DEFAULT_CFG))
        self.top_p = float(params.get("top_p", DEFAULT_TOP_P))
        if params.get("mode", "inprocess") == "bls":
            manifest = json.loads((bundle / "manifest.json").read_text())
            self.gen = BundleGenerator(manifest["batch"], BlsBackend(manifest), "triton bls")
        else:
            device, device_id = instance_device(args)
            if device == "cuda":    # this instance's stub process serves this one GPU
                import torch
                torch.cuda.set_device(device_id)
            self.gen = load_generator(bundle, device, verify=False, device_id=device_id)

    def execute(self, requests):
        """Every request (k rows of class_labels [k, n] + seed [k, 1]) becomes k jobs; all jobs of all
        requests run packed together; a bad request gets its own error response."""
        jobs, spans, responses = [], {}, [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                labels = pb_utils.get_input_tensor_by_name(r, "class_labels")
                if labels is None or pb_utils.get_input_tensor_by_name(r, "seed") is None:
                    raise ActVarError(f"missing input {'class_labels' if labels is None else 'seed'}")
                lab = labels.as_numpy()
                lab = lab.reshape(1, -1) if lab.ndim == 1 else lab
                k = lab.shape[0]
                rows = [check_job(lab[j], s, c, p) for j, (s, c, p) in enumerate(zip(
                    _rows(r, "seed", k, None, int), _rows(r, "cfg", k, self.cfg, float), _rows(r, "top_p", k, self.top_p, float)))]
                spans[i] = (len(jobs), len(jobs) + k)
                jobs += rows
            except (ActVarError, ValueError) as e:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
        if jobs:
            try:
                images = self.gen.run(jobs)
                for i, (a, b) in spans.items():
                    out = images[a][None] if b - a == 1 else np.stack(images[a:b])      # [rows, n, 256, 256, 3]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", out)])
            except Exception as e:  # a runtime failure fails these requests, not the server
                for i in spans:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                        f"generation failed: {type(e).__name__}: {e}"))
        return responses
