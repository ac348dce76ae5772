"""The bundle runtime's buffer plan on the CPU provider (the same plan as on CUDA, torch CPU buffers), and
`bench` on the CPU. GPU checks (CUDA graphs, device arena) are marked `gpu`."""
import json

import numpy as np
import pytest

from actvar_export.bundle import Bundle, build_bundle
from actvar_export.config import NUM_SCALES, TOTAL_TOKENS
from actvar_export.errors import ActVarError
from actvar_export.runtime.loop import run_bundle
from actvar_export.runtime.ort_runtime import Runtime
from actvar_export.sampling import noise_for

from .test_cli import run


@pytest.fixture(scope="module")
def bundle(actvar_ckpt, tmp_path_factory):
    return Bundle.open(build_bundle(actvar_ckpt, tmp_path_factory.mktemp("rt") / "b2", batch=2, precision="fp32",
                                    show_progress=False))


@pytest.fixture(scope="module")
def rt(bundle):
    return Runtime(bundle, "cpu")


def test_generate_matches_the_host_loop(rt, bundle):
    """Bound, chained buffers give the ids and image of the plain loop (host arrays through `infer`), and a
    second call with other noise overwrites every bound input (the ids follow the new noise)."""
    lab = np.array([5, 400])
    for seed in (3, 4):
        u = noise_for(2, seed, TOTAL_TOKENS).numpy()
        img, ids = rt.generate(lab, u, 1.5, 0.96)
        ref_img, ref_ids, _, _ = run_bundle(rt, lab, u, 1.5, 0.96)
        assert [i.shape for i in ids] == [r.shape for r in ref_ids]
        assert all((a == r).all() for a, r in zip(ids, ref_ids))
        np.testing.assert_array_equal(img, ref_img)
    other = run_bundle(rt, lab, noise_for(2, 3, TOTAL_TOKENS).numpy(), 1.5, 0.96)[1]
    assert sum(int((a != o).sum()) for a, o in zip(ids, other)) > 0     # the check above can fail


def test_generate_uint8_is_to_uint8_of_the_float_images(rt):
    """uint8=True converts on the runtime's device; the images equal images.to_uint8 of the float images, and the
    float images of the same call's buffers are untouched by it (a later float call still returns them)."""
    from actvar_export.images import to_uint8
    lab, u = np.array([7, 900]), noise_for(2, 5, TOTAL_TOKENS).numpy()
    u8, ids8 = rt.generate(lab, u, 1.5, 0.96, uint8=True)
    img, ids = rt.generate(lab, u, 1.5, 0.96)
    assert u8.dtype == np.uint8 and u8.shape == (2, 256, 256, 3) and u8.flags.c_contiguous
    assert np.array_equal(u8, to_uint8(img)) and u8.std() > 1
    assert all((a == b).all() for a, b in zip(ids8, ids))


def test_buffer_plan(rt, bundle):
    """One copy of the weights (every initializer of every session is a view of one buffer), outputs of
    step si bound at the very addresses step si+1 reads, the environment arena for every session."""
    rt.generate(np.array([1, 2]), noise_for(2, 0, TOTAL_TOKENS).numpy(), 1.5, 0.96)
    buf, inits = rt.weights_buffer()
    assert buf.numel() == bundle.manifest["files"]["weights.bin"]["bytes"]
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    assert inits and all(lo <= v.data_ptr() < hi and ov.data_ptr() == v.data_ptr() for v, ov in inits.values())
    addr = rt.bound_addresses()
    assert len(addr) == NUM_SCALES + 1
    carried = bundle.manifest["carried"]
    assert {"x_in", "f_hat_in", "k_in.0", "v_in.0"} <= set(carried)
    for si in range(1, NUM_SCALES):
        assert set(carried) <= set(addr[si])
        for i, o in carried.items():
            assert addr[si][i] == addr[si - 1][o], (si, i)
            assert addr[si].get(o) != addr[si][i], (si, o)     # ping-pong: never written where it is read
    cache_out = [a for n, a in addr[NUM_SCALES - 1].items() if n[:6] in ("k_out.", "v_out.")]
    assert len(set(cache_out)) == len(cache_out) == 2 * bundle.manifest["model"]["depth"]
    assert addr[NUM_SCALES]["f_hat"] == addr[NUM_SCALES - 1]["f_hat_out"]
    for s in rt._sessions.values():
        assert s.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"


def test_generate_refuses_wrong_shapes(rt):
    with pytest.raises(ActVarError, match="batch 2"):
        rt.generate(np.array([1, 2, 3]), np.zeros((3, TOTAL_TOKENS), np.float32), 1.5, 0.96)
    with pytest.raises(ActVarError, match="unknown device"):
        Runtime(rt.bundle, "tpu")


def test_bench_cli_on_cpu_writes_json(bundle, actvar_ckpt, tmp_path):
    out = tmp_path / "bench.json"
    r = run("bench", "--bundle", bundle.path, "--iters", "1", "--warmup", "0", "--providers", "cpu",
            "--check-ids", "--json", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    rtm = res["runtime"]
    assert res["bundle"]["batch"] == 2 and len(rtm["seconds_per_batch"]) == 1
    assert len(rtm["ms_per_scale"]) == NUM_SCALES and all(t > 0 for t in rtm["ms_per_scale"])
    assert rtm["images_per_s"] == pytest.approx(2 / rtm["median_seconds_per_batch"])
    assert sum(rtm["ms_per_scale"]) <= 1e3 * rtm["median_seconds_per_batch"]
    assert res["ids_equal_without_graphs"] is True
    assert "images / s" in r.output and "scale 9 (16x16)" in r.output


@pytest.mark.gpu
def test_cuda_graph_ids_equal_plain_run(bundle):
    """CUDA: every step captured as a graph, and the ids equal those of the unbound, graph-free loop."""
    import onnxruntime as ort
    import torch
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA device and onnxruntime-gpu")
    rt = Runtime(bundle, "cuda")
    lab, u = np.array([5, 400]), noise_for(2, 3, TOTAL_TOKENS).numpy()
    for _ in range(3):
        _, ids = rt.generate(lab, u, 1.5, 0.96)
    _, ref_ids, _, _ = run_bundle(rt, lab, u, 1.5, 0.96, decode=False)
    assert all((a == r).all() for a, r in zip(ids, ref_ids))
    assert "11/11" in rt.graph_report(), rt.graph_report()
    u8, ids8 = rt.generate(lab, u, 1.5, 0.96, uint8=True)        # converted on the GPU, after the captured graphs
    img, _ = rt.generate(lab, u, 1.5, 0.96)
    from actvar_export.images import to_uint8
    assert np.array_equal(u8, to_uint8(img)) and u8.std() > 1
    assert all((a == r).all() for a, r in zip(ids8, ref_ids))


def test_extra_cuda_options_parse_and_refuse():
    """ACTVAR_ORT_CUDA_OPTIONS: key=value pairs pass through; a malformed entry or an option the runtime sets
    itself is one ActVarError naming the variable."""
    from actvar_export.runtime.ort_runtime import extra_cuda_options
    assert extra_cuda_options(" fuse_conv_bias=1, prefer_nhwc = 1,") == {"fuse_conv_bias": "1", "prefer_nhwc": "1"}
    assert extra_cuda_options("") == {}
    for bad, what in (("fuse_conv_bias", "is not key=value"), ("=1", "is not key=value"),
                      ("enable_cuda_graph=0", "set by the runtime"), ("use_tf32=1", "set by the runtime")):
        with pytest.raises(ActVarError, match=what) as e:
            extra_cuda_options(bad)
        assert "ACTVAR_ORT_CUDA_OPTIONS" in str(e.value) and "\n" not in str(e.value)
