"""One set of option checks, shared by every command and the Python API. Each raises ActVarError
naming the option, and runs before anything is loaded or written."""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional

from .config import NUM_CLASSES, TOPK_LIMIT_TRT, VOCAB, ActVarConfig, VarConfig
from .errors import ActVarError
from .fsutil import reason

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def ints(text: str, what: str) -> List[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ActVarError(f"invalid {what} {text!r}: expected integers separated by commas") from None


def actvar_overrides(token_ratio=None, expert_ratio=None, active_scales=None) -> dict:
    """--token-ratio / --expert-ratio / --active-scales as a dict of overrides (None: keep the checkpoint's)."""
    ov = {"token_ratio": token_ratio, "expert_ratio": expert_ratio,
          "active_scales": None if active_scales is None else tuple(ints(active_scales, "--active-scales"))}
    for k in ("token_ratio", "expert_ratio"):
        if ov[k] is not None and not 0 < ov[k] <= 1:
            raise ActVarError(f"invalid --{k.replace('_', '-')} {ov[k]}: must be in (0, 1]")
    if ov["active_scales"] is not None:
        ActVarConfig(active_scales=ov["active_scales"])        # range and duplicates
    return ov


def cfg(v: float) -> float:
    if not (math.isfinite(v) and v >= 0):
        raise ActVarError(f"invalid --cfg {v}: guidance must be a finite number >= 0")
    return v


def top_p(v: float) -> float:
    if not (math.isfinite(v) and 0 <= v <= 1):
        raise ActVarError(f"invalid --top-p {v}: must be in [0, 1] (0 disables)")
    return v


def top_k_reference(v: int) -> int:
    if not 0 <= v <= VOCAB:
        raise ActVarError(f"invalid --top-k {v}: the reference sampler takes 0 (disabled) .. {VOCAB}")
    return v


def top_k_build(v: int) -> int:
    if not 1 <= v <= TOPK_LIMIT_TRT:
        raise ActVarError(f"invalid --top-k {v}: exported graphs need 1 <= top_k <= {TOPK_LIMIT_TRT} "
                          f"(TensorRT's TopK limit); the reference sampler (sample --ckpt) accepts 0 (disabled)")
    return v


def top_k_bundle(v: Optional[int], static: int) -> None:
    """A bundle's top-k is static in its graphs: --top-k may only repeat it."""
    if v is None or v == static:
        return
    if not 1 <= v <= TOPK_LIMIT_TRT:
        raise ActVarError(f"invalid --top-k {v} for a bundle: its graphs have static top-k {static}; bundles take "
                          f"1..{TOPK_LIMIT_TRT} (use sample --ckpt for top-k {v})")
    raise ActVarError(f"--top-k {v}: the bundle was built with top-k {static} (static in its graphs); "
                      f"drop --top-k or rebuild with --top-k {v}")


def classes(text: Optional[str], batch: Optional[int] = None) -> List[int]:
    """ImageNet class ids from 'a,b,c'; with `batch`, exactly that many."""
    if text is None or not text.strip(" ,"):
        raise ActVarError("--classes is empty: give ImageNet class ids, e.g. --classes 207,360")
    labels = ints(text, "--classes")
    bad = [c for c in labels if not 0 <= c < NUM_CLASSES]
    if bad:
        raise ActVarError(f"invalid --classes {text!r}: {bad[0]} is not an ImageNet id (0..{NUM_CLASSES - 1})")
    if batch is not None and len(labels) != batch:
        raise ActVarError(f"--classes: the bundle was built for batch {batch}: give {batch} ImageNet ids, not {len(labels)}")
    return labels


def batch(v: int) -> int:
    if not 1 <= v <= 1024:
        raise ActVarError(f"invalid --batch {v}: must be 1..1024")
    return v


def depth(v: int) -> int:
    VarConfig(depth=v)
    return v


def experts(depth_: int, n: int) -> int:
    """The experts split the FFN hidden width 4C = 256·depth into equal slices."""
    depth(depth_)
    ActVarConfig(num_experts=n)
    if (256 * depth_) % n:
        raise ActVarError(f"--experts {n}: {n} experts do not divide the FFN hidden size {256 * depth_} of depth {depth_}")
    return n


def device(text: str):
    import torch
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise ActVarError(f"invalid --device {text!r}: use cpu, cuda or cuda:N")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ActVarError(f"--device {text}: CUDA is not available here")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ActVarError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def providers(text: Optional[str]) -> Optional[List[str]]:
    """'cuda,cpu' -> ONNX Runtime provider names, each available in this ONNX Runtime."""
    if text is None:
        return None
    import onnxruntime as ort
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if t not in PROVIDERS:
            raise ActVarError(f"invalid --providers {text!r}: unknown {t!r}: use cuda, cpu or tensorrt")
        out.append(PROVIDERS[t])
    missing = [p for p in out if p not in ort.get_available_providers()]
    if missing:
        hint = " (install onnxruntime-gpu)" if "CUDAExecutionProvider" in missing else ""
        raise ActVarError(f"--providers {text}: ONNX Runtime here lacks {', '.join(missing)}{hint} "
                          f"(available: {', '.join(ort.get_available_providers())})")
    return out


def runtime_device(text: Optional[str]) -> str:
    """--providers for the bundle runtime: 'cuda[,cpu]' -> cuda, 'cpu' -> cpu; default: CUDA where both torch
    and ONNX Runtime see one, else the CPU."""
    if text is None:
        from .runtime.ort_runtime import default_device
        return default_device()
    names = providers(text)
    if "TensorrtExecutionProvider" in names:
        raise ActVarError(f"invalid --providers {text!r}: the bundle runtime runs ONNX Runtime's cuda or cpu "
                          "provider (TensorRT engines: `actvar-export engines`)")
    return "cuda" if names[0] == "CUDAExecutionProvider" else "cpu"


def visible_gpus() -> List[int]:
    """Indices of the GPUs this machine shows: torch's CUDA devices (they honour CUDA_VISIBLE_DEVICES, as the
    server started from this environment does), else the lines of `nvidia-smi -L`; [] where there is none."""
    import subprocess
    try:
        import torch
        if torch.cuda.is_available():
            return list(range(torch.cuda.device_count()))
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return list(range(sum(line.startswith("GPU ") for line in r.stdout.splitlines()))) if r.returncode == 0 else []


def gpus(text: Optional[str], option: str = "--gpus") -> Optional[List[int]]:
    """--gpus: None (not given), 'all' (every GPU seen now: visible_gpus) or distinct indices '0,1,...'."""
    if text is None:
        return None
    t = text.strip()
    if t.lower() == "all":
        found = visible_gpus()
        if not found:
            raise ActVarError(f"{option} all: no GPU found here (neither torch nor `nvidia-smi -L` sees one); "
                              f"name the GPUs of the serving machine instead, e.g. {option} 0,1")
        return found
    try:
        ids = [int(p) for p in t.split(",")]
    except ValueError:
        raise ActVarError(f"invalid {option} {text!r}: expected 'all' or GPU indices separated by commas, "
                          f"e.g. {option} 0,1") from None
    bad = [i for i in ids if i < 0]
    if bad:
        raise ActVarError(f"invalid {option} {text!r}: {bad[0]} is negative (GPU indices are 0, 1, ...)")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ActVarError(f"invalid {option} {text!r}: GPU {dup[0]} is listed twice")
    return ids


def _inside(p: Path, d: Path) -> bool:
    return p == d or d in p.parents


def _writable_dir(d: Path, option: str) -> None:
    """The directory that will hold an output (or its nearest existing ancestor) takes a new file."""
    a = d
    while not a.exists():
        if a.is_symlink():
            raise ActVarError(f"{option} {d}: {a} is a dangling link")
        a = a.parent
    if not a.is_dir():
        raise ActVarError(f"{option} {d}: {a} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".actvar-probe.", dir=a)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ActVarError(f"{option} {d}: cannot write in {a}: {reason(e)}") from None


def output_file(path, option: str, inputs: Iterable = ()) -> Path:
    """A file the command will write: not a directory, not one of the command's inputs, and its
    directory writable."""
    p = Path(path)
    if p.name in ("", ".", "..") or p.is_dir():
        raise ActVarError(f"{option} {path}: is a directory; give a file name")
    r = p.resolve()
    for i in inputs:
        if i is not None and Path(i).exists() and _inside(r, Path(i).resolve()):
            raise ActVarError(f"{option} {path}: is (inside) an input of this command ({i}); choose another file")
    _writable_dir(r.parent, option)
    return p


def output_bundle(path, force: bool, inputs: Iterable = ()) -> Path:
    """build --out: a new directory, or with --force an existing bundle that holds none of the inputs
    and is not (inside) the current directory's tree."""
    from .bundle import is_bundle
    p = Path(path)
    r = p.resolve()
    if r.parent == r:
        raise ActVarError(f"--out {path}: is the file system root; give a new directory")
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise ActVarError(f"--out {path}: exists and is not a directory")
        if not force:
            raise ActVarError(f"--out {path}: exists: pass --force to replace it")
        for i in inputs:
            if i is not None and _inside(Path(i).resolve(), r):
                raise ActVarError(f"--out {path}: holds {i}, an input of this command; --force will not replace it")
        if _inside(Path.cwd().resolve(), r):
            raise ActVarError(f"--out {path}: is the current directory (or holds it); give a new directory")
        if any(r.iterdir()) and not is_bundle(r):
            raise ActVarError(f"--out {path}: is not a bundle (no manifest.json of this format); --force replaces "
                              f"only a bundle: give a new directory")
    _writable_dir(r.parent, "--out")
    return p


def free_space(path, need: int, option: str = "--out") -> None:
    """Enough free space where `path` will be written for `need` bytes."""
    a = Path(path).resolve()
    while not a.exists():
        a = a.parent
    free = shutil.disk_usage(a).free
    if free < need:
        raise ActVarError(f"{option} {path}: {free / 1e6:.1f} MB free on its file system, the bundle needs about "
                          f"{need / 1e6:.1f} MB")
