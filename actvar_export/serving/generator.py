"""Requests -> images over a bundle: the contract every serving path shares.

A request is (classes, seed, cfg, top_p); its images depend on those alone. Requests with the same
cfg and top_p are packed into the bundle's static batch (the rest padded by repeating the last row),
and a request larger than the batch is split over several runs; each request's uniforms come from
`sampling.request_noise(n, seed)`, so packing never changes an image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ActVarError

DEFAULT_CFG = 1.5
DEFAULT_TOP_P = 0.96
MAX_IMAGES_PER_REQUEST = 1024


@dataclass(frozen=True)
class Job:
    labels: Tuple[int, ...]
    seed: int
    cfg: float = DEFAULT_CFG
    top_p: float = DEFAULT_TOP_P


def check_job(labels: Sequence[int], seed: int, cfg: float, top_p: float) -> Job:
    """A Job from request values, or ActVarError naming the input that is wrong."""
    labels = [int(c) for c in labels]
    if not labels:
        raise ActVarError("class_labels is empty: give at least one ImageNet class id (0..999)")
    if len(labels) > MAX_IMAGES_PER_REQUEST:
        raise ActVarError(f"class_labels has {len(labels)} ids: at most {MAX_IMAGES_PER_REQUEST} images per request")
    bad = [c for c in labels if not 0 <= c < 1000]
    if bad:
        raise ActVarError(f"class_labels: {bad[0]} is not an ImageNet class id (0..999)")
    if not 0 <= int(seed) < 2 ** 64:
        raise ActVarError(f"seed: {seed} is outside 0..2^64-1")
    if not np.isfinite(cfg):
        raise ActVarError(f"cfg: {cfg} is not a finite number")
    if not 0 <= top_p <= 1:
        raise ActVarError(f"top_p: {top_p} is outside [0, 1] (0 disables)")
    return Job(tuple(labels), int(seed), float(cfg), float(top_p))


class BundleGenerator:
    """Runs jobs through a backend's `generate(labels_B, u_BL, cfg, top_p, progress=...)` (the bundle runtime, or
    the loop over per-graph models of a Triton repository)."""

    def __init__(self, batch: int, backend, name: str):
        self.batch, self.backend, self.name = batch, backend, name
        self.runs = 0   # bundle runs so far (one run = the 10 scales + the decoder at the static batch)

    def run(self, jobs: Sequence[Job], progress: Optional[Callable[[int], None]] = None) -> List[np.ndarray]:
        """uint8 images (n_j, 256, 256, 3) for each job, in order."""
        from ..images import to_uint8
        from ..sampling import request_noise
        out: List[Optional[np.ndarray]] = [None] * len(jobs)
        groups: Dict[Tuple[float, float], List[int]] = {}
        for j, job in enumerate(jobs):
            groups.setdefault((job.cfg, job.top_p), []).append(j)
        B = self.batch
        for (cfg, top_p), members in groups.items():
            labels = np.concatenate([np.asarray(jobs[j].labels, np.int64) for j in members])
            u = np.concatenate([request_noise(len(jobs[j].labels), jobs[j].seed) for j in members])
            images = []
            for a in range(0, len(labels), B):
                lab, uu = labels[a:a + B], u[a:a + B]
                pad = B - len(lab)
                if pad:
                    lab = np.concatenate([lab, np.repeat(lab[-1:], pad)])
                    uu = np.concatenate([uu, np.repeat(uu[-1:], pad, axis=0)])
                if getattr(self.backend, "generates_uint8", False):     # converted on the device
                    images.append(self.backend.generate(lab, uu, cfg, top_p, progress=progress, uint8=True)[0][:B - pad])
                else:
                    img = self.backend.generate(lab, uu, cfg, top_p, progress=progress)[0]
                    images.append(to_uint8(np.asarray(img, np.float32)[:B - pad]))
                self.runs += 1
            images = images[0] if len(images) == 1 else np.concatenate(images)
            a = 0
            for j in members:
                n = len(jobs[j].labels)
                out[j] = np.ascontiguousarray(images[a:a + n])
                a += n
        return out


def load_generator(bundle_dir, device: Optional[str] = None, verify: bool = True, device_id: int = 0) -> BundleGenerator:
    """The bundle runtime (runtime/ort_runtime.py) that serves a bundle, on `device` (cuda or cpu; default: CUDA
    where it runs), CUDA device `device_id`."""
    from ..bundle import Bundle
    return bundle_generator(Bundle.open(bundle_dir, verify=verify), device, device_id=device_id)


def bundle_generator(bundle, device: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
                     device_id: int = 0) -> BundleGenerator:
    """A generator over the bundle runtime for an opened (and checked) Bundle."""
    from ..runtime.ort_runtime import Runtime, default_device
    rt = Runtime(bundle, device or default_device(), device_id=device_id, log=log)
    return BundleGenerator(bundle.batch, rt, f"onnxruntime ({', '.join(rt.provider_names)})")


def instance_device(args: dict) -> Tuple[Optional[str], int]:
    """(device, device_id) for a Triton model instance from its `initialize` args: a KIND_GPU instance runs on
    its own GPU (model_instance_device_id); any other on the default device (CUDA where it runs, else CPU)."""
    if args.get("model_instance_kind") == "GPU":
        return "cuda", int(args.get("model_instance_device_id", 0))
    return None, 0
