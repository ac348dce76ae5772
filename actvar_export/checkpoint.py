"""Checkpoint I/O: strict loading of official VAR / VQVAE state dicts and ActVAR files,
and random-weight checkpoints in the official layout (`init-ckpt`)."""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .config import ActVarConfig, ModelSpec, VarConfig
from .errors import ActVarError, CheckpointError
from .fsutil import atomic_write
from .model import VAR
from .vqvae import VQVAE

VAR_TOP_KEYS = ("pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking", "word_embed.weight",
                "word_embed.bias", "class_emb.weight", "lvl_embed.weight", "head_nm.ada_lin.1.weight",
                "head_nm.ada_lin.1.bias", "head.weight", "head.bias")
ACTVAR_BLOCK_KEYS = ("selector.weight", "selector.bias", "ffn.router.weight", "ffn.router.bias")


def expected_shapes(spec: ModelSpec) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the state dict of `spec`, computed on the meta device (no allocation)."""
    with torch.device("meta"):
        m = VAR(spec)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def vae_expected_shapes() -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):
        m = VQVAE()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def check_state_dict(sd: Dict[str, torch.Tensor], expected: Dict[str, Tuple[int, ...]], what: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key(s)."""
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    bad = [f"{k} has shape {tuple(sd[k].shape)}, expected {expected[k]}"
           for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing key{'s' if len(missing) > 1 else ''} {_few(missing)}")
    if extra:
        problems.append(f"unexpected key{'s' if len(extra) > 1 else ''} {_few(extra)}")
    if bad:
        problems.append(_few(bad, quote=False))
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def _few(items, n=3, quote=True):
    shown = ", ".join(repr(i) if quote else i for i in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _torch_load(path: Path):
    """torch.load(weights_only=True) with one-line errors for missing, truncated, foreign or
    unsafe (arbitrary pickled objects) files."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = _is_zip(path)
    if head[:2] == b"PK" and not is_zip:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint (zip archive without a central directory)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise CheckpointError(f"{path}: refused to unpickle arbitrary objects (loaded with weights_only=True); "
                                  f"a checkpoint must hold only tensors and plain containers") from None
        raise CheckpointError(_foreign(path)) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for foreign bytes
        if is_zip:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
        raise CheckpointError(_foreign(path)) from None


def _foreign(path: Path) -> str:
    if path.stat().st_size == 0:
        return f"{path}: empty file, not a PyTorch checkpoint"
    return (f"{path}: not a PyTorch checkpoint (neither the zip archive torch.save writes nor a legacy "
            f"pickle of tensors)")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


@dataclass
class LoadedCheckpoint:
    spec: ModelSpec
    var_sd: Dict[str, torch.Tensor]
    vae_sd: Optional[Dict[str, torch.Tensor]]
    path: Path
    info: Optional[str] = None        # the wrapper's "info" note (init-ckpt marks random weights there)


def _as_state_dict(obj, path: Path):
    """Unwrap the known containers; returns (state_dict, actvar settings or None, vae sd or None, info note or None)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    settings, vae, info = None, None, None
    if "trainer" in obj:
        tr = obj["trainer"]
        if not isinstance(tr, dict) or "var_wo_ddp" not in tr:
            raise CheckpointError(f"{path}: training checkpoint without ['trainer']['var_wo_ddp']")
        obj = tr["var_wo_ddp"]
    elif "model" in obj and isinstance(obj["model"], dict):
        settings, vae, info = obj.get("actvar"), obj.get("vae"), obj.get("info")
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: no state dict found")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is not a tensor: not a model state dict")
    return obj, settings, vae, (info if isinstance(info, str) else None)


def infer_spec(sd: Dict[str, torch.Tensor], settings: Optional[dict], path: Path,
               overrides: Optional[dict] = None) -> ModelSpec:
    """Depth from the block keys, width check, ActVAR from the router keys and settings."""
    if "blocks.0.attn.mat_qkv.weight" not in sd:
        if "head.weight" in sd or "class_emb.weight" in sd:
            raise CheckpointError(f"{path}: missing key 'blocks.0.attn.mat_qkv.weight': not a VAR checkpoint")
        if "decoder.conv_in.weight" in sd:
            raise CheckpointError(f"{path}: this is a VQVAE checkpoint; pass it with --vae")
        raise CheckpointError(f"{path}: not a VAR checkpoint (no 'blocks.0.attn.mat_qkv.weight')")
    if "blocks.0.attn.scale_mul_1H11" not in sd:
        raise CheckpointError(f"{path}: checkpoint predates normalised attention (no 'blocks.0.attn.scale_mul_1H11'); "
                              f"only attn_l2_norm=True VAR models (the released ones) are supported")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    width = sd["blocks.0.attn.mat_qkv.weight"].shape[1]
    if width != 64 * depth:
        raise CheckpointError(f"{path}: {depth} blocks but width {width}; VAR-d{depth} has width {64 * depth}")
    var = VarConfig(depth=depth)
    has_router = "blocks.0.ffn.router.weight" in sd
    act = None
    if has_router:
        n = sd["blocks.0.ffn.router.weight"].shape[0]
        d = dict(settings or {})
        if "num_experts" in d and d["num_experts"] != n:
            raise CheckpointError(f"{path}: settings say {d['num_experts']} experts but router has {n} rows")
        d["num_experts"] = n
        try:
            act = ActVarConfig.from_dict(d)
        except ActVarError as e:
            raise CheckpointError(f"{path}: stored ActVAR settings: {e}") from None
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        if given:
            act = ActVarConfig.from_dict(act.to_dict() | given)
        if (4 * width) % n:
            raise CheckpointError(f"{path}: {n} experts do not divide the FFN hidden size {4 * width}")
    elif settings:
        raise CheckpointError(f"{path}: ActVAR settings present but no 'blocks.0.ffn.router.weight'")
    return ModelSpec(var=var, actvar=act)


def load_checkpoint(path, vae_path=None, overrides: Optional[dict] = None) -> LoadedCheckpoint:
    path = Path(path)
    sd, settings, vae_sd, info = _as_state_dict(_torch_load(path), path)
    spec = infer_spec(sd, settings, path, overrides)
    check_state_dict(sd, expected_shapes(spec), str(path))
    if vae_path is not None:
        vp = Path(vae_path)
        vobj = _torch_load(vp)
        if isinstance(vobj, dict) and ({"model", "trainer", "blocks.0.attn.mat_qkv.weight"} & set(vobj)):
            raise CheckpointError(f"{vp}: this is a VAR checkpoint, not a VQVAE (--vae expects vae_ch160v4096z32.pth)")
        if not isinstance(vobj, dict) or any(not isinstance(v, torch.Tensor) for v in vobj.values()):
            raise CheckpointError(f"{vp}: expected a flat VQVAE state dict")
        vae_sd = vobj
        where = str(vp)
    else:
        where = f"{path} ['vae']"
    if vae_sd is not None:
        check_state_dict(vae_sd, vae_expected_shapes(), where)
    return LoadedCheckpoint(spec=spec, var_sd=sd, vae_sd=vae_sd, path=path, info=info)


def build_models(ck: LoadedCheckpoint, device="cpu"):
    """(VAR, VQVAE) in eval mode with the checkpoint's weights (strict)."""
    if ck.vae_sd is None:
        raise CheckpointError(f"{ck.path}: no VQVAE weights: pass --vae vae_ch160v4096z32.pth")
    with torch.device("meta"):
        model, vae = VAR(ck.spec), VQVAE()
    model.load_state_dict(ck.var_sd, strict=True, assign=True)
    vae.load_state_dict(ck.vae_sd, strict=True, assign=True)
    model.lvl_1L = model.lvl_1L.long()
    # as in VAR: the VQVAE is frozen (test mode), the transformer's parameters are not; under no_grad
    # this still matters, since a weight that requires grad can take another matmul kernel (1-ulp
    # differences that the official code's own outputs carry)
    vae.requires_grad_(False)
    return model.float().to(device).eval(), vae.float().to(device).eval()


def save_atomic(obj, out: Path) -> None:
    """torch.save to a temporary file beside `out`, then rename: never a half-written file.
    Saved through a file object, so the archive's root is torch's fixed name rather than the temporary
    file's random one: the same object gives the same bytes."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(out, write)
