"""The bundle runtime on ONNX Runtime (CUDA or CPU execution provider).

    rt = Runtime(Bundle.open(path), device="cuda", cuda_graphs=True)
    images_B3HW, ids = rt.generate(labels_B, u_BL, cfg=1.5, top_p=0.96)   # whole generation, on the device
    out = rt.infer("step_3", feed)                                          # one graph, host arrays (Polygraphy style)

Buffer plan (the same on both providers; torch tensors on the device, torch CPU tensors on the CPU):
- weights.bin is read once into one uint8 tensor on the device; every initializer of every session is a
  view of it handed over as an OrtValue (`SessionOptions.add_initializer`): one copy of the weights.
- every session allocates its intermediates from one arena registered with the ONNX Runtime environment
  (`create_and_register_allocator[_v2]` + `session.use_env_allocators`): peak = the largest step.
- `generate` binds preallocated fixed-address inputs and outputs: the carried tensors (x, each block's KV cache, f_hat;
  the manifest's `carried` map)
  ping-pong between two buffers, so step si's outputs are step si+1's inputs without a copy, and u, ids,
  labels, cfg, top_p live in buffers of their own. Only the ids and the images leave the device.
- on CUDA each session may run as a CUDA graph (`enable_cuda_graph`), captured on its second run; a step
  ONNX Runtime cannot capture (nodes outside the CUDA provider) runs without one, and `graph_report()`
  says which steps run as graphs. All sessions run on one stream the runtime owns, without host syncs
  between steps.
- ACTVAR_ORT_CUDA_OPTIONS="key=value,..." adds CUDA provider options of ONNX Runtime to every session (e.g.
  `prefer_nhwc=1`, `cudnn_conv_algo_search=HEURISTIC`; not `fuse_conv_bias=1`, see README); the C++ runtime reads
  the same variable. The options the runtime sets itself (device, stream, CUDA graphs, TF32) cannot be given there.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..bundle import Bundle
from ..config import NUM_SCALES, SCALE_BEGIN, SCALE_LENS, TOTAL_TOKENS
from ..errors import ActVarError
from ..export.graph import CUSTOM_DOMAIN
from .custom_ops import CUDA_PROVIDER, cuda_ops_library, register_cuda_ops

DEVICES = ("cuda", "cpu")
_CHUNK = 256 << 20
_REGISTERED_ARENAS = set()     # (device, id): the environment allocator is registered once per process


CUDA_OPTIONS_ENV = "ACTVAR_ORT_CUDA_OPTIONS"
_OWN_CUDA_OPTIONS = ("device_id", "user_compute_stream", "has_user_compute_stream", "enable_cuda_graph", "use_tf32")


def extra_cuda_options(text: Optional[str] = None) -> Dict[str, str]:
    """The CUDA provider options of ACTVAR_ORT_CUDA_OPTIONS ("key=value,key=value"; `text` instead of the
    environment). One-line ActVarError for a malformed entry or an option the runtime sets itself."""
    text = os.environ.get(CUDA_OPTIONS_ENV, "") if text is None else text
    out: Dict[str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = (t.strip() for t in item.partition("="))
        if not eq or not key or not value:
            raise ActVarError(f"{CUDA_OPTIONS_ENV}: {item!r} is not key=value")
        if key in _OWN_CUDA_OPTIONS:
            raise ActVarError(f"{CUDA_OPTIONS_ENV}: {key} is set by the runtime itself")
        out[key] = value
    return out


def default_device() -> str:
    """cuda where both torch and ONNX Runtime see a CUDA device, else cpu."""
    import torch
    import onnxruntime as ort
    ok = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    return "cuda" if ok else "cpu"


def _torch_dtypes():
    import torch
    return ({1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 7: torch.int64, 6: torch.int32},
            {"float32": torch.float32, "int64": torch.int64, "fp32": torch.float32, "fp16": torch.float16,
             "bf16": torch.bfloat16})


def _ortvalue(ort, t):
    """An OrtValue over a torch tensor's memory (no copy); the caller keeps `t` alive."""
    if hasattr(ort.OrtValue, "from_dlpack"):
        return ort.OrtValue.from_dlpack(t)
    from onnxruntime.capi import _pybind_state as C
    return ort.OrtValue(C.OrtValue.from_dlpack(t.__dlpack__(), False))


def _register_arena(ort, device: str, device_id: int) -> None:
    if (device, device_id) in _REGISTERED_ARENAS:
        return
    cfg = ort.OrtArenaCfg({"arena_extend_strategy": 1})     # kSameAsRequested: grow by what a step asks, no doubling
    kind = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR
    if device == "cuda":
        info = ort.OrtMemoryInfo("Cuda", kind, device_id, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, {"device_id": str(device_id)}, cfg)
    else:
        ort.create_and_register_allocator(ort.OrtMemoryInfo("Cpu", kind, 0, ort.OrtMemType.DEFAULT), cfg)
    _REGISTERED_ARENAS.add((device, device_id))


class Runtime:
    def __init__(self, bundle: Bundle, device: str = "cuda", cuda_graphs: bool = True, device_id: int = 0,
                 profile: Optional[Path] = None, log: Optional[Callable[[str], None]] = None):
        if device not in DEVICES:
            raise ActVarError(f"unknown device {device!r}: choose cuda or cpu")
        import torch     # first: it loads the CUDA libraries the CUDA execution provider links against
        import onnxruntime as ort
        self.torch, self.ort, self.bundle, self.device = torch, ort, bundle, device
        self.provider_names = ([CUDA_PROVIDER] if device == "cuda" else []) + ["CPUExecutionProvider"]
        missing = [p for p in self.provider_names if p not in ort.get_available_providers()]
        if missing or (device == "cuda" and not torch.cuda.is_available()):
            raise ActVarError(f"device {device}: ONNX Runtime here lacks {', '.join(missing) or 'a CUDA device'} "
                              f"(available: {', '.join(ort.get_available_providers())})")
        # plugin bundles on CUDA run the custom ops of libactvar_ort_ops.so; on the CPU the reference ops
        self.cuda_ops = None
        if device == "cuda" and bundle.manifest.get("lowering") == "plugin":
            self.cuda_ops = cuda_ops_library(ort.get_available_providers())
        self.cuda_options = extra_cuda_options() if device == "cuda" else {}
        self.dev = torch.device(device, device_id) if device == "cuda" else torch.device("cpu")
        self.device_id = device_id
        self.cuda_graphs = bool(cuda_graphs and device == "cuda")
        self.profile = Path(profile) if profile else None
        self.log = log or (lambda s: None)
        self.stream = torch.cuda.Stream(self.dev) if device == "cuda" else None
        self._sessions: Dict[Tuple[str, bool], object] = {}
        self._graph_state: Dict[str, str] = {}       # graph -> "graph" or the reason it runs without one
        self.emulated: Dict[str, object] = {}        # graph -> {"fp16"/"bf16": nodes emulated in fp32} (CPU)
        self._weights = None
        self._inits: Dict[str, tuple] = {}           # name -> (torch view, OrtValue)
        self._plan = None
        _register_arena(ort, device, device_id)

    # ---------------- weights, sessions ----------------
    def _weights_buffer(self):
        """weights.bin, read once into one uint8 tensor on the device (in chunks: no second host copy)."""
        if self._weights is None:
            torch = self.torch
            path = self.bundle.path / "weights.bin"
            src = np.memmap(path, dtype=np.uint8, mode="r")
            buf = torch.empty(src.shape[0], dtype=torch.uint8, device=self.dev)
            for a in range(0, src.shape[0], _CHUNK):
                buf[a:a + _CHUNK].copy_(torch.from_numpy(np.array(src[a:a + _CHUNK])))
            del src
            self._weights = buf
        return self._weights

    def _initializer(self, t) -> object:
        if t.name not in self._inits:
            dtypes, _ = _torch_dtypes()
            d = {e.key: e.value for e in t.external_data}
            off, n = int(d["offset"]), int(d["length"])
            view = self._weights_buffer()[off:off + n].view(dtypes[t.data_type]).view(tuple(t.dims))
            self._inits[t.name] = (view, _ortvalue(self.ort, view))
        return self._inits[t.name][1]

    def session(self, name: str, graphs: bool = False):
        """The session of graph `name` (graphs=True: the CUDA-graph variant `generate` binds)."""
        graphs = graphs and self.cuda_graphs
        key = (name, graphs)
        if key not in self._sessions:
            self._sessions[key] = self._create(name, graphs)
        return self._sessions[key]

    def _create(self, name: str, graphs: bool):
        import onnx
        ort = self.ort
        model = onnx.load(str(self.bundle.graph_path(name)), load_external_data=False)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.bundle.path))
        so.add_session_config_entry("session.use_env_allocators", "1")
        so.add_session_config_entry("session.disable_prepacking", "1")   # no per-session repacked weight copies
        if self.profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(self.profile / f"{name}{'_graph' if graphs else ''}")
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                so.add_initializer(t.name, self._initializer(t))
        if self.device == "cpu":         # fp16/bf16 nodes the CPU provider has no kernel for run in fp32 between Casts
            from .emulate import emulate_low_precision
            from .ort_ops import OUTPUT_TYPES
            self.emulated[name] = emulate_low_precision(model, OUTPUT_TYPES)
        if any(n.domain == CUSTOM_DOMAIN for n in model.graph.node):
            if self.cuda_ops is not None:
                register_cuda_ops(so, self.cuda_ops)
            else:
                self._python_custom_ops(model, so)
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            # every node runs on the GPU: no CPU thread pool per session, no worker threads spinning after each run
            # (they would take the CPU from whatever runs between generations: a server's requests and responses)
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts = {"device_id": str(self.device_id), "use_tf32": "0" if self.bundle.manifest["precision"] == "fp32" else "1",
                    "user_compute_stream": str(self.stream.cuda_stream), "has_user_compute_stream": "1",
                    **self.cuda_options}
            if graphs:
                opts["enable_cuda_graph"] = "1"
            providers.insert(0, ("CUDAExecutionProvider", opts))
        try:
            s = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        except Exception as e:  # ORT raises its own exception types
            msg = str(e).splitlines()[0][:300]
            if graphs:   # e.g. nodes ONNX Runtime placed on the CPU: this step runs without a CUDA graph
                self._graph_state[name] = f"no CUDA graph ({msg})"
                self._sessions[(name, False)] = s = self.session(name, False)
                return s
            raise ActVarError(f"{self.bundle.graph_path(name)}: ONNX Runtime cannot load it ({msg})") from None
        if graphs:
            self._graph_state[name] = "graph"
        return s

    @staticmethod
    def _python_custom_ops(model, so) -> None:
        """`plugin` bundles: the CPU reference of the custom ops (onnxruntime-extensions Python ops)."""
        from .ort_ops import ORT_CONTRIB_DOMAIN, register
        so.register_custom_ops_library(register())
        for n in model.graph.node:
            if n.domain == CUSTOM_DOMAIN:
                n.domain = ORT_CONTRIB_DOMAIN
        for o in model.opset_import:
            if o.domain == CUSTOM_DOMAIN:
                o.domain = ORT_CONTRIB_DOMAIN

    def bound_addresses(self) -> List[Dict[str, int]]:
        """Per graph of `generate` (10 steps, decoder): {input/output name: address of its bound buffer}."""
        return (self._plan or self._make_plan())["addresses"]

    def weights_buffer(self):
        """The one device copy of weights.bin, and {initializer: (view, OrtValue)} handed to the sessions."""
        return self._weights_buffer(), self._inits

    def graph_report(self) -> str:
        """One line: which graphs `generate` runs as CUDA graphs."""
        if not self.cuda_graphs:
            return f"CUDA graphs: off ({self.device})"
        done = [n for n, s in self._graph_state.items() if s == "graph"]
        other = {n: s for n, s in self._graph_state.items() if s != "graph"}
        return (f"CUDA graphs: {len(done)}/{len(self._graph_state)} graphs ({', '.join(done) or 'none'})"
                + "".join(f"; {n}: {s}" for n, s in other.items()))

    # ---------------- one graph, host arrays ----------------
    def infer(self, name: str, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one graph on host arrays (cast to the graph's declared input types); returns host arrays."""
        s = self.session(name)
        if _BF16 in [t.type for t in (*s.get_inputs(), *s.get_outputs())]:
            return self._infer_bf16(s, feed)
        want = {i.name: _ORT_TYPES.get(i.type) for i in s.get_inputs()}
        feed = {k: (v.astype(want[k]) if want.get(k) is not None and v.dtype != want[k] else v) for k, v in feed.items()}
        names = [o.name for o in s.get_outputs()]
        return dict(zip(names, s.run(names, feed)))

    def _infer_bf16(self, s, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """numpy has no bfloat16: bf16 inputs (given as fp32, rounded to nearest even) and outputs travel as
        torch tensors bound to the session; bf16 outputs come back as fp32 (exact)."""
        torch, io, keep = self.torch, s.io_binding(), []
        want = {i.name: i.type for i in s.get_inputs()}
        for k, v in feed.items():
            if want.get(k) == _BF16:
                keep.append(torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(self.dev, torch.bfloat16))
                io.bind_ortvalue_input(k, _ortvalue(self.ort, keep[-1]))
            else:
                io.bind_cpu_input(k, np.ascontiguousarray(v, dtype=_ORT_TYPES.get(want.get(k), v.dtype)))
        bf16 = {}
        for o in s.get_outputs():
            if o.type == _BF16:
                bf16[o.name] = torch.empty(o.shape, dtype=torch.bfloat16, device=self.dev)
                io.bind_ortvalue_output(o.name, _ortvalue(self.ort, bf16[o.name]))
            else:
                io.bind_output(o.name)
        if self.stream is not None:
            torch.cuda.synchronize(self.dev)        # the inputs written on torch's stream, before ORT's stream reads
        s.run_with_iobinding(io)
        return {o.name: bf16[o.name].float().cpu().numpy() if o.name in bf16 else v.numpy()     # bound in this order
                for o, v in zip(s.get_outputs(), io.get_outputs())}

    # ---------------- whole generation, on the device ----------------
    def _make_plan(self):
        torch = self.torch
        _, tags = _torch_dtypes()
        m = self.bundle.manifest
        B = m["batch"]
        dt = lambda tag: tags[m["precision"] if tag == "P" else tag]
        numel = lambda shape: int(np.prod(shape, dtype=np.int64))
        new = lambda n, d: torch.empty(n, dtype=d, device=self.dev)
        # sizes: each carried output alternates between two buffers (step si writes buffer si % 2);
        # outputs generate does not read (logits, sel_idx, experts) share one scratch buffer each
        carried = m["carried"]                      # step input -> the previous step's output feeding it
        chained = set(carried.values())
        size: Dict[tuple, int] = {}
        kinds: Dict[str, object] = {}
        for si in range(NUM_SCALES):
            for name, (tag, shape) in m["graphs"][f"step_{si}"]["outputs"].items():
                key = (name, si % 2) if name in chained else (name,)
                size[key] = max(size.get(key, 0), numel(shape))
                kinds[name] = dt(tag)
        bufs = {k: new(n, kinds[k[0]]) for k, n in size.items() if k[0] != "idx"}
        plan = {"labels": new(B, torch.int64), "cfg": new(1, torch.float32), "top_p": new(1, torch.float32),
                "u": new(B * TOTAL_TOKENS, torch.float32), "idx": new(B * TOTAL_TOKENS, torch.int64),
                "image": new(B * 3 * 256 * 256, torch.float32), "bufs": bufs, "bindings": []}
        keep = []                                     # the views the bindings point into
        plan["addresses"] = []                        # per graph: {tensor name: device address bound}
        for si in range(NUM_SCALES):
            g = m["graphs"][f"step_{si}"]
            s = self.session(f"step_{si}", graphs=True)
            io, addr = s.io_binding(), {}
            a, l = B * SCALE_BEGIN[si], B * SCALE_LENS[si]
            for name, (tag, shape) in g["inputs"].items():
                if name in carried:
                    t = bufs[(carried[name], (si - 1) % 2)][:numel(shape)].view(shape)
                elif name == "u":
                    t = plan["u"][a:a + l].view(shape)
                else:
                    t = plan[name].view(shape)
                keep.append(t)
                io.bind_ortvalue_input(name, _ortvalue(self.ort, t))
                addr[name] = t.data_ptr()
            for name, (tag, shape) in g["outputs"].items():
                if name == "idx":
                    t = plan["idx"][a:a + l].view(shape)
                else:
                    t = bufs[(name, si % 2) if name in chained else (name,)][:numel(shape)].view(shape)
                keep.append(t)
                io.bind_ortvalue_output(name, _ortvalue(self.ort, t))
                addr[name] = t.data_ptr()
            plan["bindings"].append((s, io))
            plan["addresses"].append(addr)
        d = self.session("decoder", graphs=True)
        io = d.io_binding()
        fh = bufs[("f_hat_out", (NUM_SCALES - 1) % 2)][:B * 32 * 16 * 16].view(B, 32, 16, 16)
        img = plan["image"].view(B, 3, 256, 256)
        io.bind_ortvalue_input("f_hat", _ortvalue(self.ort, fh))
        io.bind_ortvalue_output("image", _ortvalue(self.ort, img))
        keep += [fh, img]
        plan["bindings"].append((d, io))
        plan["addresses"].append({"f_hat": fh.data_ptr(), "image": img.data_ptr()})
        plan["keep"] = keep
        pin = self.device == "cuda"       # page-locked host copies: one asynchronous copy each, then one sync
        plan["host_idx"] = torch.empty(B * TOTAL_TOKENS, dtype=torch.int64, pin_memory=pin)
        plan["host_image"] = torch.empty(B * 3 * 256 * 256, dtype=torch.float32, pin_memory=pin)
        plan["image_u8"] = new(B * 256 * 256 * 3, torch.uint8)
        plan["host_image_u8"] = torch.empty(B * 256 * 256 * 3, dtype=torch.uint8, pin_memory=pin)
        ro = self.ort.RunOptions()
        ro.add_run_config_entry("disable_synchronize_execution_providers", "1")   # one sync at the end
        plan["run_options"] = ro
        self._plan = plan
        self.log(self.graph_report())
        return plan

    generates_uint8 = True      # generate(..., uint8=True): BundleGenerator takes the images as uint8 from here

    def generate(self, labels_B: np.ndarray, u_BL: np.ndarray, cfg: float, top_p: float, decode: bool = True,
                 progress: Optional[Callable[[int], None]] = None, uint8: bool = False):
        """The ten scales (and the decoder) on the device with the bound buffers.
        Returns (images (B,3,256,256) float32 in [0,1] or None, ids: per-scale int64 (B, pn²)); uint8=True: the
        images as uint8 (B,256,256,3), converted on the device exactly as images.to_uint8 does (clamp, ×255 in
        float32, round half to even), so only a quarter of the bytes leave the device and the host does no pass."""
        from ..images import to_uint8_tensor
        torch = self.torch
        B = self.bundle.batch
        labels_B, u_BL = np.asarray(labels_B), np.asarray(u_BL)
        if labels_B.shape != (B,) or u_BL.shape != (B, TOTAL_TOKENS):
            raise ActVarError(f"the bundle was built for batch {B}: labels must be ({B},) and u ({B}, {TOTAL_TOKENS}); "
                              f"got {labels_B.shape} and {u_BL.shape}")
        p = self._plan or self._make_plan()
        u = np.concatenate([u_BL[:, a:a + l].reshape(-1) for a, l in zip(SCALE_BEGIN, SCALE_LENS)]).astype(np.float32)
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            p["labels"].copy_(torch.from_numpy(labels_B.astype(np.int64)))
            p["u"].copy_(torch.from_numpy(u))
            p["cfg"].fill_(float(cfg))
            p["top_p"].fill_(float(top_p))
            runs = p["bindings"] if decode else p["bindings"][:-1]
            for si, (s, io) in enumerate(runs):
                s.run_with_iobinding(io, p["run_options"])
                if progress and si < NUM_SCALES:
                    progress(si)
            p["host_idx"].copy_(p["idx"], non_blocking=True)
            src, host, shape = ((p["image_u8"], p["host_image_u8"], (B, 256, 256, 3)) if uint8 else
                                (p["image"], p["host_image"], (B, 3, 256, 256)))
            if decode:
                if uint8:
                    src.view(shape).copy_(to_uint8_tensor(p["image"].view(B, 3, 256, 256)))
                host.copy_(src, non_blocking=True)
            if self.stream is not None:
                self.stream.synchronize()
            ids = p["host_idx"].numpy()
            images = host.view(shape).numpy().copy() if decode else None
        out, a = [], 0
        for l in SCALE_LENS:
            out.append(ids[B * a:B * (a + l)].reshape(B, l).copy())
            a += l
        return images, out

    def end_profiling(self) -> List[Path]:
        """Stop the sessions' profilers; returns their JSON trace files."""
        return [Path(s.end_profiling()) for s in self._sessions.values()] if self.profile else []


def profile_summary(files: List[Path], top: int = 15) -> List[dict]:
    """Per operator type: total kernel time (ms) over ONNX Runtime profiler traces, largest first."""
    tot: Dict[str, list] = {}
    for f in files:
        for ev in json.loads(Path(f).read_text()):
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                op = ev.get("args", {}).get("op_name", "?")
                t = tot.setdefault(op, [0.0, 0])
                t[0] += ev.get("dur", 0) / 1000.0
                t[1] += 1
    rows = sorted(({"op": k, "ms": round(v[0], 3), "calls": v[1]} for k, v in tot.items()), key=lambda r: -r["ms"])
    return rows[:top]


_BF16 = "tensor(bfloat16)"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}
