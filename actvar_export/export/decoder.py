"""The VQVAE decoder graph: f_hat (B, 32, 16, 16) -> image (B, 3, 256, 256) in [0, 1].

Two layouts of the same function: `nchw` (standard ONNX operators, every runtime) and `nhwc` (ONNX Runtime's CUDA
contrib operators: NhwcConv, and GroupNorm with its SiLU in one kernel; fp16 bundles of the onnxruntime target carry it
beside the portable graph, for the CUDA provider)."""
from __future__ import annotations

from ..vqvae import CH, CH_MULT, NUM_RES_BLOCKS
from .graph import F32, ORT_DOMAIN, Graph, decoder_precision

LAYOUTS = ("nchw", "nhwc")


class DecoderBuilder:
    """The residual stream in fp32; each branch (GroupNorm, its affine, SiLU, the convolutions, attention) in the
    graph precision, cast once from the stream, so that an fp16 decoder moves fp16 activations (GroupNorm's
    statistics are still accumulated in fp32 by the runtime's kernel) and adds the branches to the stream in fp32,
    as fp16 autocast does."""

    def __init__(self, batch: int, store, precision: str, layout: str = "nchw"):
        if layout not in LAYOUTS:
            raise ValueError(layout)
        self.B, self.nhwc = batch, layout == "nhwc"
        self.g = Graph("vqvae_decoder" + ("_nhwc" if self.nhwc else ""), store, decoder_precision(precision))
        self._p_of = {}      # fp32 value made by to_f32 -> the graph-precision value it came from

    def to_p(self, x_f32):
        """fp32 -> the graph precision; a value that to_f32 made from a graph-precision one gives that one back
        (fp16 -> fp32 -> fp16 is exact)."""
        return self._p_of.get(x_f32) or self.g.to_p(x_f32)

    def to_f32(self, x_p):
        y = self.g.to_f32(x_p)
        self._p_of[y] = x_p
        return y

    def conv(self, x_p, key, k=3):
        """Conv in the graph precision (input and output); nhwc: NhwcConv on the same (M, C, k, k) weights."""
        pad = k // 2
        ins = [x_p, self.g.w(f"vae.{key}.weight"), self.g.w(f"vae.{key}.bias")]
        if self.nhwc:
            return self.g.op("NhwcConv", ins, domain=ORT_DOMAIN, kernel_shape=[k, k], pads=[pad] * 4)
        return self.g.op("Conv", ins, kernel_shape=[k, k], pads=[pad] * 4)

    def group_norm(self, x_p, key, C, side, silu=False):
        """GroupNorm(32, eps 1e-6) of x (B, C, side, side) in the graph precision: InstanceNormalization over each
        group's (C/32)·side² values, the per-channel affine, then SiLU if asked. nhwc: x (B, side, side, C) through
        ONNX Runtime's GroupNorm (fp32 statistics, affine and SiLU in fp32, one rounding; its affine in fp32)."""
        g, HW = self.g, side * side
        if self.nhwc:
            gamma, beta = (g.cast(g.w(f"vae.{key}.{n}"), F32, g.P) for n in ("weight", "bias"))
            return g.op("GroupNorm", [x_p, gamma, beta], domain=ORT_DOMAIN, epsilon=1e-6, groups=32,
                        activation=int(silu), channels_last=1)
        ones, zeros = g.ones_zeros(32, g.P)
        y = g.op("InstanceNormalization", [g.reshape(x_p, self.B, 32, (C // 32) * HW), ones, zeros], epsilon=1e-6)
        y = g.reshape(y, self.B, C, HW)
        scale = g.op("Unsqueeze", [g.w(f"vae.{key}.weight"), g.i64(1)])
        shift = g.op("Unsqueeze", [g.w(f"vae.{key}.bias"), g.i64(1)])
        y = g.reshape(g.op("Add", [g.op("Mul", [y, scale]), shift]), self.B, C, side, side)
        return g.silu(y) if silu else y

    def resnet(self, x, key, cin, cout, side):
        xp = self.to_p(x)
        h = self.conv(self.group_norm(xp, f"{key}.norm1", cin, side, silu=True), f"{key}.conv1")
        h = self.conv(self.group_norm(h, f"{key}.norm2", cout, side, silu=True), f"{key}.conv2")
        sc = self.to_f32(self.conv(xp, f"{key}.nin_shortcut", k=1)) if cin != cout else x
        return self.g.op("Add", [sc, self.to_f32(h)])

    def attn(self, x, key, C, side):
        g, HW, B = self.g, side * side, self.B
        h = self.group_norm(self.to_p(x), f"{key}.norm", C, side)
        if self.nhwc:       # tokens × channels already: (B, HW, 3C) -> q, k, v (B, HW, C)
            q, k, v = g.op("Split", [g.reshape(self.conv(h, f"{key}.qkv", k=1), B, HW, 3 * C)], n_out=3, axis=2)
            w = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])])                  # B, HWq, HWk
            w = g.op("Softmax", [g.op("Mul", [g.to_f32(w), g.scalar(C ** -0.5)])], axis=-1)
            o = g.reshape(g.op("MatMul", [g.to_p(w), v]), B, side, side, C)
            return g.op("Add", [x, self.to_f32(self.conv(o, f"{key}.proj_out", k=1))])
        qkv = g.reshape(self.conv(h, f"{key}.qkv", k=1), B, 3, C, HW)
        q, k, v = [g.reshape(g.slice(qkv, [i], [i + 1], [1]), B, C, HW) for i in range(3)]
        w = g.op("MatMul", [g.op("Transpose", [q], perm=[0, 2, 1]), k])                     # B, HWq, HWk
        w = g.op("Softmax", [g.op("Mul", [g.to_f32(w), g.scalar(C ** -0.5)])], axis=-1)
        o = g.op("MatMul", [v, g.op("Transpose", [g.to_p(w)], perm=[0, 2, 1])])             # B, C, HWq
        o = g.reshape(o, B, C, side, side)
        return g.op("Add", [x, self.to_f32(self.conv(o, f"{key}.proj_out", k=1))])

    def upsample(self, h_p, C, side):
        """Nearest ×2 of h (side -> 2·side): Resize (nchw); nhwc: each pixel repeated by one Expand (same values)."""
        g, B = self.g, self.B
        if self.nhwc:
            y = g.op("Expand", [g.reshape(h_p, B, side, 1, side, 1, C), g.i64(B, side, 2, side, 2, C)])
            return g.reshape(y, B, 2 * side, 2 * side, C)
        return g.op("Resize", [h_p, "", "", g.i64(B, C, 2 * side, 2 * side)], mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def build(self):
        g, B = self.g, self.B
        z = g.input("f_hat", F32, [B, 32, 16, 16])
        if self.nhwc:
            z = g.op("Transpose", [z], perm=[0, 2, 3, 1])
        h = self.conv(self.conv(g.to_p(z), "post_quant_conv"), "decoder.conv_in")
        h = self.to_f32(h)
        cin, side = CH * CH_MULT[-1], 16
        h = self.resnet(h, "decoder.mid.block_1", cin, cin, side)
        h = self.attn(h, "decoder.mid.attn_1", cin, side)
        h = self.resnet(h, "decoder.mid.block_2", cin, cin, side)
        for i in reversed(range(len(CH_MULT))):
            cout = CH * CH_MULT[i]
            for j in range(NUM_RES_BLOCKS + 1):
                h = self.resnet(h, f"decoder.up.{i}.block.{j}", cin, cout, side)
                cin = cout
                if i == len(CH_MULT) - 1:
                    h = self.attn(h, f"decoder.up.{i}.attn.{j}", cin, side)
            if i != 0:
                up = self.upsample(self.to_p(h), cin, side)
                side *= 2
                h = self.to_f32(self.conv(up, f"decoder.up.{i}.upsample.conv"))
        h = self.conv(self.group_norm(self.to_p(h), "decoder.norm_out", cin, side, silu=True), "decoder.conv_out")
        img = g.op("Add", [g.op("Mul", [g.op("Clip", [g.to_f32(h), g.scalar(-1.0), g.scalar(1.0)]), g.scalar(0.5)]),
                           g.scalar(0.5)])
        if self.nhwc:
            img = g.op("Transpose", [img], perm=[0, 3, 1, 2])
        g.output(img, "image", F32, [B, 3, 256, 256])
        return g.model()


def build_decoder(batch: int, store, precision: str, layout: str = "nchw"):
    return DecoderBuilder(batch, store, precision, layout).build()
