"""Request packing (serving.generator) over a stand-in backend, request checks, and the uint8 conversion:
no Triton needed."""
import numpy as np
import pytest
import torch

from actvar_export.errors import ActVarError
from actvar_export.runtime.loop import run_bundle
from actvar_export.serving.generator import BundleGenerator, Job, check_job

class RowBackend:
    """A backend whose decoder image row depends only on that row's label and uniforms (as the real graphs'
    rows do), so packing, padding and splitting must leave every job's images unchanged."""

    def __init__(self):
        self.batches = []

    def infer(self, name, feed):
        if name == "decoder":
            f = feed["f_hat"]
            return {"image": np.broadcast_to(f[:, :3, :1, :1], (f.shape[0], 3, 256, 256)).astype(np.float32)}
        lab, u = feed["labels"], feed["u"]
        if name == "step_0":
            self.batches.append(lab.tolist())
        prev = feed.get("f_hat_in", np.zeros((len(lab), 32, 16, 16), np.float32))
        f = prev.copy()
        f[:, 0] = (lab[:, None, None] % 7) / 7 + 0 * f[:, 0]
        f[:, 1] = u[:, :1, None]           # this row's own uniforms
        f[:, 2] = feed["cfg"][0] / 10 + feed["top_p"][0] / 10
        return {"idx": np.zeros(u.shape, np.int64), "f_hat_out": f, "x_next": lab}

    def generate(self, labels_B, u_BL, cfg, top_p, progress=None):   # the runtime's contract, over infer()
        images, ids, _, _ = run_bundle(self, labels_B, u_BL, cfg, top_p, progress=progress)
        return images, ids


def test_packing_never_changes_a_jobs_images():
    jobs = [Job((5,), 1), Job((1, 2, 3), 2), Job((7,), 3, cfg=3.0), Job(tuple(range(9)), 4), Job((5,), 1)]
    alone = [BundleGenerator(4, RowBackend(), "row").run([j])[0] for j in jobs]
    be = RowBackend()
    gen = BundleGenerator(4, be, "row")
    packed = gen.run(jobs)
    for j, a, p in zip(jobs, alone, packed):
        assert p.shape == (len(j.labels), 256, 256, 3) and p.dtype == np.uint8
        assert np.array_equal(a, p), j
    assert np.array_equal(packed[0], packed[4])
    assert not np.array_equal(packed[0], packed[1][:1])   # different seeds/labels: the check can fail
    # cfg 1.5 jobs (1 + 3 + 9 + 1 = 14 images) fill 4 runs of 4, the cfg 3.0 job its own padded run
    assert gen.runs == 5 and [len(b) for b in be.batches] == [4] * 5
    assert be.batches[3] == [8, 5, 5, 5]    # the last rows padded by repeating the last real one


@pytest.mark.parametrize("args, needle", [
    (([], 0, 1.5, 0.9), "class_labels is empty"),
    (([1, 1000], 0, 1.5, 0.9), "1000 is not an ImageNet class id"),
    (([-1], 0, 1.5, 0.9), "-1 is not an ImageNet class id"),
    (([1], -3, 1.5, 0.9), "seed: -3"),
    (([1], 0, float("nan"), 0.9), "cfg: nan"),
    (([1], 0, 1.5, 1.2), "top_p: 1.2"),
    ((list(range(1025)), 0, 1.5, 0.9), "at most 1024"),
])
def test_check_job_names_the_input(args, needle):
    with pytest.raises(ActVarError, match=needle.replace("(", r"\(")):
        check_job(*args)
    assert check_job([1, 2], 7, 2.0, 0.5) == Job((1, 2), 7, 2.0, 0.5)


def test_to_uint8_equals_torch_rounding():
    from actvar_export.images import to_uint8
    x = torch.rand(3, 3, 8, 8) * 1.4 - 0.2
    x[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])   # ties and the top end
    want = x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(to_uint8(x), want)
    assert np.array_equal(to_uint8(x.numpy()), want)


def test_to_uint8_tensor_is_to_uint8_bit_for_bit():
    """The device-side conversion (to_uint8_tensor) against the host one on every rounding tie and its float32
    neighbours (x·255 within a few ulps of k + 0.5), the ends of [0, 1], values outside it, and fp16 input."""
    from actvar_export.images import to_uint8, to_uint8_tensor
    ties = np.float32((np.arange(256) + 0.5) / 255)
    near = np.concatenate([ties + np.float32(d) * np.spacing(ties) for d in range(-4, 5)])
    x = np.concatenate([near, np.float32([0, 1, -0.3, 1.7, 1e-9, 1 - 2 ** -24, 0.5])])
    x = np.resize(x, 3 * 8 * ((x.size + 23) // 24) * 1).reshape(-1, 3, 8, 1).astype(np.float32)
    got = to_uint8_tensor(torch.from_numpy(x)).contiguous().numpy()
    assert np.array_equal(got, to_uint8(x))
    assert len(np.unique(to_uint8(x))) > 200                     # the sweep crosses (nearly) every level
    h = torch.from_numpy(x).half()
    assert np.array_equal(to_uint8_tensor(h).contiguous().numpy(), to_uint8(h.float().numpy()))


def test_request_noise_is_the_requests_uniforms():
    from actvar_export.config import TOTAL_TOKENS
    from actvar_export.sampling import noise_for, request_noise
    u = request_noise(3, 9)
    assert u.shape == (3, TOTAL_TOKENS) and u.dtype == np.float32 and 0 <= u.min() and u.max() < 1
    assert np.array_equal(u, noise_for(3, 9, TOTAL_TOKENS).numpy())
    assert not np.array_equal(u, request_noise(3, 10))


def test_no_server_is_one_clear_error(monkeypatch, tmp_path):
    import importlib.util
    from actvar_export.serving import server
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ActVarError, match="no Triton server found"):
        server.find_server()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"')
    with pytest.raises(ActVarError, match="no Triton server found"):
        server.TritonServer(tmp_path).start()


def test_sample_reference_raw(actvar_ckpt, tmp_path):
    """`sample --ckpt ... --raw`: the uint8 images of the grid, as .npy (the bundle path: tests/test_triton.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from PIL import Image
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "actvar_export", "sample", "--ckpt", str(actvar_ckpt), "--classes", "1,2",
                        "--sampler", "noise", "--out", str(tmp_path / "g.png"), "--raw", str(tmp_path / "g.npy")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    raw = np.load(tmp_path / "g.npy")
    assert raw.shape == (2, 256, 256, 3) and raw.dtype == np.uint8 and raw.std() > 1
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    # the grid's first tile (4 px margin, 18 px title row) is the first raw image
    assert np.array_equal(grid[22:22 + 256, 4:4 + 256], raw[0])


def test_image_check_counts_wrong_images():
    """Both references of `loadtest`: a changed pixel, a wrong shape or dtype, and (determinism rule) a response
    that differs from the first one to the same request are counted image by image."""
    from actvar_export.serving.loadtest import ImageCheck
    rng = np.random.default_rng(0)
    a, b = Job((1, 2), 5), Job((3,), 6)
    imgs = {a: rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8), b: rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)}
    chk = ImageCheck({k: v.copy() for k, v in imgs.items()})
    assert chk.mode == "bundle" and chk(a, imgs[a]) == 0 and chk(b, imgs[b]) == 0
    off = imgs[a].copy()
    off[1, 100, 7, 2] ^= 1
    assert chk(a, off) == 1 and chk(a, imgs[a][:1]) == 2 and chk(b, imgs[b].astype(np.int16)) == 1
    assert chk(b, imgs[a][:1]) == 1          # another request's image
    assert (chk.checked, chk.wrong, chk.wrong_requests) == (9, 5, 4)
    det = ImageCheck()
    assert det.mode == "determinism" and det(a, imgs[a]) == 0 and det.checked == 0   # the first is the reference
    assert det(a, imgs[a].copy()) == 0 and det(a, off) == 1 and det(b, imgs[b]) == 0 and det(b, imgs[a][1:]) == 1
    assert (det.checked, det.wrong) == (5, 2)


def test_instance_device_and_url():
    from actvar_export.serving.client import split_url
    from actvar_export.serving.generator import instance_device
    assert instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "3"}) == ("cuda", 3)
    assert instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == (None, 0)
    assert split_url("grpc://h:8001") == ("h:8001", "grpc") and split_url("h:8000") == ("h:8000", "http")
    assert split_url("h:8001", "grpc") == ("h:8001", "grpc")
    with pytest.raises(ActVarError, match="is http but --protocol is grpc"):
        split_url("http://h:8000", "grpc")
    with pytest.raises(ActVarError, match="unknown scheme https://"):
        split_url("https://h:8000")
