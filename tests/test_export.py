"""Per-scale ONNX export and the ONNX Runtime backend against the PyTorch reference (CPU, fp32)."""
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from actvar_export import ops
from actvar_export.bundle import Bundle, build_bundle
from actvar_export.checkpoint import build_models, load_checkpoint
from actvar_export.cli import main
from actvar_export.errors import ActVarError
from actvar_export.export.graph import F32, I64, Graph
from actvar_export.export.step import area_matrix, topk_ascending
from actvar_export.generate import SampleSettings
from actvar_export.runtime.ort_runtime import Runtime
from actvar_export.validate import validate_bundle

from .test_cli import assert_one_line_error


@pytest.fixture(scope="module")
def models(actvar_ckpt):
    return build_models(load_checkpoint(actvar_ckpt))


@pytest.fixture(scope="module", params=[("portable", "onnxruntime"), ("plugin", "onnxruntime"), ("portable", "tensorrt")],
                ids=lambda p: "-".join(p))
def bundle(request, actvar_ckpt, tmp_path_factory):
    # batch 3 (odd, not the CLI default) so shape handling is exercised beyond the trivial case; the
    # onnxruntime target's attention is the fused MultiHeadAttention op, the tensorrt target's MatMul/Softmax
    lowering, target = request.param
    out = tmp_path_factory.mktemp("bundles") / f"{lowering}_{target}"
    return Bundle.open(build_bundle(actvar_ckpt, out, batch=3, precision="fp32", lowering=lowering, target=target,
                                    show_progress=False))


def test_teacher_forced_and_end_to_end(bundle, models):
    """Every scale, both lowerings: continuous outputs within 1e-4 of the reference with identical
    inputs, discrete outputs identical (or explained by a sub-tolerance margin), the decoder's image on the
    reference's f_hat within 1e-4; end to end with the
    same noise the fp32 thresholds (≥ 99 % of tokens, ≥ 40 dB PSNR) hold."""
    model, vae = models
    rep = validate_bundle(Runtime(bundle, "cpu"), model, vae, [5, 400, 999], seed=7,
                          settings=SampleSettings(sampler="noise", cfg=4.0, top_k=900, top_p=0.95), precision="fp32")
    assert rep.failures == [], rep.table()
    for s in rep.scales:                     # every scale's continuous outputs compared (decisions injected)
        assert set(s.errors) >= {"logits", "f_hat_out", "kv_out"}
        assert max(s.errors.values()) <= 1e-4
    assert {"sel_idx", "experts"} <= set(rep.scales[8].agreement) and {"sel_idx", "experts"} <= set(rep.scales[9].agreement)
    # the decoder teacher-forced on the reference's final f_hat (fp32 VQVAE decode of it)
    assert rep.decoder.precision == "fp32" and rep.decoder.error <= 1e-4, rep.table()
    # end to end with the same u: the fp32 rule of docs/validation.md (tokens and PSNR; in rep.failures too)
    assert rep.token_agreement >= rep.end_to_end["min_token_agreement"] and rep.psnr_db >= rep.end_to_end["min_psnr_db"]


def test_graphs_check_and_load(bundle):
    m = bundle.manifest
    assert m["ir_version"] <= 10 and m["opset"] == 17
    for name, g in m["graphs"].items():
        path = bundle.path / g["file"]
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        assert proto.ir_version <= 10
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    custom = [n.op_type for n in onnx.load(str(bundle.path / "step_9.onnx"), load_external_data=False).graph.node
              if n.domain == "actvar"]
    if m["lowering"] == "plugin":
        assert custom.count("ActVarTokenScatter") == 2 and custom.count("ActVarExpertFFN") == 2
    else:
        assert custom == []


def test_bundle_holds_one_copy_of_the_weights(bundle, actvar_ckpt):
    sd = torch.load(actvar_ckpt, weights_only=True)
    var_bytes = sum(v.numel() * 4 for k, v in sd["model"].items() if k not in ("lvl_1L", "attn_bias_for_masking"))
    vae_bytes = sum(v.numel() * 4 for k, v in sd["vae"].items() if k.startswith(("decoder.", "post_quant", "quantize.e", "quantize.q")))
    files = bundle.manifest["files"]
    assert files["weights.bin"]["bytes"] <= 1.05 * (var_bytes + vae_bytes)
    assert sum(f["bytes"] for n, f in files.items() if n.endswith(".onnx")) < 0.02 * files["weights.bin"]["bytes"]


@pytest.mark.parametrize("int64_sort", [False, True])
def test_topk_tie_rule_in_onnxruntime(int64_sort):
    g = Graph("t", None, "fp32")
    x = g.input("x", F32, [3, 8])
    g.output(topk_ascending(g, x, 4, int64_sort), "y", I64, [3, 4])
    s = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[1, 5, 3, 5, 3, 3, 0, 0], [0] * 8, [2, 2, 1, 2, 2, 9, 2, 2]], np.float32)
    got = s.run(None, {"x": x})[0]
    assert got.tolist() == ops.topk_ascending(torch.from_numpy(x), 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3], [0, 1, 3, 5]]


def test_area_matrix_is_adaptive_pooling():
    f = torch.randn(2, 32, 16, 16)
    for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13):
        A = torch.from_numpy(area_matrix(16, pn))
        assert torch.allclose(A @ f @ A.T, torch.nn.functional.interpolate(f, size=(pn, pn), mode="area"), atol=1e-6)


def test_build_refuses_bad_options(actvar_ckpt, tmp_path):
    with pytest.raises(ActVarError, match="top-k"):
        build_bundle(actvar_ckpt, tmp_path / "b", top_k=4096, show_progress=False)
    with pytest.raises(ActVarError, match="top-k"):
        build_bundle(actvar_ckpt, tmp_path / "b", top_k=0, show_progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ActVarError, match="--force"):
        build_bundle(actvar_ckpt, tmp_path / "exists", show_progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "exists"]  # nothing half-written


def test_bad_bundles_cli(bundle, actvar_ckpt, tmp_path):
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a], catch_exceptions=False)
    broken = tmp_path / "b"
    shutil.copytree(bundle.path, broken)
    (broken / "step_4.onnx").write_bytes((broken / "step_4.onnx").read_bytes()[:1000])    # truncated graph
    assert_one_line_error(run("validate", "--bundle", broken, "--ckpt", actvar_ckpt), "step_4.onnx", code=2)
    shutil.rmtree(broken)
    shutil.copytree(bundle.path, broken)
    data = bytearray((broken / "step_2.onnx").read_bytes())
    data[-10] ^= 1                                                                           # modified, same size
    (broken / "step_2.onnx").write_bytes(bytes(data))
    assert_one_line_error(run("validate", "--bundle", broken, "--ckpt", actvar_ckpt), "step_2.onnx", "checksum", code=2)
    (broken / "weights.bin").unlink()
    assert_one_line_error(run("sample", "--bundle", broken), "weights.bin", "missing")
    other = tmp_path / "other.pt"
    assert run("init-ckpt", "--depth", 2, "--seed", 9, "--out", other).exit_code == 0
    assert_one_line_error(run("validate", "--bundle", bundle.path, "--ckpt", other), "another checkpoint", code=2)
    assert_one_line_error(run("validate", "--bundle", tmp_path / "none", "--ckpt", other), "no such bundle", code=2)


def test_sample_bundle_refuses_reference_only_options(bundle, tmp_path):
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a], catch_exceptions=False)
    out = tmp_path / "g.png"
    assert_one_line_error(run("sample", "--bundle", bundle.path, "--top-k", 50, "--out", out), "top-k 900")
    assert_one_line_error(run("sample", "--bundle", bundle.path, "--sampler", "official", "--out", out), "noise sampler")
    assert_one_line_error(run("sample", "--bundle", bundle.path, "--precision", "fp16", "--out", out), "--precision")
    assert not out.exists()


def test_stacked_adaln_weights_view_each_block(bundle, actvar_ckpt):
    """Every block's ada_lin weight and bias sit back to back in weights.bin: the one (depth, ...) initializer
    of the step graphs reads exactly the checkpoint's per-block tensors; keys not stored adjacently are refused."""
    from actvar_export.export.weights import WeightStore
    from onnx import numpy_helper
    sd = torch.load(actvar_ckpt, weights_only=True)["model"]
    step = onnx.load(str(bundle.path / "step_3.onnx"), load_external_data=False)
    inits = {t.name: t for t in step.graph.initializer}
    depth = bundle.manifest["model"]["depth"]
    for part in ("weight", "bias"):
        got = numpy_helper.to_array(inits[f"blocks.ada_lin.1.{part}"], base_dir=str(bundle.path))
        want = np.stack([sd[f"blocks.{b}.ada_lin.1.{part}"].numpy() for b in range(depth)])
        np.testing.assert_array_equal(got, want)
    store = WeightStore(sd, torch.load(actvar_ckpt, weights_only=True)["vae"], "fp32")
    with pytest.raises(KeyError, match="back to back"):
        store.stacked_proto("x", ["blocks.1.ada_lin.1.weight", "blocks.0.ada_lin.1.weight"])   # reversed order
