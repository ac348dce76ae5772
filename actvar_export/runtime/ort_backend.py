"""ONNX Runtime backend: lazy per-graph sessions sharing one in-memory copy of the weights,
and one `infer(graph, feed) -> dict` contract (Polygraphy style)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..bundle import Bundle
from ..errors import ActVarError
from ..export.graph import CUSTOM_DOMAIN
from .custom_ops import CUDA_PROVIDER, cuda_ops_library, register_cuda_ops

_NP = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32}


def default_providers() -> List[str]:
    import onnxruntime as ort
    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


class OrtBackend:
    def __init__(self, bundle: Bundle, providers: Optional[Sequence[str]] = None):
        import onnxruntime as ort
        self.ort = ort
        self.bundle = bundle
        # a provider is a name or (name, options), as ONNX Runtime takes them
        self.providers = list(providers or default_providers())
        self.provider_names = [p if isinstance(p, str) else p[0] for p in self.providers]
        # plugin bundles on CUDA run the custom ops of libactvar_ort_ops.so; elsewhere the CPU reference ops
        self.cuda_ops = None
        if bundle.manifest.get("lowering") == "plugin" and self.provider_names[:1] == [CUDA_PROVIDER]:
            self.cuda_ops = cuda_ops_library(ort.get_available_providers())
        missing = [p for p in self.provider_names if p not in ort.get_available_providers()]
        if missing:
            raise ActVarError(f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(ort.get_available_providers())})")
        self._sessions: Dict[str, "ort.InferenceSession"] = {}
        self._shared: Dict[str, "ort.OrtValue"] = {}
        self._weights = None

    def _weights_map(self):
        if self._weights is None:
            self._weights = np.memmap(self.bundle.path / "weights.bin", dtype=np.uint8, mode="r")
        return self._weights

    def session(self, name: str):
        if name not in self._sessions:
            self._sessions[name] = self._create(name)
        return self._sessions[name]

    def _create(self, name: str):
        import onnx
        ort = self.ort
        model = onnx.load(str(self.bundle.graph_path(name)), load_external_data=False)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.bundle.path))
        # one copy of each weight in memory for all sessions (no per-session pre-packed duplicates)
        so.add_session_config_entry("session.disable_prepacking", "1")
        w = self._weights_map()
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL or t.data_type not in _NP:
                continue
            if t.name not in self._shared:
                d = {e.key: e.value for e in t.external_data}
                arr = np.frombuffer(w, dtype=np.uint8, count=int(d["length"]), offset=int(d["offset"]))
                self._shared[t.name] = ort.OrtValue.ortvalue_from_numpy(arr.view(_NP[t.data_type]).reshape(tuple(t.dims)))
            so.add_initializer(t.name, self._shared[t.name])
        custom = any(n.domain == CUSTOM_DOMAIN for n in model.graph.node)
        if custom and self.cuda_ops is not None:
            register_cuda_ops(so, self.cuda_ops)
        elif custom:
            from .ort_ops import ORT_CONTRIB_DOMAIN, register
            so.register_custom_ops_library(register())
            for n in model.graph.node:
                if n.domain == CUSTOM_DOMAIN:
                    n.domain = ORT_CONTRIB_DOMAIN
            for o in model.opset_import:
                if o.domain == CUSTOM_DOMAIN:
                    o.domain = ORT_CONTRIB_DOMAIN
        try:
            return ort.InferenceSession(model.SerializeToString(), so, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types
            raise ActVarError(f"{self.bundle.graph_path(name)}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]})") from None

    def infer(self, name: str, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one graph; inputs are cast to the graph's declared types (e.g. an fp32 reference cache
        into an fp16 graph)."""
        s = self.session(name)
        want = {i.name: _ORT_TYPES.get(i.type) for i in s.get_inputs()}
        feed = {k: (v.astype(want[k]) if want.get(k) is not None and v.dtype != want[k] else v) for k, v in feed.items()}
        names = [o.name for o in s.get_outputs()]
        return dict(zip(names, s.run(names, feed)))


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}
