"""One shared weights file for all graphs of a bundle (ONNX external data)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterable, Tuple

import numpy as np
import torch
from onnx import TensorProto

from .graph import BF16, F16, F32, PRECISION_TYPES, decoder_precision

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096
_TORCH = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
_SIZE = {F32: 4, F16: 2, BF16: 2}

# kept in float32 whatever the precision: the residual-stream embeddings, the attention scale,
# and the VQVAE pieces of the sampler path (codebook, Phi), which the reference runs in fp32 too
_FP32_KEYS = ("class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight")
_FP32_PARTS = ("scale_mul_1H11", "vae.quantize.")
# the decoder graph's weights, stored in its precision (graph.decoder_precision)
_DECODER_PARTS = ("vae.decoder.", "vae.post_quant_conv.")


# per-block tensors stored back to back in block order, so that one (depth, ...) initializer views them all
# (`WeightStore.stacked_proto`): every block's adaLN from one GEMM
STACKED = ("ada_lin.1.weight", "ada_lin.1.bias")


def stacked_keys(suffix: str, depth: int):
    return [f"blocks.{b}.{suffix}" for b in range(depth)]


def _wanted(var_keys: Iterable[str], vae_keys: Iterable[str]):
    """(keys in file order, keys placed right after the previous one without alignment padding)."""
    skip = ("lvl_1L", "attn_bias_for_masking")
    out = [k for k in var_keys if k not in skip and not k.endswith("zero_k_bias")]
    out += ["vae." + k for k in vae_keys
            if k.startswith(("decoder.", "post_quant_conv.", "quantize.embedding", "quantize.quant_resi"))]
    depth = sum(1 for k in out if k.endswith("." + STACKED[0]) and k.startswith("blocks."))
    groups = [stacked_keys(suffix, depth) for suffix in STACKED]
    grouped = {k for grp in groups for k in grp}
    if not grouped <= set(out):
        return sorted(out), set()
    return [k for grp in groups for k in grp] + sorted(set(out) - grouped), {k for grp in groups for k in grp[1:]}


class WeightStore:
    """Plans the layout of weights.bin (every tensor once, 4 KiB aligned), hands out external-data
    TensorProtos for the graphs, and streams the converted tensors to disk."""

    def __init__(self, var_sd: Dict[str, torch.Tensor], vae_sd: Dict[str, torch.Tensor], precision: str):
        self.P = PRECISION_TYPES[precision]
        self.P_decoder = PRECISION_TYPES[decoder_precision(precision)]
        self.src = dict(var_sd)
        self.src.update({"vae." + k: v for k, v in vae_sd.items()})
        self.layout: Dict[str, Tuple[int, int, int, tuple]] = {}  # key -> (dtype, offset, nbytes, shape)
        self.stacked: Dict[str, list] = {}                          # stacked initializer -> its keys
        off = end = 0
        keys, packed = _wanted(var_sd.keys(), vae_sd.keys())
        for k in keys:
            dt = self.dtype(k)
            shape = tuple(self.src[k].shape)
            n = int(np.prod(shape, dtype=np.int64)) * _SIZE[dt]
            off = end if k in packed else (end + ALIGN - 1) // ALIGN * ALIGN
            self.layout[k] = (dt, off, n, shape)
            end = off + n
        self.total_bytes = (end + ALIGN - 1) // ALIGN * ALIGN

    def dtype(self, key: str) -> int:
        if key in _FP32_KEYS or any(p in key for p in _FP32_PARTS):
            return F32
        return self.P_decoder if key.startswith(_DECODER_PARTS) else self.P

    def tensor_proto(self, key: str) -> TensorProto:
        if key not in self.layout:
            raise KeyError(f"weight {key!r} is not in the bundle's weight file")
        dt, off, n, shape = self.layout[key]
        t = TensorProto()
        t.name, t.data_type = key, dt
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(off)), ("length", str(n))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def stacked_proto(self, name: str, keys) -> TensorProto:
        """One initializer `name` of shape (len(keys),) + the keys' shape viewing their adjacent bytes."""
        first = self.tensor_proto(keys[0])
        dt, off, n, shape = self.layout[keys[0]]
        for i, k in enumerate(keys):
            if self.layout.get(k, (None,))[0] != dt or self.layout[k][1:] != (off + i * n, n, shape):
                raise KeyError(f"weights {keys[0]!r}..{keys[-1]!r} are not stored back to back")
        self.stacked[name] = list(keys)
        first.name = name
        del first.dims[:]
        first.dims.extend((len(keys),) + shape)
        for e in first.external_data:
            if e.key == "length":
                e.value = str(n * len(keys))
        return first

    def array(self, key: str) -> np.ndarray:
        """The converted tensor as numpy (bf16 as uint16 bits); a stacked initializer's keys stacked."""
        if key in self.stacked:
            return np.stack([self.array(k) for k in self.stacked[key]])
        dt = self.layout[key][0]
        t = self.src[key].detach().to("cpu", _TORCH[dt]).contiguous()
        return t.view(torch.int16).numpy().view(np.uint16) if dt == BF16 else t.numpy()

    def write(self, path: Path, progress=None) -> str:
        """Write weights.bin; returns its sha256."""
        h = hashlib.sha256()
        with open(path, "wb") as f:
            pos = 0
            for key, (dt, off, n, shape) in self.layout.items():
                if off > pos:
                    pad = b"\0" * (off - pos)
                    f.write(pad)
                    h.update(pad)
                data = self.array(key).tobytes()
                assert len(data) == n, key
                f.write(data)
                h.update(data)
                pos = off + n
                if progress:
                    progress(n)
            if self.total_bytes > pos:
                pad = b"\0" * (self.total_bytes - pos)
                f.write(pad)
                h.update(pad)
        return h.hexdigest()
