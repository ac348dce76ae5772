"""`actvar-export request`: images from a served `actvar` model through tritonclient (HTTP or gRPC)."""
from __future__ import annotations

from typing import Optional, Sequence

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


def request_images(url: str, labels: Sequence[int], seed: int, protocol: str = "http", cfg: Optional[float] = None,
                   top_p: Optional[float] = None, model: str = "actvar", timeout_s: float = 600) -> np.ndarray:
    """uint8 images (n, 256, 256, 3) for one request (a row of the model's batch dimension)."""
    m = _module(protocol)
    from tritonclient.utils import InferenceServerException
    arrays = {"class_labels": np.asarray(labels, np.int64).reshape(1, -1), "seed": np.array([[seed]], np.int64)}
    for name, v in (("cfg", cfg), ("top_p", top_p)):
        if v is not None:
            arrays[name] = np.array([[v]], np.float32)
    inputs = []
    for name, a in arrays.items():
        t = m.InferInput(name, list(a.shape), "INT64" if a.dtype == np.int64 else "FP32")
        t.set_data_from_numpy(a)
        inputs.append(t)
    try:
        if protocol == "http":
            client = m.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            client = m.InferenceServerClient(url)
        try:
            kw = {"client_timeout": timeout_s} if protocol == "grpc" else {}
            res = client.infer(model, inputs, outputs=[m.InferRequestedOutput("images")], **kw)
        finally:
            client.close()
    except InferenceServerException as e:
        raise ActVarError(f"{url} ({protocol}): {e.message() or e}") from None
    except OSError as e:
        raise ActVarError(f"{url} ({protocol}): cannot reach the server ({e})") from None
    images = res.as_numpy("images")
    return images.reshape((-1,) + images.shape[-3:])
