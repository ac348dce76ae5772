"""Class-based Python IPluginV3 plugins for the custom nodes of the `plugin` lowering.

`ActVarTokenScatter` (version "1", namespace ""): inputs x [S, L, C], idx [S, K] int32, upd [S, K, C];
output out [S, L, C] = x with rows idx[s, :] replaced by upd[s] (plugins/token_scatter/CONTRACT.md).
x, upd, out share one type: float32 (what the exported graphs use: the residual stream is fp32), float16 or
bfloat16 (the other types of the contract). No attributes, no workspace.

`ActVarExpertFFN` (version "1", namespace "", attributes num_experts, top_k): inputs h [T, C],
router logits [T, N] float32, fc1_w [hidden, C], fc1_b [hidden], fc2_w [C, hidden], fc2_b [C]; outputs
out [T, C] and experts [T, top_k] int32 (plugins/expert_routing/CONTRACT.md). h, the four weights and
out share one type: float16, bfloat16 or float32.

All tensors are linear (row-major, contiguous). `enqueue` calls the C launchers of libactvar_plugins.so
through actvar_export.kernels with TensorRT's raw device pointers and stream. The build needs no CUDA and
no plugin library: the workspace size is the library's `actvarExpertFfnWorkspaceSize` when the library
loads, else `expert_ffn_workspace_size()` below, a line-by-line Python port of the C layout.

The decorator-based `tensorrt.plugin` module is not used (TensorRT-RTX 1.7 does not ship it). The
classes are created per TensorRT module (their bases come from it), so the same code serves `tensorrt`
and `tensorrt_rtx`; `register_plugins()` registers the creators once per module and keeps them alive.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Dict, Optional

import numpy as np

from ..errors import ActVarError

TOKEN_SCATTER = "ActVarTokenScatter"
EXPERT_FFN = "ActVarExpertFFN"
PLUGIN_NAMES = (TOKEN_SCATTER, EXPERT_FFN)
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
MAX_EXPERTS = 64             # ACTVAR_MAX_EXPERTS (expert_routing.h)
WORKSPACE_ALIGN = 256        # actvarExpertFfn wants a 256-byte aligned workspace

_errors: list = []                  # messages of exceptions raised in create_plugin (TensorRT hides them)
_registered: Dict[str, dict] = {}   # TensorRT module name -> {plugin name: creator} (keeps them alive)
_classes: Dict[str, tuple] = {}
_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------------
# Workspace of actvarExpertFfn: a Python port of wsLayout() in plugins/expert_routing/expert_routing.cu
# and fc2SplitK() in plugins/expert_routing/gemm_common.cuh (all arguments positive: C integer division
# is Python's //). Pure function of the arguments, no device query, identical on every GPU.
# ---------------------------------------------------------------------------------------------------
_CHUNK = 256                 # kChunk in expert_routing.cu
_LT_WORKSPACE = 8 << 20      # kLtWorkspaceBytes in dense_lt.h (cuBLASLt's share, fp16/bf16 only)
_ELEM_SIZE = {0: 4, 1: 2, 2: 2}


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _fc2_split_k(T: int, C: int, hidden: int) -> int:
    tiles = ((T + 127) // 128) * ((C + 127) // 128)
    s = 132 // (tiles if tiles > 0 else 1)
    max_by_k = hidden // 512
    s = min(s, 8, max_by_k)
    return 1 if s < 2 else s


def expert_ffn_workspace_size(T: int, C: int, hidden: int, N: int, top_k: int, dtype: int) -> int:
    """Bytes of workspace actvarExpertFfn needs for these arguments (dtype: 0 fp32, 1 fp16, 2 bf16);
    equal to the C function actvarExpertFfnWorkspaceSize."""
    es = _ELEM_SIZE.get(dtype, 0)
    if T <= 0 or not es or N < 1 or hidden < 1 or top_k < 1:
        return 0
    parts = [T * top_k * 4,                          # experts  (int32)
             T * 8,                                  # membership bits (unsigned long long)
             N * 4,                                  # counts
             ((T + _CHUNK - 1) // _CHUNK) * N * 4,   # chunk counts
             N * T * 4,                              # lists
             T * hidden * es]                        # hidden activations H
    split = _fc2_split_k(T, C, hidden) if es == 2 else 1
    parts.append(split * T * C * 4 if split > 1 else 0)   # split-K fp32 partials
    parts.append(_LT_WORKSPACE if es == 2 else 0)         # cuBLASLt's workspace
    return sum(_align_up(p, 256) for p in parts)


_lib_state: list = []                # [handle or None] once tried


def _library():
    """The ctypes handle of libactvar_plugins.so (located by actvar_export.kernels: ACTVAR_PLUGIN_LIB or
    build/plugins/), or None when it cannot be loaded here (e.g. the CPU build machine: no library or no
    CUDA runtime). Tried once per process."""
    if not _lib_state:
        try:
            from .. import kernels
            _lib_state.append(kernels.load_library())
        except Exception:
            _lib_state.append(None)
    return _lib_state[0]


def workspace_size(T: int, C: int, hidden: int, N: int, top_k: int, dtype: int) -> int:
    """What the plugin reports to TensorRT: the library's own answer when it loads, else the Python
    port, plus WORKSPACE_ALIGN bytes so enqueue can align TensorRT's pointer up to 256 bytes."""
    lib = _library()
    if lib is not None:
        n = int(lib.actvarExpertFfnWorkspaceSize(T, C, hidden, N, top_k, dtype))
    else:
        n = expert_ffn_workspace_size(T, C, hidden, N, top_k, dtype)
    return n + WORKSPACE_ALIGN if n else 0


# ---------------------------------------------------------------------------------------------------
# Field helpers
# ---------------------------------------------------------------------------------------------------
def _field_value(f):
    """A PluginField's value: int for integer fields, str for CHAR fields, else a numpy array."""
    data = np.asarray(f.data)
    name = str(f.type).split(".")[-1]
    if name == "CHAR":
        raw = data.astype(np.uint8).tobytes() if data.dtype != np.uint8 else data.tobytes()
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    if name in ("INT8", "INT16", "INT32", "INT64") and data.size == 1:
        return int(data.reshape(-1)[0])
    return data


def _fields(fc) -> Dict[str, object]:
    out = {}
    if fc is None:
        return out
    for f in fc:
        out[f.name] = _field_value(f)
    return out


def _int_attr(fields, key, lo, hi):
    if key not in fields:
        raise ActVarError(f"attribute {key!r} is missing")
    v = fields[key]
    if not isinstance(v, int):
        raise ActVarError(f"attribute {key!r} must be one integer, got {v!r}")
    if not lo <= v <= hi:
        raise ActVarError(f"attribute {key}={v} outside [{lo}, {hi}]")
    return v


def _dims(desc) -> tuple:
    d = desc.dims
    return tuple(int(d[i]) for i in range(len(d)))


def _check(err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(f"{what} failed with cudaError_t {err}")


# ---------------------------------------------------------------------------------------------------
# Plugin classes (built per TensorRT module)
# ---------------------------------------------------------------------------------------------------
def _make_classes(trt):
    DT = trt.DataType
    act_types = {DT.FLOAT: 0, DT.HALF: 1}
    if hasattr(DT, "BF16"):
        act_types[DT.BF16] = 2
    LINEAR = trt.TensorFormat.LINEAR
    PCT = trt.PluginCapabilityType

    class _Base(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """The common part: one object serves the core, build and runtime capabilities."""
        NAME = ""
        NUM_OUTPUTS = 1

        def __init__(self, node_name: str = ""):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = self.NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.num_outputs = self.NUM_OUTPUTS
            self.node_name = node_name

        def get_capability_interface(self, type):
            if type in (PCT.CORE, PCT.BUILD, PCT.RUNTIME):
                return self
            return None

        def configure_plugin(self, inp, out):
            pass

        def on_shape_change(self, inp, out):
            pass

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, resource_context):
            return self.clone()

        def destroy(self):
            pass

    class TokenScatterPlugin(_Base):
        NAME = TOKEN_SCATTER
        NUM_OUTPUTS = 1

        def clone(self):
            return TokenScatterPlugin(self.node_name)

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([])

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]      # out has x's shape [S, L, C]

        def supports_format_combination(self, pos, in_out, num_inputs):
            d = in_out[pos].desc
            if d.format != LINEAR:
                return False
            if pos == 1:                            # idx [S, K]
                return d.type == DT.INT32
            if pos == 0:                            # x
                return d.type in act_types
            return d.type == in_out[0].desc.type    # upd, out: x's type

        def get_workspace_size(self, inp, out):
            return 0

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            # Not exercised anywhere yet (no GPU that runs these engines here): written to the contract.
            S, L, C = _dims(input_desc[0])
            K = _dims(input_desc[1])[1]
            lib = _library()
            if lib is None:
                raise RuntimeError(f"{TOKEN_SCATTER}: libactvar_plugins.so cannot be loaded (set ACTVAR_PLUGIN_LIB)")
            vp = ctypes.c_void_p
            _check(lib.actvarTokenScatter(vp(int(inputs[0])), vp(int(inputs[1])), vp(int(inputs[2])),
                                          vp(int(outputs[0])), S, L, K, C, act_types[input_desc[0].type],
                                          vp(int(stream))), "actvarTokenScatter")

    class ExpertFfnPlugin(_Base):
        NAME = EXPERT_FFN
        NUM_OUTPUTS = 2

        def __init__(self, node_name: str = "", num_experts: int = 1, top_k: int = 1):
            super().__init__(node_name)
            self.num_experts, self.top_k = int(num_experts), int(top_k)

        def clone(self):
            return ExpertFfnPlugin(self.node_name, self.num_experts, self.top_k)

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([
                trt.PluginField("num_experts", np.array([self.num_experts], np.int32), trt.PluginFieldType.INT32),
                trt.PluginField("top_k", np.array([self.top_k], np.int32), trt.PluginFieldType.INT32)])

        def get_output_data_types(self, input_types):
            return [input_types[0], DT.INT32]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            out = trt.DimsExprs(inputs[0])          # [T, C]
            experts = trt.DimsExprs(2)
            experts[0] = inputs[0][0]
            experts[1] = expr_builder.constant(self.top_k)
            return [out, experts]

        def supports_format_combination(self, pos, in_out, num_inputs):
            d = in_out[pos].desc
            if d.format != LINEAR:
                return False
            if pos == 0:                            # h
                return d.type in act_types
            if pos == 1:                            # router logits
                return d.type == DT.FLOAT
            if pos == 7:                            # experts
                return d.type == DT.INT32
            return d.type == in_out[0].desc.type    # fc1_w, fc1_b, fc2_w, fc2_b, out: h's type

        def _sizes(self, in_dims):
            T, C = in_dims[0]
            hidden = in_dims[2][0]
            return T, C, hidden

        def get_workspace_size(self, inp, out):
            T, C, hidden = self._sizes([tuple(int(x) for x in d.max) for d in inp])
            return workspace_size(max(T, 0), C, hidden, self.num_experts, self.top_k, act_types[inp[0].desc.type])

        def configure_plugin(self, inp, out):
            (T, C), (T2, N), (H1, C1), (Hb,), (C2, H2), (Cb,) = [tuple(int(x) for x in d.desc.dims) for d in inp]
            ok = (T2 == T and N == self.num_experts and C1 == C2 == Cb == C and H1 == Hb == H2
                  and H1 % self.num_experts == 0)
            if not ok:
                msg = (f"{EXPERT_FFN} {self.node_name!r}: inconsistent shapes h {[T, C]}, router {[T2, N]}, "
                       f"fc1_w {[H1, C1]}, fc1_b {[Hb]}, fc2_w {[C2, H2]}, fc2_b {[Cb]} for num_experts={self.num_experts}")
                _errors.append(msg)
                raise ValueError(msg)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            # Not exercised anywhere yet (no GPU runs these engines here): written to the contract.
            T, C, hidden = self._sizes([_dims(d) for d in input_desc])
            dtype = act_types[input_desc[0].type]
            lib = _library()
            if lib is None:
                raise RuntimeError(f"{EXPERT_FFN}: libactvar_plugins.so cannot be loaded (set ACTVAR_PLUGIN_LIB)")
            need = int(lib.actvarExpertFfnWorkspaceSize(T, C, hidden, self.num_experts, self.top_k, dtype))
            ws = int(workspace)
            if need and not ws:
                raise RuntimeError(f"{EXPERT_FFN}: TensorRT passed no workspace, {need} bytes needed")
            # get_workspace_size reported need + WORKSPACE_ALIGN, so [aligned, aligned + need) lies inside
            # TensorRT's buffer whatever its alignment.
            aligned = _align_up(ws, WORKSPACE_ALIGN) if need else 0
            vp = ctypes.c_void_p
            _check(lib.actvarExpertFfn(vp(int(inputs[0])), vp(int(inputs[1])), vp(int(inputs[2])), vp(int(inputs[3])),
                                       vp(int(inputs[4])), vp(int(inputs[5])), vp(int(outputs[0])), vp(int(outputs[1])),
                                       T, C, hidden, self.num_experts, self.top_k, dtype, vp(aligned),
                                       ctypes.c_size_t(need), vp(int(stream))), "actvarExpertFfn")

    class _Creator(trt.IPluginCreatorV3One):
        PLUGIN = None
        FIELDS = ()

        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = self.PLUGIN.NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(f, np.array([], np.int32), trt.PluginFieldType.INT32) for f in self.FIELDS])

        def create_plugin(self, name, field_collection, phase):
            try:
                return self._create(name, _fields(field_collection))
            except Exception as e:
                _errors.append(f"{self.name} {name!r}: {e}")
                raise

    class TokenScatterCreator(_Creator):
        PLUGIN = TokenScatterPlugin

        def _create(self, name, fields):
            return TokenScatterPlugin(name)

    class ExpertFfnCreator(_Creator):
        PLUGIN = ExpertFfnPlugin
        FIELDS = ("num_experts", "top_k")

        def _create(self, name, fields):
            n = _int_attr(fields, "num_experts", 1, MAX_EXPERTS)
            k = _int_attr(fields, "top_k", 1, n)
            return ExpertFfnPlugin(name, n, k)

    return TokenScatterPlugin, ExpertFfnPlugin, TokenScatterCreator, ExpertFfnCreator


def pop_errors() -> list:
    """Messages of the exceptions raised by our creators since the last call (TensorRT reports only
    "Could not create the plugin")."""
    out = list(_errors)
    _errors.clear()
    return out


def plugin_classes(trt=None):
    """(TokenScatterPlugin, ExpertFfnPlugin, TokenScatterCreator, ExpertFfnCreator) for a TensorRT module."""
    from .api import load_trt
    trt = trt or load_trt()
    with _lock:
        if trt.__name__ not in _classes:
            _classes[trt.__name__] = _make_classes(trt)
        return _classes[trt.__name__]


def register_plugins(trt=None) -> Dict[str, object]:
    """Register the creators of ActVarTokenScatter and ActVarExpertFFN (version "1", namespace "") with
    the module's plugin registry. Idempotent: a second call returns the creators of the first.
    Returns {plugin name: creator}."""
    from .api import load_trt
    trt = trt or load_trt()
    _, _, scatter_cls, expert_cls = plugin_classes(trt)
    with _lock:
        if trt.__name__ in _registered:
            return dict(_registered[trt.__name__])
        reg = trt.get_plugin_registry()
        creators = {}
        for cls in (scatter_cls, expert_cls):
            creator = cls()
            if not reg.register_creator(creator, PLUGIN_NAMESPACE):
                for c in creators.values():          # all or nothing
                    reg.deregister_creator(c)
                raise ActVarError(f"TensorRT refused to register the plugin creator {creator.name} "
                                  f"v{PLUGIN_VERSION} (another creator of that name, version and namespace?)")
            creators[creator.name] = creator
        _registered[trt.__name__] = creators
        return dict(creators)


def is_our_plugin(plugin, trt=None) -> Optional[str]:
    """The plugin's name if `plugin` (an IPluginV3 from an IPluginV3Layer) is one of ours, else None."""
    from .api import load_trt
    trt = trt or load_trt()
    classes = plugin_classes(trt)[:2]
    if isinstance(plugin, classes):
        return plugin.plugin_name
    try:
        core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    except Exception:
        return None
    if isinstance(core, classes):
        return core.plugin_name
    return None
