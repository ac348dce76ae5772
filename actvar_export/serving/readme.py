"""The README written into a model repository: what is in it and the exact server command lines."""
from __future__ import annotations

from typing import List, Optional

TRITON_CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"   # Triton 2.51, the nvidia-pytriton 0.7.0 wheel's server
SERVER_FLAGS = ("--allow-metrics=false --disable-auto-complete-config --exit-on-error=true "
                "--strict-readiness=true --exit-timeout-secs=5")


def repository_readme(backend: str, manifest: dict, models: List[str], plugin_lib: str, notes: List[str],
                      repo: str, src: Optional[str]) -> str:
    """plugin_lib: the repository path of the native plugin library ("" when none): passed on the command lines
    (tensorrt) or named by absolute path in the configs (onnxruntime: the container mounts the repository at
    the same path)."""
    m = manifest
    trt_lib = plugin_lib if backend == "tensorrt" else ""
    ort_lib = plugin_lib if backend == "onnxruntime" else ""
    mount = "$REPO" if ort_lib else "/models"     # (the host's shell expands $REPO, also inside bash -c "...")
    plugins = f" --backend-config=tensorrt,plugins=/models/{trt_lib}" if trt_lib else ""
    pip_plugins = f" --backend-config=tensorrt,plugins=$REPO/{trt_lib}" if trt_lib else ""
    lines = [
        "# ActVAR model repository for Triton Inference Server",
        "",
        f"Bundle: d{m['model']['depth']} {m['precision']} {m['lowering']} lowering, static batch {m['batch']}, "
        f"top-k {m['top_k']}; backend `{backend}`; models: {', '.join(models)}.",
        "",
        "`actvar` (Python backend) takes `class_labels` INT64 [n] (ImageNet ids 0..999), `seed` INT64 [1] and",
        "optionally `cfg` and `top_p` FP32 [1]; it returns `images` UINT8 [n, 256, 256, 3]. These are per request,",
        "behind Triton's batch dimension: a client sends class_labels [1, n] and seed [1, 1] and gets images",
        "[1, n, 256, 256, 3]. A request's images depend only on its classes, seed, cfg and top_p: concurrent",
        "requests are packed into the bundle's static batch, larger ones split.",
        "",
        "Files: `$REPO/actvar/config.pbtxt`, `$REPO/actvar/1/model.py`, `$REPO/actvar/1/bundle/manifest.json`"
        + (", `$REPO/step_0/config.pbtxt` ... `$REPO/decoder/config.pbtxt`" if backend != "python" else "")
        + (f", `$REPO/{plugin_lib}`" if plugin_lib else "") + ".",
        "",
        "The commands below use two variables:",
        "",
        f"    export REPO={repo}",
        f"    export SRC={src or '/path/to/actvar-export'}      # an actvar-export source checkout (for the container)",
        "",
        "## pip-installed server (the nvidia-pytriton wheel's tritonserver)",
        "",
        "    pip install -e '.[triton]'        # in an actvar-export checkout",
        "    actvar-export serve --repo \"$REPO\" --http-port 8000 --grpc-port 8001",
        "",
        "`serve` prepares what the wheel's server needs (a backend directory linking the wheel's Python backend,",
        "a small virtual environment with numpy<2 for the models: Triton 2.51's Python backend corrupts tensors",
        "under numpy 2) and then runs, with PATH starting with that environment's bin/ and LD_LIBRARY_PATH holding",
        "its Python's library directory (BK: the backend directory `serve` prepares, ~/.cache/actvar-export/backends-*):",
        "",
        f"    tritonserver --model-repository=\"$REPO\" --backend-directory=BK --http-address=127.0.0.1 --http-port=8000 "
        f"--grpc-address=127.0.0.1 --grpc-port=8001 {SERVER_FLAGS}{pip_plugins}",
        "",
        "## Triton's container",
        "",
        "The Python models import the `actvar_export` package: install it (and numpy<2) in the container.",
        "",
        f"    docker run --rm --gpus=all --shm-size=1g -p 8000:8000 -p 8001:8001 -v \"$REPO\":\"{mount}\" "
        f"-v \"$SRC\":/src {TRITON_CONTAINER} bash -c \"pip install -q 'numpy<2' /src && "
        f"tritonserver --model-repository={mount} {SERVER_FLAGS}{plugins}\"",
        "",
        "## A request",
        "",
        "    actvar-export request --url 127.0.0.1:8000 --classes 207,360,387 --seed 0 --out grid.png --raw images.npy",
        "",
    ]
    if backend == "tensorrt":
        lines += ["## TensorRT engines", "",
                  "Triton's TensorRT backend deserializes the plans with its own TensorRT: build the engines with the same",
                  "TensorRT release as the container (`$REPO/engines.json` records the module and version that built them;",
                  "engines from TensorRT-RTX do not load in Triton's `tensorrt_plan` backend).", ""]
        if trt_lib:
            lines += ["The plans hold ActVarTokenScatter / ActVarExpertFFN plugin layers (IPluginV3). Triton's TensorRT backend",
                      "only dlopen()s the libraries named by `--backend-config=tensorrt,plugins=`, so the commands above pass",
                      f"`$REPO/{trt_lib}`, the variant that registers both creators when loaded. It is linked to",
                      "the TensorRT library given to its build (`-DTensorRT_LIBRARY`): for a server, build it against that",
                      "server's libnvinfer.so.10 (plugins/trt/README.md of actvar-export).", ""]
    if ort_lib:
        lines += ["## ONNX Runtime custom ops", "",
                  "The step graphs hold ActVarTokenScatter / ActVarExpertFFN nodes of the `actvar` domain, whose CUDA kernels",
                  f"`$REPO/{ort_lib}` registers. The step models' configs name it by absolute path,",
                  f"`model_operations {{ op_library_filename: \"{repo}/{ort_lib}\" }}`: Triton's onnxruntime backend",
                  "hands that name to ONNX Runtime (dlopen) unchanged, so a relative one would resolve against the server's",
                  "working directory. The container therefore mounts the repository at the same path. To move the",
                  "repository, write it again with `actvar-export triton --out NEW`, or rewrite the configs:",
                  "",
                  f"    sed -i 's#{repo}/{ort_lib}#'\"$NEW\"'/{ort_lib}#' \"$NEW\"/*/config.pbtxt",
                  "",
                  "The ops have CUDA kernels only: the step models need GPU instances (Triton places them on a GPU where",
                  "one exists; without one they fail to load). The library asks ONNX Runtime for C API version 29, so the",
                  "server's onnxruntime backend must be built on onnxruntime 1.29 or later (the container named above ships",
                  "an older one: use a Triton release whose notes list onnxruntime >= 1.29).", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
