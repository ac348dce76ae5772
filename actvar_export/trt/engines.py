"""Parse a bundle's ONNX graphs with TensorRT and serialize one engine per graph.

`build_engines(bundle_dir)` checks the bundle against its manifest, then, per graph: parses it with the
ONNX parser into a strongly typed network (precision comes from the graph), loading the C++ plugin library
libactvar_trt_plugins.so (plugin_library.py) first when the bundle's lowering is `plugin`; collects every parser
error; confirms that every `ActVarTokenScatter` / `ActVarExpertFFN` node became a PLUGIN_V3 layer of that library and
that the network's inputs and outputs have the dtypes and shapes the manifest declares; builds the
serialized engine and writes `<graph>.engine` atomically (temporary file + rename) into the bundle.
`engines.json` (beside manifest.json, which is not modified) lists files, sizes, sha256, the TensorRT
module and version, the plugin library's path, version and sha256, and says that the engines have not been run.

The parsing and building run in one child process (`python -m actvar_export.trt.engines --worker`):
- TensorRT reports some failures by aborting the process (std::terminate); in a child they become an
  ActVarError naming the graph instead of killing the caller.
- TensorRT-RTX 1.7's ONNX parser dlopen()s the unversioned name `libtensorrt_rtx.so` when it imports a
  plugin node, but the wheel ships only `libtensorrt_rtx.so.1` (the process aborts with "Unable to open
  library: libtensorrt_rtx.so"). When that name cannot be loaded, the child gets LD_LIBRARY_PATH with a
  private temporary directory holding a symlink of that name to the loaded library (the installation is
  not modified; glibc reads LD_LIBRARY_PATH only at process start, hence the child).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from ..errors import ActVarError
from ..bundle import sha256_file
from ..fsutil import default_mode, remove_stale, temp_prefix, write_json_atomic

ENGINES_JSON = "engines.json"
ENGINES_FORMAT = 1
MARK = "@@actvar-engines "
CUSTOM_DOMAIN = "actvar"
# TensorRT module -> library name its ONNX parser dlopen()s without a version suffix
_LIB_ALIASES = {"tensorrt_rtx": "libtensorrt_rtx.so"}
_TAGS = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
         "bool": "BOOL", "uint8": "UINT8", "int8": "INT8"}
_PRECISION = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}


def engine_file(name: str) -> str:
    return f"{name}.engine"


def not_runnable_reason(module: str) -> str:
    base = ("built and serialized only: actvar-export has no TensorRT runner, and no engine has been "
            "executed or compared with the reference anywhere")
    if module == "tensorrt_rtx":
        return (base + "; TensorRT-RTX engines refuse the lent GPUs (Hopper, compute capability 9.0; "
                "supported: 8.0, 8.6, 8.9, 12.0+) and the build machine has no GPU")
    return base


# ---------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------
def _loaded_library(prefix: str) -> Optional[str]:
    """Path of a loaded shared object whose file name starts with `prefix` (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1] if line.strip() else ""
                if os.path.basename(p).startswith(prefix):
                    return p
    except OSError:
        pass
    return None


def _child_env(module: str, alias_dir: Path) -> Dict[str, str]:
    """Environment of the worker: plus LD_LIBRARY_PATH with an alias directory when the parser's
    unversioned library name does not load (see the module docstring)."""
    env = dict(os.environ)
    name = _LIB_ALIASES.get(module)
    if name is None or sys.platform != "linux":
        return env
    try:
        ctypes.CDLL(name)
        return env                       # the name resolves already
    except OSError:
        pass
    real = _loaded_library(name + ".")
    if real is None:
        return env
    alias_dir.mkdir(parents=True, exist_ok=True)
    (alias_dir / name).symlink_to(real)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(alias_dir)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    return env


def _expected_io(gi: dict, precision: str) -> Dict[str, dict]:
    out = {}
    for kind in ("inputs", "outputs"):
        for name, (tag, shape) in gi[kind].items():
            out[name] = {"dtype": _PRECISION[precision] if tag == "P" else _TAGS.get(tag, tag), "shape": list(shape)}
    return out


def _custom_node_counts(onnx_path: Path) -> Dict[str, int]:
    import onnx
    m = onnx.load(str(onnx_path), load_external_data=False)
    counts: Dict[str, int] = {}
    for n in m.graph.node:
        if n.domain == CUSTOM_DOMAIN:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _check_report(name: str, rep: dict, gi: dict, manifest: dict, onnx_path: Path) -> Dict[str, int]:
    """Raise ActVarError unless the parsed network is what the bundle declares. Returns plugin counts."""
    from .plugin_library import PLUGIN_NAMES, PLUGIN_NAMESPACE, PLUGIN_VERSION
    if rep.get("strongly_typed") is False:
        raise ActVarError(f"{name}: TensorRT did not create a strongly typed network")
    want = _expected_io(gi, manifest["precision"])
    got = {**rep["inputs"], **rep["outputs"]}
    bad = [f"{t} is {got[t]['dtype']} {got[t]['shape']}, the manifest says {w['dtype']} {w['shape']}"
           for t, w in want.items() if t in got and (got[t]["dtype"] != w["dtype"] or got[t]["shape"] != w["shape"])]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if bad or missing or extra:
        why = bad + ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise ActVarError(f"{name}: the TensorRT network's inputs/outputs differ from the manifest: " + "; ".join(why[:4]))
    nodes = _custom_node_counts(onnx_path)
    unknown = sorted(set(nodes) - set(PLUGIN_NAMES))
    if unknown:
        raise ActVarError(f"{name}: unknown custom ops {unknown} in domain {CUSTOM_DOMAIN!r}")
    layers = rep["plugin_layers"]
    foreign = [l for l in layers if not (l["ours"] and l["plugin"] in PLUGIN_NAMES and l["version"] == PLUGIN_VERSION
                                         and l["namespace"] == PLUGIN_NAMESPACE)]
    if foreign:
        l = foreign[0]
        raise ActVarError(f"{name}: plugin layer {l['layer']} is {l['plugin']!r} v{l['version']!r} namespace "
                          f"{l['namespace']!r}, not a plugin of libactvar_trt_plugins.so")
    counts = {op: sum(1 for l in layers if l["plugin"] == op) for op in PLUGIN_NAMES}
    for op in PLUGIN_NAMES:
        if counts[op] != nodes.get(op, 0):
            raise ActVarError(f"{name}: {nodes.get(op, 0)} {op} node(s) in {onnx_path.name} but {counts[op]} "
                              f"plugin layer(s) in the TensorRT network")
    return {op: c for op, c in counts.items() if c}


def build_engines(bundle_dir, names: Optional[Iterable[str]] = None, progress: bool = True,
                  parse_only: bool = False) -> dict:
    """Parse the bundle's graphs (all, or `names`) with TensorRT, check them, build and write
    `<graph>.engine` files and `engines.json`. Returns {"engines.json": path, "tensorrt": {...},
    "graphs": {name: {"file", "bytes", "sha256", "parse_seconds", "build_seconds", "plugin_layers",
    "report"}}}. With parse_only=True nothing is written (parse + checks only; "file" is None)."""
    from tqdm import tqdm
    from ..bundle import Bundle
    from .api import load_trt, trt_module_info

    b = Bundle.open(bundle_dir)
    m = b.manifest
    graphs = m["graphs"]
    if names is None:
        todo = list(graphs)
    else:
        todo = [n.strip() for n in names if n and n.strip()]
        unknown = [n for n in todo if n not in graphs]
        if unknown or not todo:
            what = f"unknown graph name(s) {unknown}" if unknown else "no graph names given"
            raise ActVarError(f"{what}: this bundle has {', '.join(graphs)}")
        todo = list(dict.fromkeys(todo))
    lowering = m.get("lowering", "portable")
    if m.get("target", "tensorrt") != "tensorrt":
        raise ActVarError(f"{b.path}: built for --target {m['target']} (ONNX Runtime's com.microsoft operators, which "
                          f"TensorRT cannot parse): rebuild it with --target tensorrt")
    plugin_lib = None
    if lowering == "plugin":
        from .plugin_library import library_info
        plugin_lib = library_info()
    trt = load_trt()
    info = trt_module_info(trt)
    tmpdir = Path(tempfile.mkdtemp(prefix="actvar-trt-"))
    tmp_engines: List[Path] = []
    results: Dict[str, dict] = {}
    try:
        spec = {"module": info["module"], "lowering": lowering, "parse_only": parse_only, "graphs": [],
                "plugin_library": plugin_lib["path"] if plugin_lib else None}
        for n in todo:
            tmp = None
            if not parse_only:
                remove_stale(b.path / engine_file(n))
                fd, tmp = tempfile.mkstemp(prefix=temp_prefix(b.path / engine_file(n)), suffix=".tmp", dir=b.path)
                os.close(fd)
                tmp_engines.append(Path(tmp))
            spec["graphs"].append({"name": n, "onnx": str(b.graph_path(n)), "tmp": tmp})
        (tmpdir / "spec.json").write_text(json.dumps(spec))
        env = _child_env(info["module"], tmpdir / "lib")
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        errlog = open(tmpdir / "stderr.txt", "w+")
        cmd = [sys.executable, "-m", "actvar_export.trt.engines", "--worker", str(tmpdir / "spec.json")]
        bar = tqdm(total=len(todo), desc="engines" if not parse_only else "parse", unit="graph",
                   disable=not progress, file=sys.stderr)
        current = todo[0]
        with bar, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, env=env, text=True, bufsize=1) as proc:
            for line in proc.stdout:
                if not line.startswith(MARK):
                    continue
                msg = json.loads(line[len(MARK):])
                if msg.get("start"):
                    current = msg["start"]
                    bar.set_postfix_str(current)
                    continue
                if "error" in msg:
                    proc.kill()
                    raise ActVarError(f"{msg['graph']} ({Path(graphs[msg['graph']]['file']).name}): {msg['error']}")
                results[msg["graph"]] = msg
                bar.set_postfix_str(f"{msg['graph']} {msg['parse_seconds'] + msg['build_seconds']:.1f}s")
                bar.update(1)
            rc = proc.wait()
        if rc != 0 or len(results) != len(todo):
            errlog.seek(0)
            tail = [l.strip() for l in errlog.read().splitlines() if l.strip()]
            last = tail[-1][:300] if tail else "no message"
            raise ActVarError(f"{current}: TensorRT ({info['module']} {info['version']}) aborted the build process "
                              f"(exit status {rc}): {last}")
        out = {"tensorrt": info, "lowering": lowering, "plugin_library": plugin_lib, "graphs": {}}
        for n in todo:
            rep = results[n]
            plugin_counts = _check_report(n, rep["report"], graphs[n], m, b.graph_path(n))
            out["graphs"][n] = {"file": None, "bytes": None, "sha256": None, "parse_seconds": rep["parse_seconds"],
                                "build_seconds": rep["build_seconds"], "plugin_layers": plugin_counts,
                                "report": rep["report"]}
        if parse_only:
            return out
        for n, tmp in zip(todo, tmp_engines):
            size = tmp.stat().st_size
            if size == 0:
                raise ActVarError(f"{n}: TensorRT produced an empty serialized engine")
            out["graphs"][n].update(file=engine_file(n), bytes=size, sha256=sha256_file(tmp))
        for n, tmp in zip(todo, tmp_engines):
            default_mode(tmp)
            os.replace(tmp, b.path / engine_file(n))
        tmp_engines = []
        out["engines.json"] = str(_write_engines_json(b.path, m, info, lowering, plugin_lib, out["graphs"]))
        return out
    finally:
        for t in tmp_engines:
            t.unlink(missing_ok=True)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _write_engines_json(path: Path, manifest: dict, info: dict, lowering: str, plugin_lib: Optional[dict],
                        built: Dict[str, dict]) -> Path:
    """engines.json: this run's engines plus still valid entries of an earlier run with the same TensorRT,
    the same plugin library and the same manifest (a run for some graphs keeps the others)."""
    from ..bundle import MANIFEST
    from .plugin_library import PLUGIN_NAMES, PLUGIN_NAMESPACE, PLUGIN_VERSION
    mani_sha = sha256_file(path / MANIFEST)
    entries = {}
    old_path = path / ENGINES_JSON
    if old_path.exists():
        try:
            old = json.loads(old_path.read_text())
            old_lib = (old.get("plugins") or {}).get("library")
            if old.get("tensorrt") == info and old.get("manifest_sha256") == mani_sha and old_lib == plugin_lib:
                for n, e in old.get("engines", {}).items():
                    f = path / e.get("file", "")
                    if n not in built and f.is_file() and f.stat().st_size == e.get("bytes"):
                        entries[n] = e
        except (ValueError, OSError, AttributeError):
            pass
    for n, g in built.items():
        entries[n] = {"file": g["file"], "bytes": g["bytes"], "sha256": g["sha256"],
                      "onnx": manifest["graphs"][n]["file"], "onnx_sha256": manifest["files"][manifest["graphs"][n]["file"]]["sha256"],
                      "plugin_layers": g["plugin_layers"], "build_seconds": round(g["build_seconds"], 3)}
    doc = {
        "format": ENGINES_FORMAT,
        "tensorrt": info,
        "manifest_sha256": mani_sha,
        "lowering": lowering,
        "precision": manifest["precision"],
        "strongly_typed": True,
        "plugins": ({"library": plugin_lib,
                     "creators": {n: {"version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE} for n in PLUGIN_NAMES},
                     "load": "IPluginRegistry::loadLibrary(library path) before deserializing (trtexec --dynamicPlugins)"}
                    if lowering == "plugin" else None),
        "engines": dict(sorted(entries.items(), key=lambda kv: _graph_order(kv[0]))),
        "runnable_here": False,
        "reason": not_runnable_reason(info["module"]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    p = path / ENGINES_JSON
    write_json_atomic(p, doc)
    return p


def _graph_order(name: str):
    return (0, int(name.split("_")[1])) if name.startswith("step_") else (1, 0)


# ---------------------------------------------------------------------------------------------------
# Worker side (child process)
# ---------------------------------------------------------------------------------------------------
def _emit(obj) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _dtype_name(dt) -> str:
    return str(dt).split(".")[-1]


def _network_report(trt, network) -> dict:
    from .plugin_library import plugin_identity
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    rep = {"strongly_typed": bool(network.get_flag(flag)) if flag is not None else None,
           "inputs": {}, "outputs": {}, "plugin_layers": [], "num_layers": network.num_layers}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rep["inputs"][t.name] = {"dtype": _dtype_name(t.dtype), "shape": [int(d) for d in t.shape]}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        rep["outputs"][t.name] = {"dtype": _dtype_name(t.dtype), "shape": [int(d) for d in t.shape]}
    v3 = getattr(trt.LayerType, "PLUGIN_V3", None)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == v3:
            layer.__class__ = trt.IPluginV3Layer
            plugin = layer.plugin
            rep["plugin_layers"].append({
                "layer": layer.name, **plugin_identity(trt, plugin),
                "outputs": [{"dtype": _dtype_name(layer.get_output(j).dtype),
                             "shape": [int(d) for d in layer.get_output(j).shape]} for j in range(layer.num_outputs)]})
        elif v3 is None and "PLUGIN" in _dtype_name(layer.type):
            rep["plugin_layers"].append({"layer": layer.name, "plugin": "?", "version": "?", "namespace": "?",
                                         "ours": False, "outputs": []})
    return rep


def _parser_errors(parser) -> List[str]:
    errs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = ""
        try:
            nn, op = e.node_name(), e.node_operator()
            node = (f"node {nn!r} ({op}): " if nn else f"node #{e.node()} ({op}): ") if (nn or op) else ""
        except Exception:
            pass
        errs.append(node + str(e.desc()).strip())
    return errs


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    from .api import load_trt
    trt = load_trt((spec["module"],))

    class _Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: List[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)
            elif severity == trt.ILogger.WARNING:
                print(f"[TensorRT warning] {msg}", file=sys.stderr, flush=True)

    logger = _Log()
    plugin = spec["lowering"] == "plugin"
    if plugin:
        from .plugin_library import PLUGIN_NAMES, load_into_registry, node_version_errors
        try:
            load_into_registry(trt, spec["plugin_library"])
        except ActVarError as e:
            _emit({"graph": spec["graphs"][0]["name"], "error": str(e)})
            return 0
        own = lambda: [m for m in logger.errors if m.startswith(PLUGIN_NAMES)]   # the plugins' own messages
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = (1 << int(flag)) if flag is not None else 0
    for g in spec["graphs"]:
        name = g["name"]
        _emit({"start": name})
        logger.errors.clear()
        t0 = time.time()
        builder = trt.Builder(logger)
        if builder is None:
            _emit({"graph": name, "error": "TensorRT could not create a builder: " + "; ".join(logger.errors[:2])})
            return 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(g["onnx"])
        errs = _parser_errors(parser)
        if plugin and (errs or not ok):
            errs = own() + node_version_errors(trt, g["onnx"], CUSTOM_DOMAIN) + errs
        if not ok or errs:
            errs = errs or logger.errors or ["parse_from_file returned False without an error"]
            _emit({"graph": name, "error": f"the ONNX parser reported {len(errs)} error(s): " + "; ".join(errs[:3])})
            return 0
        report = _network_report(trt, network)
        t1 = time.time()
        if not spec["parse_only"]:
            config = builder.create_builder_config()
            ser = builder.build_serialized_network(network, config)
            if ser is None or ser.nbytes == 0:
                msgs = (own() if plugin else []) + logger.errors[:3]
                msgs = list(dict.fromkeys(msgs))
                _emit({"graph": name, "error": "TensorRT failed to build the engine: " + ("; ".join(msgs[:3]) or "no message")})
                return 0
            with open(g["tmp"], "wb") as f:
                f.write(memoryview(ser))
                f.flush()
                os.fsync(f.fileno())
            del ser
        _emit({"graph": name, "report": report, "parse_seconds": round(t1 - t0, 3),
               "build_seconds": round(time.time() - t1, 3)})
        del parser, network, builder
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2]))
    sys.exit("usage: python -m actvar_export.trt.engines --worker SPEC.json (internal; use `actvar-export engines`)")
