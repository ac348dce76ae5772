"""libactvar_trt_plugins.so: the C++ TensorRT plugins (plugins/trt/) behind the `plugin` lowering's custom nodes.

`ActVarTokenScatter` and `ActVarExpertFFN` (version "1", namespace "", plugins/*/CONTRACT.md) are IPluginV3
plugins of that library; TensorRT loads it through `get_plugin_registry().load_library(path)` (its exported
`getCreators` / `setLoggerFinder`). The library is found through ACTVAR_TRT_PLUGIN_LIB (its path), else
build/plugins/trt/ under the repository root or the current directory.

Nothing here imports TensorRT; the functions taking `trt` are called in the engine-build worker process.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Dict, List, Optional

from ..bundle import sha256_file
from ..errors import ActVarError

TOKEN_SCATTER = "ActVarTokenScatter"
EXPERT_FFN = "ActVarExpertFFN"
PLUGIN_NAMES = (TOKEN_SCATTER, EXPERT_FFN)
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
LIBRARY_NAME = "libactvar_trt_plugins.so"
REGISTERED_NAME = "libactvar_trt_plugins_registered.so"   # the same plugins registering on dlopen (Triton, Polygraphy)
ENV_VAR = "ACTVAR_TRT_PLUGIN_LIB"
METADATA_PREFIX = LIBRARY_NAME + " "      # what the plugins' getMetadataString() starts with
BUILD_HINT = ("cmake -S plugins -B build/plugins -DTensorRT_INCLUDE_DIR=<TensorRT include dir> && "
              "cmake --build build/plugins --target actvar_trt_plugins")
REGISTERED_BUILD_HINT = ("cmake -S plugins -B build/plugins -DTensorRT_INCLUDE_DIR=<TensorRT include dir> "
                         "-DTensorRT_LIBRARY=<the server's libnvinfer.so.10> && "
                         "cmake --build build/plugins --target actvar_trt_plugins_registered")


def library_path() -> Path:
    """The library's path: ACTVAR_TRT_PLUGIN_LIB, else the first build/plugins/trt/ copy (may not exist)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    cands = [root / "build" / "plugins" / "trt" / LIBRARY_NAME, Path.cwd() / "build" / "plugins" / "trt" / LIBRARY_NAME]
    return next((c for c in cands if c.is_file()), cands[0])


def registered_library_path(beside: Optional[str] = None) -> Path:
    """The self-registering variant: next to `beside` (the library that built a bundle's engines, engines.json)
    when it is there, else next to library_path() (may not exist)."""
    cands = ([Path(beside).with_name(REGISTERED_NAME)] if beside else []) + [library_path().with_name(REGISTERED_NAME)]
    return next((c for c in cands if c.is_file()), cands[-1])


def library_info() -> Dict[str, object]:
    """{"path", "version", "sha256"} of the library, loading it once to read its version (no GPU needed).
    Raises ActVarError (one line: where it looked, how to build it) when it is absent or does not load."""
    path = library_path()
    if not path.is_file():
        where = f"{ENV_VAR}={path}" if os.environ.get(ENV_VAR) else f"{path} (set {ENV_VAR} to use another copy)"
        raise ActVarError(f"the TensorRT plugin library {LIBRARY_NAME} is not built: no file {where}; "
                          f"build it with `{BUILD_HINT}`")
    path = path.resolve()
    try:
        lib = ctypes.CDLL(str(path))
        lib.actvarPluginsVersion.restype = ctypes.c_int
        version = int(lib.actvarPluginsVersion())
        lib.getCreators
    except (OSError, AttributeError) as e:
        raise ActVarError(f"{path} is not a loadable {LIBRARY_NAME}: {str(e).splitlines()[0]}") from None
    return {"path": str(path), "version": version, "sha256": sha256_file(path)}


def load_into_registry(trt, path: str) -> None:
    """Load the library into `trt`'s plugin registry; raises ActVarError when creators of these names were there
    before (then plugin layers could not be told apart) or the library does not register both."""
    reg = trt.get_plugin_registry()
    before = [n for n in PLUGIN_NAMES if reg.get_creator(n, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None]
    if before:
        raise ActVarError(f"plugin creators {before} v{PLUGIN_VERSION} are registered before {LIBRARY_NAME} is loaded "
                          f"(another plugin library of the same names?)")
    if reg.load_library(str(path)) is None:
        raise ActVarError(f"TensorRT could not load the plugin library {path}")
    missing = [n for n in PLUGIN_NAMES if reg.get_creator(n, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None]
    if missing:
        raise ActVarError(f"{path} registered no creator for {missing} v{PLUGIN_VERSION}")


def plugin_identity(trt, plugin) -> Dict[str, object]:
    """Name, version, namespace of a network's IPluginV3 and whether it is this library's (its build capability's
    metadata string names the library)."""
    core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    build = plugin.get_capability_interface(trt.PluginCapabilityType.BUILD)
    meta = str(getattr(build, "metadata_string", "") or "") if build is not None else ""
    return {"plugin": core.plugin_name, "version": core.plugin_version, "namespace": core.plugin_namespace,
            "ours": meta.startswith(METADATA_PREFIX)}


def node_version_errors(trt, onnx_path, domain: str) -> List[str]:
    """One message per custom node whose plugin_version / plugin_namespace has no creator in the registry
    (TensorRT's parser says only "Plugin not found")."""
    import onnx
    reg = trt.get_plugin_registry()
    out = []
    for i, n in enumerate(onnx.load(str(onnx_path), load_external_data=False).graph.node):
        if n.domain != domain or n.op_type not in PLUGIN_NAMES:
            continue
        attrs = {a.name: a.s.decode("utf-8", "replace") for a in n.attribute if a.name in ("plugin_version", "plugin_namespace")}
        ver, ns = attrs.get("plugin_version", "1"), attrs.get("plugin_namespace", "")
        if reg.get_creator(n.op_type, ver, ns) is None:
            out.append(f"node {n.name or '#' + str(i)!r} ({n.op_type}) asks for plugin_version {ver!r} namespace {ns!r}; "
                       f"{LIBRARY_NAME} provides version {PLUGIN_VERSION!r} namespace {PLUGIN_NAMESPACE!r}")
    return out
