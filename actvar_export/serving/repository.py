"""`actvar-export triton`: a Triton model repository from a bundle, written into a temporary directory
beside the target and renamed when complete.

backend `python`:      one `actvar` model (Python backend) running the bundle's graphs in-process.
backend `onnxruntime`: step_0..step_9 + decoder as `onnxruntime_onnx` models, and `actvar` calling them (BLS).
backend `tensorrt`:    the same as `tensorrt_plan` models over the bundle's engines (`actvar-export engines`).
Bundle files are hard-linked into the repository where the file system allows it, else copied.

`plugin` bundles carry their native plugin library in plugins/. onnxruntime: libactvar_ort_ops.so, named in
every step model's config (`model_operations`; a step whose scale has no `actvar`-domain node only pays a dlopen)
by the absolute path of its final place: Triton's onnxruntime backend hands the name to dlopen unchanged, so a
relative one would resolve against the server's working directory. tensorrt: libactvar_trt_plugins_registered.so,
which the repository README's server commands pass with `--backend-config=tensorrt,plugins=`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import ActVarError
from .generator import DEFAULT_CFG, DEFAULT_TOP_P

BACKENDS = ("python", "onnxruntime", "tensorrt")
MARKER = ".actvar-repository.json"
ACTVAR = "actvar"
PLUGINS = "plugins"
MAX_REQUESTS = 64   # requests (rows of Triton's batch dimension) one execution of `actvar` may take
# The dynamic batcher dispatches at once when the bundle's static batch of requests is queued
# (preferred_batch_size), else when the oldest request has waited this long: clients that come back with their next
# request within it share one execution instead of each paying a padded one.
DEFAULT_MAX_QUEUE_DELAY_US = 50000
_TYPES = {"uint8": "TYPE_UINT8", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
          "bfloat16": "TYPE_BF16"}
_PRECISION = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SHIM = ('"""Triton loads this file: the model is actvar_export.serving.triton_model (the models\' Python must\n'
        'import the actvar_export package; see ../../README.md)."""\n'
        "from actvar_export.serving.triton_model import TritonPythonModel  # noqa: F401\n")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _tensor(name: str, dtype: str, dims: List[int], optional: bool = False, ragged: bool = False) -> str:
    opt = (" optional: true" if optional else "") + (" allow_ragged_batch: true" if ragged else "")
    return f'  {{ name: "{name}" data_type: {_TYPES[dtype]} dims: [ {", ".join(str(d) for d in dims)} ]{opt} }}'


def instance_group(instances: int, gpus: Optional[Sequence[int]] = None) -> str:
    """`instances` per listed GPU (KIND_GPU); without GPUs no kind: Triton places them (KIND_GPU fails without
    a GPU)."""
    place = f" kind: KIND_GPU gpus: [ {', '.join(str(g) for g in gpus)} ]" if gpus else ""
    return f"instance_group [ {{ count: {instances}{place} }} ]\n"


def _config(name: str, head: str, inputs: List[str], outputs: List[str], instances: int, extra: str = "",
            max_batch_size: int = 0, gpus: Optional[Sequence[int]] = None) -> str:
    return (f'name: "{name}"\n{head}\nmax_batch_size: {max_batch_size}\n'
            "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n"
            f"{instance_group(instances, gpus)}{extra}")


def actvar_config(batch: int, instances: int, max_queue_delay_us: int, mode: str,
                  gpus: Optional[Sequence[int]] = None) -> str:
    """The `actvar` model: per request class_labels INT64 [n], seed INT64 [1], optional cfg / top_p FP32 [1]
    -> images UINT8 [n, 256, 256, 3], behind Triton's batch dimension (a request of k rows is k jobs), so
    the dynamic batcher hands several requests (any n: ragged) to one execution. `gpus`: `instances` per GPU, each
    running its graphs on its own device (triton_model reads model_instance_device_id). Each execution costs one
    padded run of the static batch however few requests it holds, so the batcher's preferred size is that batch:
    dispatched at once when full, after `max_queue_delay_us` otherwise."""
    params = {"bundle": "bundle", "mode": mode, "cfg": repr(DEFAULT_CFG), "top_p": repr(DEFAULT_TOP_P)}
    extra = (f"dynamic_batching {{ preferred_batch_size: [ {min(batch, MAX_REQUESTS)} ] "
             f"max_queue_delay_microseconds: {max_queue_delay_us} }}\n")
    extra += "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in params.items())
    if mode == "inprocess":   # a BLS model cannot warm up: the models it calls may not be loaded yet
        extra += ('model_warmup [ { name: "one_batch" batch_size: 1\n'
                  f'  inputs {{ key: "class_labels" value {{ data_type: TYPE_INT64 dims: [ {batch} ] zero_data: true }} }}\n'
                  '  inputs { key: "seed" value { data_type: TYPE_INT64 dims: [ 1 ] zero_data: true } } } ]\n')
    return _config(ACTVAR, 'backend: "python"',
                   [_tensor("class_labels", "int64", [-1], ragged=True), _tensor("seed", "int64", [1]),
                    _tensor("cfg", "float32", [1], True), _tensor("top_p", "float32", [1], True)],
                   [_tensor("images", "uint8", [-1, 256, 256, 3])], instances, extra, MAX_REQUESTS, gpus)


def graph_config(name: str, gi: dict, precision: str, platform: str, instances: int, op_library: str = "",
                 gpus: Optional[Sequence[int]] = None) -> str:
    io = lambda kind: [_tensor(n, _PRECISION[precision] if t == "P" else t, s) for n, (t, s) in gi[kind].items()]
    extra = f"model_operations {{ op_library_filename: {json.dumps(op_library, ensure_ascii=False)} }}\n" if op_library else ""
    return _config(name, f'platform: "{platform}"', io("inputs"), io("outputs"), instances, extra, gpus=gpus)


def _ort_ops_library(bundle_path: Path) -> Path:
    from ..runtime.custom_ops import BUILD_HINT, LIB_NAME, library_path
    lib = library_path()
    if not lib.is_file():
        raise ActVarError(f"{bundle_path}: the onnxruntime models of a plugin bundle need the ONNX Runtime custom-op "
                          f"library {LIB_NAME} (not found at {lib}): {BUILD_HINT}")
    return lib


def _check_target(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise ActVarError(f"{out} exists: pass --force to replace it")
    if not (out / MARKER).is_file():
        raise ActVarError(f"{out} is not a model repository written by `actvar-export triton` (no {MARKER}): "
                          f"refusing to replace it")


def write_repository(bundle_dir, out, backend: str = "python", instances: int = 1, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                     force: bool = False, gpus: Optional[Sequence[int]] = None) -> Path:
    """gpus: indices (from options.gpus) to place every model's instances on, `instances` per GPU; None: no kind."""
    from ..bundle import DIGESTS, MANIFEST, Bundle, sha256_file
    from ..fsutil import replace_dir, temp_dir
    out = Path(out)
    if backend not in BACKENDS:
        raise ActVarError(f"--backend: unknown backend {backend!r}: choose {', '.join(BACKENDS)}")
    if instances < 1:
        raise ActVarError(f"--instances: {instances} must be at least 1")
    if max_queue_delay_us < 0:
        raise ActVarError(f"--max-queue-delay-us: {max_queue_delay_us} must be >= 0")
    if gpus is not None and (not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus)):
        raise ActVarError(f"--gpus: {list(gpus)} is not a list of distinct GPU indices >= 0")
    _check_target(out, force)
    b = Bundle.open(bundle_dir, verify=True)
    m = b.manifest
    files: Dict[str, Path] = {}          # repository path -> source file
    configs: Dict[str, str] = {}         # model name -> config.pbtxt
    notes: List[str] = []
    plugin_lib = ""                      # repository path of the native plugin library, if any
    if backend == "python":
        for name in m["files"]:
            files[f"{ACTVAR}/1/bundle/{name}"] = b.path / name
        files[f"{ACTVAR}/1/bundle/{MANIFEST}"] = b.path / MANIFEST
        files[f"{ACTVAR}/1/bundle/{DIGESTS}"] = b.path / DIGESTS    # Bundle.open checks the manifest against it
        configs[ACTVAR] = actvar_config(b.batch, instances, max_queue_delay_us, "inprocess", gpus)
    else:
        if m["precision"] == "bf16":
            raise ActVarError(f"{b.path}: a bf16 bundle has bf16 graph inputs, which the `actvar` model cannot feed "
                              f"through BLS (numpy has no bfloat16): build fp16 or fp32 for --backend {backend}")
        files[f"{ACTVAR}/1/bundle/{MANIFEST}"] = b.path / MANIFEST
        configs[ACTVAR] = actvar_config(b.batch, instances, max_queue_delay_us, "bls", gpus)
        if backend == "onnxruntime":
            ops_lib = ""
            if m["lowering"] == "plugin":
                from ..runtime.custom_ops import LIB_NAME
                plugin_lib = f"{PLUGINS}/{LIB_NAME}"
                files[plugin_lib] = _ort_ops_library(b.path)
                ops_lib = str(out.resolve() / plugin_lib)
            for name, gi in m["graphs"].items():
                files[f"{name}/1/model.onnx"] = b.path / gi["file"]
                files[f"{name}/1/weights.bin"] = b.path / "weights.bin"
                uses = ops_lib if name.startswith("step_") else ""   # the decoder has no custom nodes
                configs[name] = graph_config(name, gi, m["precision"], "onnxruntime_onnx", instances, uses, gpus)
        else:
            from ..trt.engines import ENGINES_JSON
            ej = b.path / ENGINES_JSON
            engines = json.loads(ej.read_text()).get("engines", {}) if ej.is_file() else {}
            missing = [n for n in m["graphs"] if n not in engines or not (b.path / engines[n]["file"]).is_file()]
            if missing:
                raise ActVarError(f"{b.path}: no engine for {', '.join(missing)}: run `actvar-export engines --bundle {b.path}` first")
            for name, gi in m["graphs"].items():
                files[f"{name}/1/model.plan"] = b.path / engines[name]["file"]
                configs[name] = graph_config(name, gi, m["precision"], "tensorrt_plan", instances, gpus=gpus)
            files[ENGINES_JSON] = ej
            if m["lowering"] == "plugin":
                from ..trt.plugin_library import LIBRARY_NAME, REGISTERED_BUILD_HINT, REGISTERED_NAME, registered_library_path
                built_with = ((json.loads(ej.read_text()).get("plugins") or {}).get("library") or {}).get("path")
                lib = registered_library_path(built_with)
                if lib.is_file():
                    plugin_lib = f"{PLUGINS}/{REGISTERED_NAME}"
                    files[plugin_lib] = lib
                else:
                    notes.append(f"no {REGISTERED_NAME} beside {built_with or LIBRARY_NAME} ({lib}): Triton's TensorRT "
                                 f"backend only dlopen()s plugin libraries, so {LIBRARY_NAME} (loadLibrary) does not serve; "
                                 f"build it with `{REGISTERED_BUILD_HINT}` and write this repository again")
    tmp = temp_dir(out)
    try:
        for rel, src in files.items():
            _link(src, tmp / rel)
        for name, text in configs.items():
            (tmp / name).mkdir(parents=True, exist_ok=True)
            (tmp / name / "config.pbtxt").write_text(text)
        (tmp / ACTVAR / "1" / "model.py").write_text(SHIM)
        from .readme import repository_readme
        from .server import package_root
        (tmp / "README.md").write_text(repository_readme(backend, m, sorted(configs), plugin_lib,
                                                         notes, str(out.resolve()), package_root()))
        (tmp / MARKER).write_text(json.dumps({"format": 1, "backend": backend, "bundle": str(b.path.resolve()),
                                              "manifest_sha256": sha256_file(b.path / MANIFEST),
                                              "models": sorted(configs), "gpus": list(gpus) if gpus else None,
                                              "notes": notes}, indent=1))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def placed_view(repo, gpus: Optional[Sequence[int]], target) -> Path:
    """A view of a repository written by `triton`, in the new directory `target`, whose models' instances sit on
    `gpus` (each model's count per GPU; None: no kind): config.pbtxt files rewritten, every other entry a link to
    the repository, which stays as it is (`serve --gpus`)."""
    repo, target = Path(repo).resolve(), Path(target)
    if not (repo / MARKER).is_file():
        raise ActVarError(f"--gpus: {repo} is not a model repository written by `actvar-export triton` (no {MARKER}): "
                          f"place its instances in its config.pbtxt files instead")
    target.mkdir()
    for entry in sorted(repo.iterdir()):
        config = entry / "config.pbtxt"
        if not config.is_file():
            (target / entry.name).symlink_to(entry)
            continue
        text, n = re.subn(r"^instance_group \[ \{ count: (\d+)\b[^\n]*\n",
                          lambda m: instance_group(int(m.group(1)), gpus), config.read_text(), count=1, flags=re.M)
        if not n:
            raise ActVarError(f"{config}: no instance_group line as `actvar-export triton` writes it: write the "
                              f"repository again")
        (target / entry.name).mkdir()
        (target / entry.name / "config.pbtxt").write_text(text)
        for sub in entry.iterdir():
            if sub.name != "config.pbtxt":
                (target / entry.name / sub.name).symlink_to(sub)
    return target
