"""The VQVAE decoder graph: f_hat (B, 32, 16, 16) -> image (B, 3, 256, 256) in [0, 1]."""
from __future__ import annotations

from ..vqvae import CH, CH_MULT, NUM_RES_BLOCKS
from .graph import F32, Graph, decoder_precision


class DecoderBuilder:
    """The residual stream in fp32; each branch (GroupNorm, its affine, SiLU, the convolutions, attention) in the
    graph precision, cast once from the stream, so that an fp16 decoder moves fp16 activations (GroupNorm's
    statistics are still accumulated in fp32 by the runtime's kernel) and adds the branches to the stream in fp32,
    as fp16 autocast does."""

    def __init__(self, batch: int, store, precision: str):
        self.B = batch
        self.g = Graph("vqvae_decoder", store, decoder_precision(precision))
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
        """Conv in the graph precision (input and output)."""
        pad = k // 2
        return self.g.op("Conv", [x_p, self.g.w(f"vae.{key}.weight"), self.g.w(f"vae.{key}.bias")],
                         kernel_shape=[k, k], pads=[pad] * 4)

    def group_norm(self, x_p, key, C, side, silu=False):
        """GroupNorm(32, eps 1e-6) of x (B, C, side, side) in the graph precision: InstanceNormalization over each
        group's (C/32)·side² values, the per-channel affine, then SiLU if asked."""
        g, HW = self.g, side * side
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
        qkv = g.reshape(self.conv(h, f"{key}.qkv", k=1), B, 3, C, HW)
        q, k, v = [g.reshape(g.slice(qkv, [i], [i + 1], [1]), B, C, HW) for i in range(3)]
        w = g.op("MatMul", [g.op("Transpose", [q], perm=[0, 2, 1]), k])                     # B, HWq, HWk
        w = g.op("Softmax", [g.op("Mul", [g.to_f32(w), g.scalar(C ** -0.5)])], axis=-1)
        o = g.op("MatMul", [v, g.op("Transpose", [g.to_p(w)], perm=[0, 2, 1])])             # B, C, HWq
        o = g.reshape(o, B, C, side, side)
        return g.op("Add", [x, self.to_f32(self.conv(o, f"{key}.proj_out", k=1))])

    def build(self):
        g, B = self.g, self.B
        z = g.input("f_hat", F32, [B, 32, 16, 16])
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
                side *= 2
                up = g.op("Resize", [self.to_p(h), "", "", g.i64(B, cin, side, side)], mode="nearest",
                          coordinate_transformation_mode="asymmetric", nearest_mode="floor")
                h = self.to_f32(self.conv(up, f"decoder.up.{i}.upsample.conv"))
        h = self.conv(self.group_norm(self.to_p(h), "decoder.norm_out", cin, side, silu=True), "decoder.conv_out")
        img = g.op("Add", [g.op("Mul", [g.op("Clip", [g.to_f32(h), g.scalar(-1.0), g.scalar(1.0)]), g.scalar(0.5)]),
                           g.scalar(0.5)])
        g.output(img, "image", F32, [B, 3, 256, 256])
        return g.model()


def build_decoder(batch: int, store, precision: str):
    return DecoderBuilder(batch, store, precision).build()
