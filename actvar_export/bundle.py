"""Deploy bundles: `build` writes graphs + one weights file + manifest.json atomically;
`Bundle.open` checks every file against the manifest before anything runs."""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from .config import NUM_SCALES, PATCH_NUMS, SCALE_LENS, cache_len_after
from .errors import ActVarError, BundleError
from .fsutil import os_error_in, remove_stale, replace_dir, temp_dir, write_error

MANIFEST = "manifest.json"
DIGESTS = "manifest.sha256.json"    # sha256 of each manifest field: an edited manifest names the field
FORMAT = 2
DECODER = "decoder.onnx"
GRAPHS_SHARE = 1.05                 # bundle bytes / weights bytes: the graphs take < 2 % (tests/test_export.py)


def step_file(si: int) -> str:
    return f"step_{si}.onnx"


def sha256_file(path: Path, progress: Optional[Callable[[int], None]] = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(16 << 20)
            if not b:
                break
            h.update(b)
            if progress:
                progress(len(b))
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    import numpy
    import onnx
    import torch
    from . import __version__
    v = {"actvar_export": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "onnx": onnx.__version__, "numpy": numpy.__version__}
    try:
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v


def build_bundle(ckpt: Path, out: Path, vae: Optional[Path] = None, batch: int = 1, precision: str = "fp16",
                 lowering: str = "portable", top_k: int = 900, force: bool = False, target: str = "onnxruntime",
                 overrides: Optional[dict] = None, show_progress: bool = True) -> Path:
    """Export every scale's step graph, the decoder, one weights file and the manifest.
    Written into a temporary directory beside `out` and renamed when complete."""
    import onnx
    from tqdm import tqdm
    from .checkpoint import load_checkpoint
    from .export.decoder import build_decoder
    from .export.graph import IR_VERSION, OPSET, PRECISION_TYPES, decoder_precision
    from .export.step import LOWERINGS, TARGETS, attention_kind, build_step, carried, gelu_kind, io_shapes
    from .export.weights import WEIGHTS_FILE, WeightStore
    from . import options

    out = Path(out)
    if precision not in PRECISION_TYPES:
        raise ActVarError(f"unknown precision {precision!r}: choose fp32, fp16 or bf16")
    if lowering not in LOWERINGS:
        raise ActVarError(f"unknown lowering {lowering!r}: choose {' or '.join(LOWERINGS)}")
    if target not in TARGETS:
        raise ActVarError(f"unknown target {target!r}: choose {' or '.join(TARGETS)}")
    options.batch(batch)
    options.top_k_build(top_k)
    options.output_bundle(out, force, inputs=(ckpt, vae))
    ck = load_checkpoint(ckpt, vae, overrides)
    if ck.vae_sd is None:
        raise ActVarError(f"{ckpt}: no VQVAE weights: pass --vae vae_ch160v4096z32.pth")
    store = WeightStore(ck.var_sd, ck.vae_sd, precision)
    remove_stale(out)
    options.free_space(out.parent, int(store.total_bytes * GRAPHS_SHARE) + (1 << 20))
    spec = ck.spec
    tmp = None
    try:
        tmp = temp_dir(out)
        with tqdm(total=store.total_bytes, unit="B", unit_scale=True, desc="weights", disable=not show_progress,
                  file=sys.stderr) as bar:
            weights_sha = store.write(tmp / WEIGHTS_FILE, progress=bar.update)
        graphs, timings = {}, {}
        bar = tqdm(total=NUM_SCALES + 1, desc="graphs", unit="graph", disable=not show_progress, file=sys.stderr)
        for si in range(NUM_SCALES):
            t = time.time()
            m = build_step(spec, si, batch, store, precision, lowering, top_k, target)
            onnx.save(m, tmp / step_file(si))
            ins, outs = io_shapes(spec, si, batch)
            graphs[f"step_{si}"] = {"file": step_file(si), "inputs": ins, "outputs": outs}
            timings[f"step_{si}"] = round(time.time() - t, 3)
            bar.set_postfix_str(f"{PATCH_NUMS[si]}x{PATCH_NUMS[si]} {timings[f'step_{si}']:.2f}s")
            bar.update(1)
        t = time.time()
        onnx.save(build_decoder(batch, store, precision), tmp / DECODER)
        graphs["decoder"] = {"file": DECODER, "inputs": {"f_hat": ("float32", [batch, 32, 16, 16])},
                             "outputs": {"image": ("float32", [batch, 3, 256, 256])}}
        timings["decoder"] = round(time.time() - t, 3)
        bar.update(1)
        bar.close()
        for gi in graphs.values():
            onnx.checker.check_model(str(tmp / gi["file"]), full_check=True)
        act = spec.actvar
        files = {}
        to_hash = [p for p in sorted(tmp.iterdir()) if p.name != WEIGHTS_FILE]   # weights.bin hashed while written
        files[WEIGHTS_FILE] = {"sha256": weights_sha, "bytes": (tmp / WEIGHTS_FILE).stat().st_size}
        with tqdm(total=sum(p.stat().st_size for p in to_hash) + Path(ckpt).stat().st_size, unit="B",
                  unit_scale=True, desc="checksums", disable=not show_progress, file=sys.stderr) as hbar:
            for p in to_hash:
                files[p.name] = {"sha256": sha256_file(p, hbar.update), "bytes": p.stat().st_size}
            ck_hash = {"file": str(Path(ckpt).resolve()), "sha256": sha256_file(Path(ckpt), hbar.update),
                       "bytes": Path(ckpt).stat().st_size}
        manifest = {
            "format": FORMAT,
            "model": {"depth": spec.var.depth, "width": spec.var.width, "heads": spec.var.heads,
                      "vocab": spec.var.vocab, "cvae": spec.var.cvae, "patch_nums": list(PATCH_NUMS)},
            "actvar": act.to_dict() if act else None,
            "static_sizes": [{"scale": si, "pn": PATCH_NUMS[si], "tokens": SCALE_LENS[si],
                              "k_t": act.k_t(si) if act else SCALE_LENS[si],
                              "k_w": act.k_w if (act and act.is_active(si)) else None,
                              "cache_in": cache_len_after(act, si - 1) if si else 0,
                              "cache_out": cache_len_after(act, si)} for si in range(NUM_SCALES)],
            "batch": batch, "precision": precision, "decoder_precision": decoder_precision(precision), "lowering": lowering, "top_k": top_k,
            "target": target, "attention": attention_kind(target, precision), "gelu": gelu_kind(target),
            "sampler": "noise", "opset": OPSET, "ir_version": IR_VERSION,
            "graphs": graphs, "carried": carried(spec.var.depth), "files": files, "checkpoint": ck_hash,
            "vae": ({"file": str(Path(vae).resolve()), "sha256": sha256_file(Path(vae))} if vae else "embedded"),
            "versions": _versions(), "export_seconds": timings, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "weights_bytes": store.total_bytes,
        }
        write_manifest(tmp, manifest)
        replace_dir(tmp, out)           # an old bundle stays in place if the new one cannot be renamed
        tmp = None
    except BaseException as e:
        ose = os_error_in(e)
        if ose is not None and not isinstance(e, ActVarError):
            raise write_error(ose, out) from None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def batch(self) -> int:
        return self.manifest["batch"]

    def graph_path(self, name: str) -> Path:
        return self.path / self.manifest["graphs"][name]["file"]

    @classmethod
    def open(cls, path, verify: bool = True, show_progress: bool = False) -> "Bundle":
        """Read the manifest, check it against its field digests and that every file it names exists
        with its size; with verify, also each file's sha256 (`verify()`)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise BundleError(f"{path}: is a file; --bundle takes the directory `build` wrote")
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory")
        manifest = read_manifest(path)
        _check_digests(path, manifest)
        for name, meta in manifest["files"].items():
            p = path / name
            if not p.exists():
                raise BundleError(f"{p}: file listed in the manifest is missing")
            if p.stat().st_size != meta["bytes"]:
                raise BundleError(f"{p}: size {p.stat().st_size} differs from the manifest's {meta['bytes']} (truncated or modified)")
        b = cls(path=path, manifest=manifest)
        if verify:
            b.verify(show_progress)
        return b

    def verify(self, show_progress: bool = False) -> None:
        """Every file's sha256 against the manifest."""
        from tqdm import tqdm
        files = self.manifest["files"]
        with tqdm(total=sum(m["bytes"] for m in files.values()), unit="B", unit_scale=True, desc="verify",
                  disable=not show_progress, file=sys.stderr) as bar:
            for name, meta in files.items():
                if sha256_file(self.path / name, bar.update) != meta["sha256"]:
                    raise BundleError(f"{self.path / name}: checksum differs from the manifest (modified or corrupt)")

    def check_checkpoint(self, ckpt: Path) -> None:
        """Refuse a checkpoint other than the one the bundle was built from."""
        want = self.manifest["checkpoint"]
        ckpt = Path(ckpt)
        if not ckpt.exists():
            raise ActVarError(f"{ckpt}: no such file")
        if ckpt.stat().st_size != want["bytes"] or sha256_file(ckpt) != want["sha256"]:
            raise BundleError(f"{self.path / MANIFEST}: built from another checkpoint "
                              f"(sha256 {want['sha256'][:12]}…), not {ckpt}")


class OlderBundleError(BundleError):
    """A bundle an earlier version of the format wrote."""


def read_manifest(path: Path) -> dict:
    mpath = Path(path) / MANIFEST
    if not mpath.exists():
        raise BundleError(f"{mpath}: missing manifest: not a bundle (or an unfinished build)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{mpath}: not a bundle manifest of format {FORMAT}")
    fmt = manifest.get("format")
    if isinstance(fmt, int) and 0 < fmt < FORMAT:
        raise OlderBundleError(f"{mpath}: a bundle of format {fmt} (this version reads format {FORMAT}): rebuild it "
                          f"with `actvar-export build ... --force`")
    if fmt != FORMAT:
        raise BundleError(f"{mpath}: not a bundle manifest of format {FORMAT}")
    return manifest


def write_manifest(path: Path, manifest: dict) -> None:
    """manifest.json and its field digests (inside a build's temporary directory)."""
    (Path(path) / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (Path(path) / DIGESTS).write_text(json.dumps(field_digests(manifest), indent=1))


def is_bundle(path: Path) -> bool:
    """A directory `build` wrote, of this format or an older one (what `build --force` may replace)."""
    try:
        read_manifest(path)
        return True
    except OlderBundleError:
        return True
    except BundleError:
        return False


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def field_digests(manifest: dict) -> Dict[str, str]:
    """sha256 of every manifest field, one level into objects ('batch', 'model.depth', 'graphs.step_0')."""
    out = {}
    for k, v in manifest.items():
        if isinstance(v, dict) and v:
            out.update({f"{k}.{k2}": _digest(v2) for k2, v2 in v.items()})
        else:
            out[k] = _digest(v)
    return out


def _check_digests(path: Path, manifest: dict) -> None:
    """An edited manifest (still valid JSON) is refused, naming the first field that changed."""
    dpath = path / DIGESTS
    try:
        want = json.loads(dpath.read_text())
    except FileNotFoundError:
        raise BundleError(f"{dpath}: missing: the manifest cannot be checked (rebuild the bundle)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{dpath}: unreadable ({e})") from None
    got = field_digests(manifest)
    if not isinstance(want, dict):
        raise BundleError(f"{dpath}: not a digest table")
    for field in list(want) + [f for f in got if f not in want]:
        if got.get(field) != want.get(field):
            what = "was removed" if field not in got else "was added" if field not in want else "was edited"
            raise BundleError(f"{path / MANIFEST}: field '{field}' {what} after the build (its sha256 differs from "
                              f"{DIGESTS}); rebuild the bundle or restore the manifest")
