"""engines/ (the C++ runtime and `actvar-run`) against the Python side, on the CPU.

Builds engines/ with CMake (both backends: the TensorRT one compiles against the SDK headers), then runs
`actvar-run` on tiny fp32 bundles of each lowering and compares its uint8 images with `actvar-export sample
--bundle ... --raw` for the same classes and seed; checks the C++ noise against `noise_for`, the error line
for bad bundles and options, and one AddressSanitizer build + run of the CPU path.
Needs cmake, a C++17 compiler, nlohmann-json (apt: nlohmann-json3-dev), OpenSSL's libcrypto and zlib headers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from actvar_export.bundle import Bundle, build_bundle
from actvar_export.cli import main
from actvar_export.images import to_uint8
from actvar_export.runtime.loop import run_bundle
from actvar_export.runtime.ort_runtime import Runtime
from actvar_export.sampling import noise_for

ROOT = Path(__file__).resolve().parent.parent
SDK = ROOT.parent / "shared" / "sdk"
ORT_INCLUDE = Path(os.environ.get("ACTVAR_ORT_INCLUDE", SDK / "onnxruntime-1.29" / "include"))
TRT_INCLUDE = Path(os.environ.get("ACTVAR_TRT_INCLUDE", SDK / "tensorrt-11.1" / "include"))
ORT_LIB = Path(onnxruntime.__file__).parent / "capi"
CLASSES = "1,500,999"      # 3 images through batch-2 bundles: two batches, the second padded


def _build(build: Path, *extra: str) -> Path:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not on PATH: cannot build engines/ here")
    if not (ORT_INCLUDE / "onnxruntime_c_api.h").is_file():
        pytest.skip(f"no ONNX Runtime C API headers at {ORT_INCLUDE} (set ACTVAR_ORT_INCLUDE)")
    trt = ["-DACTVAR_WITH_TENSORRT=ON", f"-DTensorRT_INCLUDE_DIR={TRT_INCLUDE}"] if shutil.which("nvcc") else \
          ["-DACTVAR_WITH_TENSORRT=OFF"]
    cfg = ["cmake", "-S", str(ROOT / "engines"), "-B", str(build), f"-DONNXRUNTIME_INCLUDE_DIR={ORT_INCLUDE}",
           f"-DONNXRUNTIME_LIB_DIR={ORT_LIB}", *trt, *extra]
    for cmd in (cfg, ["cmake", "--build", str(build), "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return build


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("engines_build"))


@pytest.fixture(scope="module", params=["portable", "plugin"])
def bundle(request, actvar_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpp_bundles") / request.param
    return build_bundle(actvar_ckpt, out, batch=2, precision="fp32", lowering=request.param, show_progress=False)


def actvar_run(build: Path, *args, env=None):
    return subprocess.run([str(build / "actvar-run"), *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=env)


def assert_error_line(r, *words):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_engines_build_both_backends(build_dir):
    assert (build_dir / "actvar-run").is_file() and (build_dir / "libactvar_runtime.so").is_file()
    if shutil.which("nvcc"):   # the TensorRT backend is compiled in, and fails cleanly without TensorRT here
        syms = subprocess.run(["nm", "-DC", str(build_dir / "libactvar_runtime.so")], capture_output=True, text=True).stdout
        assert "createInferRuntime" not in syms   # libnvinfer is opened at run time, not linked


@pytest.mark.parametrize("seed, first, n", [(0, 0, 2), (7, 3, 2), (2 ** 64 - 1, 1, 1), (123456789, 1000, 3)])
def test_cpp_noise_equals_python(build_dir, tmp_path, seed, first, n):
    out = tmp_path / "u.npy"
    r = subprocess.run([str(build_dir / "actvar-noise"), str(seed), str(first), str(n), str(out)], capture_output=True)
    assert r.returncode == 0, r.stderr
    got = np.load(out)
    assert got.dtype == np.float32 and np.array_equal(got, noise_for(n, seed, 680, first_image=first).numpy())


def test_cpp_images_identical_to_python(build_dir, bundle, actvar_ckpt, tmp_path):
    """Same bundle, classes and seed: actvar-run's uint8 images equal `sample --bundle --raw`'s exactly
    (both run the same graphs on ONNX Runtime's CPU provider; for plugin bundles the C++ side runs its own
    CPU kernels of the two custom ops, the Python side its reference ops). Image 2 of the request (in the
    padded second batch) equals that image generated alone through a batch-1 bundle: batching does not matter."""
    r = actvar_run(build_dir, "--bundle", bundle, "--classes", CLASSES, "--seed", 11, "--out", tmp_path / "g.png",
                   "--raw", tmp_path / "cpp.npy")
    assert r.returncode == 0, r.stderr
    assert "3 images" in r.stdout and (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(main, ["sample", "--bundle", str(bundle), "--classes", CLASSES, "--seed", "11",
                                    "--providers", "cpu", "--out", str(tmp_path / "p.png"), "--raw", str(tmp_path / "py.npy")])
    assert res.exit_code == 0, res.output
    cpp, py = np.load(tmp_path / "cpp.npy"), np.load(tmp_path / "py.npy")
    assert cpp.shape == py.shape == (3, 256, 256, 3) and cpp.dtype == py.dtype == np.uint8
    assert int(np.abs(cpp.astype(np.int16) - py).max()) == 0
    assert cpp.std() > 10 and not np.array_equal(cpp[0], cpp[2])    # real, distinct images
    if Path(bundle).name == "portable":   # batching: image 2 of the request alone through a batch-1 bundle
        one = build_bundle(actvar_ckpt, tmp_path / "b1", batch=1, precision="fp32", lowering="portable",
                           show_progress=False)
        u = noise_for(1, 11, 680, first_image=2).numpy()
        img, _, _, _ = run_bundle(Runtime(Bundle.open(one), "cpu"), np.array([999]), u, 1.5, 0.96)
        assert np.array_equal(to_uint8(torch.from_numpy(img))[0], cpp[2])
    # a different seed gives different images (the seed reaches the noise)
    r = actvar_run(build_dir, "--bundle", bundle, "--classes", "1", "--seed", 12, "--out", tmp_path / "g2.png",
                   "--raw", tmp_path / "cpp12.npy")
    assert r.returncode == 0, r.stderr
    assert not np.array_equal(np.load(tmp_path / "cpp12.npy")[0], cpp[0])


def _copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in Path(src).iterdir():   # weights.bin by symlink (265 MB); the small files copied
        (dst / f.name).symlink_to(f) if f.name == "weights.bin" else shutil.copy(f, dst / f.name)
    return dst


def test_bad_bundles_one_error_line(build_dir, bundle, tmp_path):
    base = ["--classes", "1", "--seed", "0", "--out", tmp_path / "g.png"]
    b = _copy_bundle(Path(bundle), tmp_path / "modified")
    data = bytearray((b / "step_3.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "step_3.onnx").write_bytes(bytes(data))
    assert_error_line(actvar_run(build_dir, "--bundle", b, *base), "step_3.onnx", "checksum")

    b = _copy_bundle(Path(bundle), tmp_path / "missing")
    (b / "decoder.onnx").unlink()
    assert_error_line(actvar_run(build_dir, "--bundle", b, *base), "decoder.onnx", "missing")

    b = _copy_bundle(Path(bundle), tmp_path / "truncated_manifest")
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text[: len(text) // 2])
    assert_error_line(actvar_run(build_dir, "--bundle", b, *base), "manifest.json", "unreadable")

    b = _copy_bundle(Path(bundle), tmp_path / "wrong_manifest")
    m = json.loads((b / "manifest.json").read_text())
    m["graphs"]["step_4"]["outputs"]["idx"][1] = [2, 26]       # not the graph's (2, 25)
    (b / "manifest.json").write_text(json.dumps(m))
    assert_error_line(actvar_run(build_dir, "--bundle", b, *base), "manifest.json", "step_4", "idx")

    del m["batch"]
    (b / "manifest.json").write_text(json.dumps(m))
    assert_error_line(actvar_run(build_dir, "--bundle", b, *base), "manifest.json", "'batch'")
    assert not (tmp_path / "g.png").exists()


def test_bad_options_one_error_line(build_dir, bundle, tmp_path):
    base = ["--bundle", bundle, "--out", tmp_path / "g.png"]
    assert_error_line(actvar_run(build_dir, *base, "--classes", "1", "--seed", "-1"), "--seed")
    assert_error_line(actvar_run(build_dir, *base, "--classes", "1,1000", "--seed", "0"), "--classes")
    assert_error_line(actvar_run(build_dir, *base, "--classes", "1", "--seed", "0", "--backend", "x"), "--backend")
    assert_error_line(actvar_run(build_dir, *base, "--classes", "1"), "--seed")
    assert_error_line(actvar_run(build_dir, *base, "--classes", "1", "--seed", "0", "--backend", "tensorrt"), "--device cuda")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert_error_line(actvar_run(build_dir, *base, "--classes", "1", "--seed", "0", "--device", "cuda"), "CUDA")
    assert not (tmp_path / "g.png").exists()


def test_timing_line_is_in_process_median(build_dir, bundle, tmp_path):
    """--iters N --warmup W: the last stdout line is JSON with the median ms of the N timed generations (the
    process start-up and the creation of its sessions excluded); the images are those of a plain run."""
    if Path(bundle).name != "portable":
        pytest.skip("one lowering is enough for the CLI's timing")
    t0 = time.perf_counter()
    r = actvar_run(build_dir, "--bundle", bundle, "--classes", "4,5", "--seed", 9, "--iters", 3, "--warmup", 1,
                   "--no-cuda-graphs", "--out", tmp_path / "g.png", "--raw", tmp_path / "timed.npy")
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""      # no CUDA graph line on the CPU
    t = json.loads(r.stdout.strip().splitlines()[-1])
    assert (t["images"], t["batch"], t["warmup"], t["iters"]) == (2, 2, 1, 3)
    assert t["runtime"].startswith("onnxruntime ") and t["runtime"].endswith(" cpu") and t["cuda_graphs"] == ""
    assert 0 < t["median_ms"] and t["median_ms"] * 1e-3 * (1 + 3) < wall     # 4 generations fit in the process
    assert t["images_per_s"] == pytest.approx(2 / (t["median_ms"] * 1e-3), rel=1e-9)
    r = actvar_run(build_dir, "--bundle", bundle, "--classes", "4,5", "--seed", 9, "--out", tmp_path / "g1.png",
                   "--raw", tmp_path / "plain.npy")
    assert r.returncode == 0, r.stderr
    assert "{" not in r.stdout           # no timing line without --iters
    assert np.array_equal(np.load(tmp_path / "timed.npy"), np.load(tmp_path / "plain.npy"))
    assert_error_line(actvar_run(build_dir, "--bundle", bundle, "--classes", "1", "--seed", 0, "--warmup", 1,
                                 "--out", tmp_path / "g2.png"), "--warmup")


def test_tensorrt_backend_fails_cleanly_without_tensorrt(build_dir, bundle, tmp_path):
    if not shutil.which("nvcc"):
        pytest.skip("built without the TensorRT backend (no CUDA toolkit)")
    import ctypes.util
    if ctypes.util.find_library("nvinfer"):
        pytest.skip("TensorRT is installed here: the GPU check runs the backend (scripts/device_check.sh cpp)")
    r = actvar_run(build_dir, "--bundle", bundle, "--classes", "1", "--seed", "0", "--backend", "tensorrt",
                   "--device", "cuda", "--out", tmp_path / "g.png")
    assert_error_line(r, "TensorRT is not installed")


def test_address_sanitizer_cpu_run(bundle, tmp_path_factory, tmp_path):
    """The CPU path (plugin bundles: the C++ custom-op kernels too) under ASan + UBSan: no error reports.
    Leaks inside ONNX Runtime's own library are suppressed; the runtime's are not. The build is the CPU-only one
    (no CUDA runtime linked), whose --device cuda fails with one line."""
    if Path(bundle).name != "plugin":
        pytest.skip("one ASan run: the plugin bundle exercises every C++ path of the CPU backend")
    build = _build(tmp_path_factory.mktemp("engines_asan"), "-DACTVAR_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug",
                   "-DACTVAR_WITH_TENSORRT=OFF", "-DACTVAR_WITH_CUDA=OFF")
    supp = tmp_path / "lsan.supp"
    supp.write_text("leak:libonnxruntime\n")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=66",
               LSAN_OPTIONS=f"suppressions={supp}:print_suppressions=0", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=67")
    r = actvar_run(build, "--bundle", bundle, "--classes", "3", "--seed", "5", "--out", tmp_path / "g.png",
                   "--raw", tmp_path / "a.npy", env=env)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "ERROR: AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-6000:]
    assert np.load(tmp_path / "a.npy").shape == (1, 256, 256, 3)
    # this build is CPU-only: the CUDA path ends with one error line naming the build
    r = actvar_run(build, "--bundle", bundle, "--classes", "3", "--seed", 5, "--device", "cuda", "--custom-op-library",
                   tmp_path / "none.so", "--out", tmp_path / "g2.png", env=env)
    assert_error_line(r, "--device cuda", "without the CUDA toolkit")
