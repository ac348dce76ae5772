"""`actvar-export request`: images from a served `actvar` model through tritonclient (HTTP or gRPC)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import ActVarError

PROTOCOLS = ("http", "grpc")


def _module(protocol: str):
    if protocol not in PROTOCOLS:
        raise ActVarError(f"--protocol: unknown protocol {protocol!r}: choose http or grpc")
    try:
        if protocol == "http":
            import tritonclient.http as m
        else:
            import tritonclient.grpc as m
    except ImportError as e:
        raise ActVarError(f"tritonclient[{protocol}] is not installed ({e}): pip install -e '.[triton]'") from None
    return m


def split_url(url: str, protocol: Optional[str] = None) -> Tuple[str, str]:
    """(host:port, protocol) from 'host:port', 'http://host:port' or 'grpc://host:port'; a scheme must agree with
    `protocol` where both are given; neither: http."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, protocol or "http"
    if scheme not in PROTOCOLS:
        raise ActVarError(f"--url {url}: unknown scheme {scheme}://: use http:// or grpc:// (or --protocol)")
    if protocol and protocol != scheme:
        raise ActVarError(f"--url {url} is {scheme} but --protocol is {protocol}")
    return rest.rstrip("/"), scheme


IMAGE_BYTES = 256 * 256 * 3


class ActVarClient:
    """One client of a served `actvar` model over HTTP or gRPC (tritonclient): `images(...)` per request.
    One per thread (tritonclient's clients are not shared between concurrent calls).

    shared_memory=True (a client on the server's host): the server writes the images into a system shared-memory
    region of this client's (registered with the server, grown for larger requests, removed on close) instead of
    sending them over the connection."""

    def __init__(self, url: str, protocol: str = "http", model: str = "actvar", timeout_s: float = 600,
                 shared_memory: bool = False):
        self.m = _module(protocol)
        self.url, self.protocol, self.model, self.timeout_s = url, protocol, model, timeout_s
        self.shared_memory, self._region = shared_memory, None    # (name, handle, byte size)
        if protocol == "http":
            self.client = self.m.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            self.client = self.m.InferenceServerClient(url)

    def _call(self, what, fn, *args, **kw):
        from tritonclient.utils import InferenceServerException
        try:
            return fn(*args, **kw)
        except InferenceServerException as e:
            raise ActVarError(f"{self.url} ({self.protocol}): {e.message() or e}") from None
        except OSError as e:
            raise ActVarError(f"{self.url} ({self.protocol}): cannot reach the server ({what}: {e})") from None

    def check_ready(self) -> None:
        """ActVarError unless the server answers and the model is ready."""
        if not self._call("readiness", self.client.is_model_ready, self.model):
            raise ActVarError(f"{self.url} ({self.protocol}): model {self.model!r} is not ready")

    def images(self, labels: Sequence[int], seed: int, cfg: Optional[float] = None,
               top_p: Optional[float] = None) -> np.ndarray:
        """uint8 images (n, 256, 256, 3) for one request (a row of the model's batch dimension)."""
        m = self.m
        arrays = {"class_labels": np.asarray(labels, np.int64).reshape(1, -1), "seed": np.array([[seed]], np.int64)}
        for name, v in (("cfg", cfg), ("top_p", top_p)):
            if v is not None:
                arrays[name] = np.array([[v]], np.float32)
        inputs = []
        for name, a in arrays.items():
            t = m.InferInput(name, list(a.shape), "INT64" if a.dtype == np.int64 else "FP32")
            t.set_data_from_numpy(a)
            inputs.append(t)
        kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        out = m.InferRequestedOutput("images")
        if self.shared_memory:
            name, handle, size = self._region_for(len(labels) * IMAGE_BYTES)
            out.set_shared_memory(name, size)
        res = self._call("infer", self.client.infer, self.model, inputs, outputs=[out], **kw)
        if not self.shared_memory:
            images = res.as_numpy("images")
            return images.reshape((-1,) + images.shape[-3:])
        import tritonclient.utils.shared_memory as shm
        o = res.get_output("images")
        shape = [int(d) for d in (o["shape"] if isinstance(o, dict) else o.shape)]
        return shm.get_contents_as_numpy(handle, np.uint8, shape).reshape((-1, 256, 256, 3)).copy()

    def _region_for(self, nbytes: int):
        """This client's registered shared-memory region, grown to at least `nbytes`."""
        if self._region is None or self._region[2] < nbytes:
            import os
            import uuid
            import tritonclient.utils.shared_memory as shm
            self._drop_region()
            name = f"actvar_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            handle = shm.create_shared_memory_region(name, "/" + name, nbytes)
            self._region = (name, handle, nbytes)
            self._call("shared-memory registration", self.client.register_system_shared_memory, name, "/" + name, nbytes)
        return self._region

    def _drop_region(self) -> None:
        if self._region is not None:
            import tritonclient.utils.shared_memory as shm
            name, handle, _ = self._region
            self._region = None
            try:
                self.client.unregister_system_shared_memory(name)
            finally:
                shm.destroy_shared_memory_region(handle)

    def batching(self) -> dict:
        """The model's counters from Triton's statistics: {"executions", "requests" (rows of the batch dimension: one
        per request of `images`), "batches": {requests in one execution: executions}}, cumulative since the server
        started (`batching_between` gives a span's)."""
        st = self._call("statistics", self.client.get_inference_statistics, self.model,
                        **({"as_json": True} if self.protocol == "grpc" else {}))["model_stats"]
        st = next((m for m in st if m["name"] == self.model), None) if st else None
        if st is None:
            raise ActVarError(f"{self.url} ({self.protocol}): no statistics for model {self.model!r}")
        ns = lambda d: int(d.get("ns", 0))        # noqa: E731  (gRPC's JSON gives int64 counters as strings)
        inf = st.get("inference_stats", {})
        return {"executions": int(st.get("execution_count", 0)), "requests": int(st.get("inference_count", 0)),
                "batches": {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in st.get("batch_stats", [])},
                # per-execution times (ns, summed over executions): the model's input, execute() and output stages
                "execution_ns": {k: sum(ns(b.get(k, {})) for b in st.get("batch_stats", []))
                                 for k in ("compute_input", "compute_infer", "compute_output")},
                "queue_ns": ns(inf.get("queue", {}))}

    def close(self) -> None:
        try:
            self._drop_region()
        finally:
            self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def batching_between(before: dict, after: dict) -> dict:
    """The executions of a span between two `ActVarClient.batching` readings, with requests per execution."""
    ex, rq = after["executions"] - before["executions"], after["requests"] - before["requests"]
    sizes = {k: n - before["batches"].get(k, 0) for k, n in after["batches"].items()}
    ms = lambda a, b, n: round((a - b) / 1e6 / n, 3) if n else None      # noqa: E731
    return {"executions": ex, "requests": rq, "requests_per_execution": round(rq / ex, 3) if ex else None,
            "batches": {k: n for k, n in sorted(sizes.items()) if n},
            "ms_per_execution": {k: ms(v, before.get("execution_ns", {}).get(k, 0), ex)
                                 for k, v in after.get("execution_ns", {}).items()},
            "queue_ms_per_request": ms(after.get("queue_ns", 0), before.get("queue_ns", 0), rq)}


def request_images(url: str, labels: Sequence[int], seed: int, protocol: str = "http", cfg: Optional[float] = None,
                   top_p: Optional[float] = None, model: str = "actvar", timeout_s: float = 600,
                   shared_memory: bool = False) -> np.ndarray:
    """uint8 images (n, 256, 256, 3) for one request."""
    with ActVarClient(url, protocol, model, timeout_s, shared_memory) as c:
        return c.images(labels, seed, cfg, top_p)
