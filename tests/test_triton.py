"""Serving with Triton: a real tritonserver (the nvidia-pytriton wheel's binary) serving the `python`
repository of a tiny bundle through `actvar-export serve`, checked against `actvar-export sample --raw`;
the `onnxruntime` and `tensorrt` repositories are generated and checked against Triton's config schema.
One server for the module; skipped where the wheel or tritonclient is not installed."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from actvar_export.errors import ActVarError

ROOT = Path(__file__).resolve().parents[1]
tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient not installed (pip install -e '.[triton]')")


def _server_or_skip():
    from actvar_export.serving.server import find_server
    try:
        return find_server()
    except ActVarError as e:
        pytest.skip(str(e))


def cli(*args, check=True, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "actvar_export", *map(str, args)], capture_output=True, text=True, env=env, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def bundle(actvar_ckpt, tmp_path_factory):
    from actvar_export.bundle import build_bundle
    return build_bundle(actvar_ckpt, tmp_path_factory.mktemp("tb") / "b4", batch=4, precision="fp32",
                        show_progress=False)


def _ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """`actvar-export serve` on free loopback ports (retried when a port was taken meanwhile)."""
    _server_or_skip()
    from actvar_export.serving.repository import write_repository
    from actvar_export.serving.server import free_port
    repo = write_repository(bundle, tmp_path_factory.mktemp("repo") / "repo")   # the batcher as shipped
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(3):
        http, grpc = free_port(), free_port()
        proc = subprocess.Popen([sys.executable, "-m", "actvar_export", "serve", "--repo", str(repo),
                                 "--http-port", str(http), "--grpc-port", str(grpc)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        end = time.time() + 600
        while time.time() < end and proc.poll() is None and not _ready(http):
            time.sleep(0.3)
        if proc.poll() is None and _ready(http):
            break
        out = proc.communicate(timeout=30)[0] if proc.poll() is not None else ""
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        if "address already in use" not in out.lower():
            pytest.fail(f"serve did not become ready:\n{out[-3000:]}")
    yield {"proc": proc, "http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "repo": repo}
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def test_http_and_grpc_images_equal_sample_raw(server, bundle, tmp_path):
    from actvar_export.serving.client import request_images
    cli("sample", "--bundle", bundle, "--classes", "207,360,387", "--seed", 5, "--out", tmp_path / "s.png",
        "--raw", tmp_path / "s.npy")
    ref = np.load(tmp_path / "s.npy")
    assert ref.shape == (3, 256, 256, 3) and ref.dtype == np.uint8 and ref.std() > 1   # real images, not blank
    r = cli("request", "--url", server["http"], "--classes", "207,360,387", "--seed", 5, "--out", tmp_path / "h.png",
            "--raw", tmp_path / "h.npy")
    assert "3 images" in r.stdout
    assert np.array_equal(np.load(tmp_path / "h.npy"), ref)
    assert np.array_equal(request_images(server["grpc"], [207, 360, 387], 5, "grpc"), ref)
    r = cli("request", "--url", server["grpc"], "--protocol", "grpc", "--shared-memory", "--classes", "207,360,387",
            "--seed", 5, "--out", tmp_path / "g.png", "--raw", tmp_path / "g.npy")
    assert np.array_equal(np.load(tmp_path / "g.npy"), ref)


def test_shared_memory_outputs(server, bundle):
    """Images through a client's system shared-memory region equal those sent over the connection, the region grows
    for a larger request, and closing the client unregisters and removes it."""
    import tritonclient.grpc as tg
    from actvar_export.serving.client import ActVarClient
    with ActVarClient(server["http"], "http") as plain:
        ref1, ref3 = plain.images([5], 1), plain.images([7, 8, 9], 2)
    assert not np.array_equal(ref1[0], ref3[0])
    for protocol in ("http", "grpc"):
        with ActVarClient(server[protocol], protocol, shared_memory=True) as c:
            assert np.array_equal(c.images([5], 1), ref1)
            first = c._region[0]
            assert np.array_equal(c.images([7, 8, 9], 2), ref3)            # a larger region replaces the first
            assert np.array_equal(c.images([5], 1), ref1)                   # the larger region serves a smaller request
            name = c._region[0]
            assert name != first and Path(f"/dev/shm/{name}").exists()
        assert not Path(f"/dev/shm/{name}").exists()
        g = tg.InferenceServerClient(server["grpc"])
        assert not [r for r in g.get_system_shared_memory_status(as_json=True).get("regions", {}) if "actvar_" in r]
        g.close()


def test_concurrent_clients_packed(server, bundle):
    from actvar_export.serving.client import request_images
    from actvar_export.serving.generator import Job, load_generator
    distinct = [((1,), 11), ((1,), 12), ((3,), 13), ((999,), 14)]
    refs = load_generator(bundle).run([Job(c, s) for c, s in distinct])   # this process's own ONNX Runtime run
    for i in range(len(refs)):   # every request has its own images, so a mix-up cannot pass
        assert all(not np.array_equal(refs[i], refs[j]) for j in range(i))
    got, errors = {}, []

    def client(k):
        for j in range(4):
            d = (k + j) % len(distinct)
            try:
                got[(k, j)] = (d, request_images(server["http" if k % 2 else "grpc"], distinct[d][0], distinct[d][1],
                                                 "http" if k % 2 else "grpc"))
            except Exception as e:  # collected and reported below
                errors.append(repr(e))
    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert len(got) == 32
    for (k, j), (d, img) in got.items():
        assert np.array_equal(img, refs[d]), (k, j, distinct[d])
    import tritonclient.http as th
    c = th.InferenceServerClient(server["http"])
    st = c.get_inference_statistics("actvar")["model_stats"][0]
    c.close()
    assert st["execution_count"] < st["inference_count"]
    assert max(b["batch_size"] for b in st["batch_stats"]) > 1, st["batch_stats"]


def test_batch_of_clients_fills_every_execution(server, bundle):
    """B clients (B = the bundle's static batch), started 10 ms apart as independent clients are, send 2 requests each,
    one after the other: in Triton's statistics every execution of the span holds B requests, so no execution pays a
    padded static batch for part of one. (A batcher that dispatches whatever arrived within a short delay runs the
    first client's request alone and the other B-1 in the next execution, and the clients stay split so: the second
    group queues while the first executes and is dispatched the moment the instance frees, before the first group's
    next requests are back.)"""
    from actvar_export.bundle import Bundle
    from actvar_export.serving.client import ActVarClient, batching_between
    B, rounds = Bundle.open(bundle).batch, 2
    clients = [ActVarClient(server["grpc"], "grpc") for _ in range(B)]
    start, shapes, errors = threading.Barrier(B), [], []

    def client(k):
        start.wait()
        time.sleep(0.01 * k)
        for j in range(rounds):
            try:
                shapes.append(clients[k].images([k], 100 * k + j).shape)
            except Exception as e:  # collected and reported below
                errors.append(repr(e))
    with ActVarClient(server["grpc"], "grpc") as probe:
        before = probe.batching()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(B)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        # Triton counts an execution when the model's execute returns, which can be after its responses reached the
        # clients: read until every request of the span is counted (or 30 s pass)
        deadline = time.time() + 30
        while True:
            span = batching_between(before, probe.batching())
            if span["requests"] >= B * rounds or time.time() > deadline:
                break
            time.sleep(0.1)
    for c in clients:
        c.close()
    assert not errors, errors
    assert shapes == [(1, 256, 256, 3)] * (B * rounds)
    assert span["requests"] == B * rounds, span
    assert span["batches"] == {B: rounds} and span["requests_per_execution"] == B, span


def test_batcher_config_and_delay_option(bundle, tmp_path):
    """The `actvar` model's batcher prefers the bundle's batch; --max-queue-delay-us sets the delay (default
    DEFAULT_MAX_QUEUE_DELAY_US) and a negative one is refused before anything is written."""
    from actvar_export.serving.repository import DEFAULT_MAX_QUEUE_DELAY_US
    cli("triton", "--bundle", bundle, "--out", tmp_path / "d")
    cli("triton", "--bundle", bundle, "--out", tmp_path / "u", "--max-queue-delay-us", 7)
    for name, delay in (("d", DEFAULT_MAX_QUEUE_DELAY_US), ("u", 7)):
        db = _parse_configs(tmp_path / name)["actvar"].dynamic_batching
        assert list(db.preferred_batch_size) == [4] and db.max_queue_delay_microseconds == delay, name
    r = cli("triton", "--bundle", bundle, "--out", tmp_path / "n", "--max-queue-delay-us", -1, check=False)
    assert r.returncode != 0 and "--max-queue-delay-us" in r.stderr and not (tmp_path / "n").exists()
    from actvar_export.serving.repository import write_repository
    with pytest.raises(ActVarError, match="--max-queue-delay-us: -1 must be >= 0"):
        write_repository(bundle, tmp_path / "n", max_queue_delay_us=-1)


def _raw_infer(url, arrays):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype
    c = th.InferenceServerClient(url)
    ins = []
    for name, a in arrays.items():
        t = th.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
        t.set_data_from_numpy(a)
        ins.append(t)
    try:
        c.infer("actvar", ins)
    except InferenceServerException as e:
        return str(e)
    finally:
        c.close()
    return None


@pytest.mark.parametrize("arrays, needles", [
    ({"class_labels": np.array([[1, 2]], np.int32), "seed": np.array([[0]], np.int64)}, ["class_labels", "INT32"]),
    ({"class_labels": np.array([[1, 1000]], np.int64), "seed": np.array([[0]], np.int64)}, ["class_labels", "1000"]),
    ({"class_labels": np.zeros((1, 0), np.int64), "seed": np.array([[0]], np.int64)}, ["class_labels", "empty"]),
    ({"class_labels": np.array([[1]], np.int64)}, ["seed"]),
    ({"seed": np.array([[0]], np.int64)}, ["class_labels"]),
    ({"class_labels": np.array([[1]], np.int64), "seed": np.array([[0]], np.int64),
      "top_p": np.array([[1.5]], np.float32)}, ["top_p", "1.5"]),
], ids=["dtype", "class-1000", "no-labels", "no-seed", "no-class_labels", "top_p"])
def test_bad_requests_name_the_problem(server, arrays, needles):
    msg = _raw_infer(server["http"], arrays)
    assert msg is not None, "the bad request succeeded"
    for n in needles:
        assert n in msg, msg
    assert _ready(server["http"].split(":")[1])


def _loadtest(url, bundle, json_out):
    return cli("loadtest", "--url", url, "--concurrency", 4, "--requests", 4, "--distinct", 2, "--seed", 21,
               "--bundle", bundle, "--providers", "cpu", "--json", json_out, check=False)


def test_loadtest_checks_every_image(server, bundle, tmp_path):
    """4 concurrent gRPC clients; every response equals the in-process runtime's images for its classes and seed."""
    r = _loadtest(f"grpc://{server['grpc']}", bundle, tmp_path / "load.json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((tmp_path / "load.json").read_text())
    assert rep["check"] == "bundle" and rep["protocol"] == "grpc" and f"bundle {bundle}" in r.stdout
    assert rep["checked_images"] == rep["images"] == 4 and rep["wrong_images"] == 0 and rep["failed_requests"] == 0
    assert rep["images_per_s"] > 0 and 0 < rep["latency_ms"]["p50"] <= rep["latency_ms"]["p99"]
    for row in ("images/s", "latency p90", "wrong images     0 of 4"):
        assert row in r.stdout, r.stdout


def test_loadtest_fails_on_wrong_images(server, tmp_path):
    """The same loadtest with the expected images of a bundle from another checkpoint: every image is wrong."""
    from actvar_export.bundle import build_bundle
    from actvar_export.checkpoint import save_atomic
    from actvar_export.init import init_checkpoint
    save_atomic(init_checkpoint(2, seed=4), tmp_path / "other.pt")
    other = build_bundle(tmp_path / "other.pt", tmp_path / "other", batch=4, precision="fp32", show_progress=False)
    r = _loadtest(f"http://{server['http']}", other, tmp_path / "load.json")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "Error: 4 wrong images, 0 failed requests"
    rep = json.loads((tmp_path / "load.json").read_text())
    assert rep["wrong_images"] == rep["checked_images"] == 4 and rep["wrong_requests"] == 4


def test_sigterm_stops_server(server):
    """Last test of the module: the serve process and every process of its server are gone within 5 s."""
    proc = server["proc"]
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    assert time.time() - t < 5, out[-2000:]
    assert proc.returncode == 0, out[-2000:]
    assert "stopped (exit 0)" in out
    repo = str(server["repo"])
    left = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if repo in cmd:
                left.append(cmd)
    assert not left, left


def _parse_configs(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    out = {}
    for p in sorted(Path(repo).glob("*/config.pbtxt")):
        out[p.parent.name] = text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())
    return out


def _readme_paths_exist(repo):
    text = (Path(repo) / "README.md").read_text()
    paths = set(re.findall(r"\$REPO/([\w./-]+\w)", text))
    assert paths, "README names no repository files"
    missing = [p for p in paths if not (Path(repo) / p).exists()]
    assert not missing, missing
    return paths


def test_config_schema_rejects_a_broken_config():
    """The schema check used below can fail: an unknown field and a wrong type are rejected."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    from actvar_export.serving.repository import actvar_config
    good = actvar_config(4, 2, 100, "inprocess")
    c = text_format.Parse(good, model_config_pb2.ModelConfig())
    assert c.max_batch_size > 0 and c.dynamic_batching.max_queue_delay_microseconds == 100
    assert c.instance_group[0].count == 2 and c.instance_group[0].kind == 0   # KIND_AUTO: no GPU demanded
    assert [i.name for i in c.input] == ["class_labels", "seed", "cfg", "top_p"] and c.input[2].optional
    for bad in (good.replace("dims:", "dimz:", 1), good.replace("TYPE_INT64", "TYPE_LONG", 1)):
        with pytest.raises(text_format.ParseError):
            text_format.Parse(bad, model_config_pb2.ModelConfig())


def test_onnxruntime_repository(bundle, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from actvar_export.serving.repository import write_repository
    repo = write_repository(bundle, tmp_path / "ort", backend="onnxruntime", instances=2)
    cfgs = _parse_configs(repo)
    assert set(cfgs) == {"actvar", "decoder"} | {f"step_{i}" for i in range(10)}
    man = json.loads((bundle / "manifest.json").read_text())
    for name, c in cfgs.items():
        if name == "actvar":
            assert c.backend == "python" and c.parameters["mode"].string_value == "bls"
            continue
        assert c.platform == "onnxruntime_onnx" and c.max_batch_size == 0
        gi = man["graphs"][name]
        assert {i.name: list(i.dims) for i in c.input} == {k: s for k, (_, s) in gi["inputs"].items()}
        assert {o.name for o in c.output} == set(gi["outputs"])
        assert (repo / name / "1" / "model.onnx").is_file() and (repo / name / "1" / "weights.bin").is_file()
        assert not c.HasField("model_operations")    # a portable bundle needs no custom-op library
    _readme_paths_exist(repo)
    assert not (repo / "plugins").exists()


def test_repository_refusals(bundle, tmp_path):
    from actvar_export.serving.repository import write_repository
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    with pytest.raises(ActVarError, match="not a model repository written by"):
        write_repository(bundle, other, force=True)
    assert (other / "keep.txt").read_text() == "user data"
    r = cli("triton", "--bundle", bundle, "--out", other, check=False)
    assert r.returncode == 1 and "exists: pass --force" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ActVarError, match="no engine for step_0"):
        write_repository(bundle, tmp_path / "trt", backend="tensorrt")
    assert not (tmp_path / "trt").exists()
    repo = write_repository(bundle, tmp_path / "py")
    (repo / "stale").write_text("x")
    write_repository(bundle, repo, force=True)   # its own repository: replaced
    assert not (repo / "stale").exists() and (repo / "actvar" / "config.pbtxt").is_file()


def _custom_nodes(onnx_path):
    import onnx
    return [n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.domain == "actvar"]


def test_onnxruntime_repository_of_plugin_bundle(actvar_ckpt, plugin_build, tmp_path, monkeypatch):
    """A plugin bundle's onnxruntime repository: libactvar_ort_ops.so copied into plugins/ and named by absolute
    path in model_operations of exactly the models whose graphs hold `actvar` nodes. ONNX Runtime, given that
    library, resolves the graphs' custom nodes (they then fail only at kernel lookup: the kernels are CUDA's)."""
    pytest.importorskip("tritonclient.grpc")
    import filecmp
    import onnxruntime as ort
    from actvar_export.bundle import build_bundle
    from actvar_export.serving.repository import write_repository
    if plugin_build["ort_ops"] is None:
        pytest.skip("no ONNX Runtime C API headers: libactvar_ort_ops.so not built")
    b = build_bundle(actvar_ckpt, tmp_path / "bp", batch=1, precision="fp16", lowering="plugin", show_progress=False)
    monkeypatch.setenv("ACTVAR_ORT_OPS_LIB", str(tmp_path / "nowhere" / "libactvar_ort_ops.so"))
    with pytest.raises(ActVarError, match=r"libactvar_ort_ops\.so \(not found at .*nowhere.*cmake --build"):
        write_repository(b, tmp_path / "ort", backend="onnxruntime")
    assert not (tmp_path / "ort").exists()
    monkeypatch.setenv("ACTVAR_ORT_OPS_LIB", str(plugin_build["ort_ops"]))
    r = cli("triton", "--bundle", b, "--out", tmp_path / "ort", "--backend", "onnxruntime")
    assert "wrote" in r.stdout
    repo = (tmp_path / "ort").resolve()
    lib = repo / "plugins" / "libactvar_ort_ops.so"
    assert filecmp.cmp(lib, plugin_build["ort_ops"], shallow=False)
    cfgs = _parse_configs(repo)
    assert set(cfgs) == {"actvar", "decoder"} | {f"step_{i}" for i in range(10)}
    steps = {f"step_{i}" for i in range(10)}
    holding = {n for n in cfgs if n != "actvar" and _custom_nodes(repo / n / "1" / "model.onnx")}
    assert holding and holding <= steps      # the selector's scales; every step model gets the library
    for name, c in cfgs.items():
        assert list(c.model_operations.op_library_filename) == ([str(lib)] if name in steps else []), name
    text = (repo / "README.md").read_text()
    assert '-v "$REPO":"$REPO"' in text and "--model-repository=$REPO" in text and "/models" not in text
    _readme_paths_exist(repo)
    graph = str(repo / "step_9" / "1" / "model.onnx")
    assert {"ActVarTokenScatter", "ActVarExpertFFN"} <= set(_custom_nodes(graph))
    with pytest.raises(Exception, match=r"actvar:ActVar\w+.* is not a registered function/op"):
        ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.register_custom_ops_library(cfgs["step_9"].model_operations.op_library_filename[0])
    with pytest.raises(Exception, match=r"(Could not find an implementation|Failed to find kernel) for (actvar\.)?ActVar"):
        ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def test_tensorrt_repository_of_plugin_engines(actvar_ckpt, plugin_build, tmp_path, monkeypatch):
    """The tensorrt repository's server commands pass the self-registering plugin library (copied into plugins/);
    where only the loadLibrary variant sits beside the library that built the engines, the README says what to build
    and no command names a plugin library."""
    pytest.importorskip("tritonclient.grpc")
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            pytest.skip("neither tensorrt nor tensorrt_rtx imports here")
    if plugin_build["trt"] is None or plugin_build["trt_registered"] is None:
        pytest.skip("TensorRT headers or library missing: the TensorRT plugin libraries were not built")
    import filecmp
    import shutil
    from tritonclient.grpc import model_config_pb2
    from actvar_export.bundle import build_bundle
    b = build_bundle(actvar_ckpt, tmp_path / "bp", batch=1, precision="fp16", lowering="plugin", target="tensorrt",
                     show_progress=False)
    libdir = tmp_path / "lib"    # the loadLibrary variant alone, as a build without -DTensorRT_LIBRARY leaves it
    libdir.mkdir()
    shutil.copy2(plugin_build["trt"], libdir / "libactvar_trt_plugins.so")
    monkeypatch.setenv("ACTVAR_TRT_PLUGIN_LIB", str(libdir / "libactvar_trt_plugins.so"))
    cli("engines", "--bundle", b)
    repo = tmp_path / "trt"
    cli("triton", "--bundle", b, "--out", repo, "--backend", "tensorrt")
    text = (repo / "README.md").read_text()
    assert "--backend-config" not in text and not (repo / "plugins").exists()
    note = [l for l in text.splitlines() if "libactvar_trt_plugins_registered.so" in l]
    assert len(note) == 1 and "-DTensorRT_LIBRARY=" in note[0] and "--target actvar_trt_plugins_registered" in note[0]
    _readme_paths_exist(repo)

    shutil.copy2(plugin_build["trt_registered"], libdir / "libactvar_trt_plugins_registered.so")
    r = cli("triton", "--bundle", b, "--out", repo, "--backend", "tensorrt", "--force")
    assert "wrote" in r.stdout
    lib = repo / "plugins" / "libactvar_trt_plugins_registered.so"
    assert filecmp.cmp(lib, plugin_build["trt_registered"], shallow=False)
    text = (repo / "README.md").read_text()
    flags = re.findall(r"--backend-config=tensorrt,plugins=([^\s`]+)", text)
    assert flags == ["$REPO/plugins/libactvar_trt_plugins_registered.so", "/models/plugins/libactvar_trt_plugins_registered.so\""]
    assert "libactvar_plugins.so" not in text and "## Notes" not in text
    assert "plugins/libactvar_trt_plugins_registered.so" in _readme_paths_exist(repo)
    cfgs = _parse_configs(repo)
    assert len(cfgs) == 12
    for name, c in cfgs.items():
        if name != "actvar":
            assert c.platform == "tensorrt_plan" and not c.HasField("model_operations")
            assert (repo / name / "1" / "model.plan").stat().st_size > 0
            gi = json.loads((b / "manifest.json").read_text())["graphs"][name]
            want = {k: {"P": "TYPE_FP16", "float32": "TYPE_FP32", "int64": "TYPE_INT64"}[t]
                    for k, (t, _) in {**gi["inputs"], **gi["outputs"]}.items()}
            got = {t.name: model_config_pb2.DataType.Name(t.data_type) for t in list(c.input) + list(c.output)}
            assert got == want, name   # the fp16 bundle's per-block KV caches are FP16, the rest as exported


def test_gpus_config(bundle, tmp_path):
    """--gpus 0,1: every model's instance group is KIND_GPU on GPUs 0 and 1 with --instances per GPU, in the
    schema of Triton's model config; without --gpus no kind."""
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import model_config_pb2
    from actvar_export.serving.repository import write_repository
    cli("triton", "--bundle", bundle, "--out", tmp_path / "py", "--gpus", "0,1", "--instances", 2)
    write_repository(bundle, tmp_path / "ort", backend="onnxruntime", gpus=[0, 1])
    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    for repo, n in ((tmp_path / "py", 1), (tmp_path / "ort", 12)):
        cfgs = _parse_configs(repo)
        assert len(cfgs) == n
        for name, c in cfgs.items():
            (g,) = c.instance_group
            assert g.kind == gpu and list(g.gpus) == [0, 1] and g.count == (2 if repo.name == "py" else 1), name
        assert json.loads((repo / ".actvar-repository.json").read_text())["gpus"] == [0, 1]
    (g,) = _parse_configs(write_repository(bundle, tmp_path / "plain"))["actvar"].instance_group
    assert g.kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO and not g.gpus


@pytest.mark.parametrize("gpus, needle", [("0,0", "GPU 0 is listed twice"), ("-1", "-1 is negative"),
                                          ("0,x", "expected 'all' or GPU indices"), ("1,,2", "expected 'all'")])
def test_gpus_option_errors(bundle, tmp_path, gpus, needle):
    r = cli("triton", "--bundle", bundle, "--out", tmp_path / "repo", "--gpus", gpus, check=False)
    assert r.returncode == 1 and r.stderr.startswith(f"Error: invalid --gpus {gpus!r}: ") and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "repo").exists() and not list(tmp_path.iterdir())
    r = cli("serve", "--repo", tmp_path, "--gpus", gpus, check=False)
    assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_gpus_all(monkeypatch):
    from actvar_export import options
    monkeypatch.setattr(options, "visible_gpus", lambda: [])
    with pytest.raises(ActVarError, match="--gpus all: no GPU found here"):
        options.gpus("all")
    monkeypatch.setattr(options, "visible_gpus", lambda: [0, 1, 2])
    assert options.gpus("all") == [0, 1, 2] and options.gpus(" 3,1 ") == [3, 1] and options.gpus(None) is None


def test_placed_view(bundle, tmp_path):
    """serve --gpus serves a view: configs with the new placement, the models' files linked, the repository unchanged."""
    pytest.importorskip("tritonclient.grpc")
    from actvar_export.serving.repository import placed_view, write_repository
    repo = write_repository(bundle, tmp_path / "repo", backend="onnxruntime", instances=3)
    before = {p: p.read_text() for p in repo.glob("*/config.pbtxt")}
    view = placed_view(repo, [2, 3], tmp_path / "view")
    for name, c in _parse_configs(view).items():
        (g,) = c.instance_group
        assert g.kind == g.KIND_GPU and list(g.gpus) == [2, 3] and g.count == 3, name
        assert (view / name / "1").resolve() == (repo / name / "1").resolve()
    assert (view / "step_3" / "1" / "model.onnx").read_bytes() == (repo / "step_3" / "1" / "model.onnx").read_bytes()
    assert {p: p.read_text() for p in repo.glob("*/config.pbtxt")} == before
    back = placed_view(view, None, tmp_path / "back")      # the view is itself a repository (its marker is linked)
    assert {p.relative_to(back): p.read_text() for p in back.glob("*/config.pbtxt")} == \
        {p.relative_to(repo): t for p, t in before.items()}
    (tmp_path / "mine").mkdir()
    with pytest.raises(ActVarError, match="not a model repository written by"):
        placed_view(tmp_path / "mine", [0], tmp_path / "v2")
