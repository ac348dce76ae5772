"""The VQVAE decoder graph: f_hat (B, 32, 16, 16) -> image (B, 3, 256, 256) in [0, 1]."""
from __future__ import annotations

from ..vqvae import CH, CH_MULT, NUM_RES_BLOCKS
from .graph import F32, Graph, decoder_precision


class DecoderBuilder:
    def __init__(self, batch: int, store, precision: str):
        self.B = batch
        self.g = Graph("vqvae_decoder", store, decoder_precision(precision))

    def conv(self, x_f32, key, k=3):
        g = self.g
        pad = k // 2
        y = g.op("Conv", [self.g.to_p(x_f32), g.w(f"vae.{key}.weight"), g.w(f"vae.{key}.bias")],
                 kernel_shape=[k, k], pads=[pad] * 4)
        return self.g.to_f32(y)

    def group_norm(self, x, key, C, HW):
        """GroupNorm(32, eps 1e-6): InstanceNormalization over each group's (C/32)·H·W values, then
        the per-channel affine."""
        g = self.g
        ones, zeros = g.ones_zeros(32)
        y = g.op("InstanceNormalization", [g.reshape(x, self.B, 32, (C // 32) * HW), ones, zeros], epsilon=1e-6)
        y = g.reshape(y, self.B, C, HW)
        scale = g.op("Unsqueeze", [self.g.to_f32(g.w(f"vae.{key}.weight")), g.i64(1)])
        shift = g.op("Unsqueeze", [self.g.to_f32(g.w(f"vae.{key}.bias")), g.i64(1)])
        return g.op("Add", [g.op("Mul", [y, scale]), shift])

    def resnet(self, x, key, cin, cout, side):
        g, HW = self.g, side * side
        h = g.reshape(x, self.B, cin, HW)
        h = g.silu(g.reshape(self.group_norm(h, f"{key}.norm1", cin, HW), self.B, cin, side, side))
        h = self.conv(h, f"{key}.conv1")
        h = g.silu(g.reshape(self.group_norm(g.reshape(h, self.B, cout, HW), f"{key}.norm2", cout, HW), self.B, cout, side, side))
        h = self.conv(h, f"{key}.conv2")
        sc = self.conv(x, f"{key}.nin_shortcut", k=1) if cin != cout else x
        return g.op("Add", [sc, h])

    def attn(self, x, key, C, side):
        g, HW, B = self.g, side * side, self.B
        h = g.reshape(self.group_norm(g.reshape(x, B, C, HW), f"{key}.norm", C, HW), B, C, side, side)
        qkv = g.reshape(self.conv(h, f"{key}.qkv", k=1), B, 3, C, HW)
        q, k, v = [g.reshape(g.slice(qkv, [i], [i + 1], [1]), B, C, HW) for i in range(3)]
        w = g.op("MatMul", [g.op("Transpose", [self.g.to_p(q)], perm=[0, 2, 1]), self.g.to_p(k)])     # B, HWq, HWk
        w = g.op("Softmax", [g.op("Mul", [self.g.to_f32(w), g.scalar(C ** -0.5)])], axis=-1)
        o = g.op("MatMul", [self.g.to_p(v), g.op("Transpose", [self.g.to_p(w)], perm=[0, 2, 1])])    # B, C, HWq
        o = g.reshape(self.g.to_f32(o), B, C, side, side)
        return g.op("Add", [x, self.conv(o, f"{key}.proj_out", k=1)])

    def build(self):
        g, B = self.g, self.B
        z = g.input("f_hat", F32, [B, 32, 16, 16])
        h = self.conv(z, "post_quant_conv")
        cin, side = CH * CH_MULT[-1], 16
        h = self.conv(h, "decoder.conv_in")
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
                h = g.op("Resize", [h, "", "", g.i64(B, cin, side, side)], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor")
                h = self.conv(h, f"decoder.up.{i}.upsample.conv")
        h = g.silu(g.reshape(self.group_norm(g.reshape(h, B, cin, side * side), "decoder.norm_out", cin, side * side), B, cin, side, side))
        h = self.conv(h, "decoder.conv_out")
        img = g.op("Add", [g.op("Mul", [g.op("Clip", [h, g.scalar(-1.0), g.scalar(1.0)]), g.scalar(0.5)]), g.scalar(0.5)])
        g.output(img, "image", F32, [B, 3, 256, 256])
        return g.model()


def build_decoder(batch: int, store, precision: str):
    return DecoderBuilder(batch, store, precision).build()
