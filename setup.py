from setuptools import find_packages, setup

setup(
    name="actvar-export",
    version="0.1.0",
    description="Deployment compiler for ActVAR / VAR image generators: reference, ONNX, TensorRT plugins",
    packages=find_packages(include=["actvar_export", "actvar_export.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "click>=8.1",
        "tqdm",
        "pillow",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "onnxruntime-extensions>=0.12",  # CPU reference of the plugin ops inside ONNX Runtime
        "polygraphy>=0.49",  # the comparison engine of `validate`
    ],
    extras_require={
        # tests pin the ONNX Runtime of the GPU machine (1.30), whose IR limit (10) the bundles must meet;
        # TensorRT-RTX: its builder works without a GPU, so CI parses bundles and serializes engines (tests/test_trt.py)
        # nvidia-cublas: only its cublasLt.h, so that CI compiles the plugins' cuBLASLt path (opened at run time)
        # tritonclient: tests/test_triton.py's client (the server is the nvidia-pytriton wheel, installed with --no-deps
        # by the test command so that numpy 2 stays)
        # polygraphy: a consumer that only dlopen()s plugin libraries (tests/test_trt.py, the self-registering variant)
        "test": ["pytest>=8", "onnxruntime==1.30.0", "tensorrt-rtx-cu13", "nvidia-cublas>=13,<14",
                 "tritonclient[http,grpc]>=2.50"],
        "trt": ["tensorrt-rtx-cu13"],
        # serving: the nvidia-pytriton wheel's tritonserver (it declares numpy<2: `pip install --no-deps nvidia-pytriton`
        # keeps numpy 2 here; `serve` gives the models their own numpy<2 environment) and the client
        "triton": ["nvidia-pytriton==0.7.0", "tritonclient[http,grpc]>=2.50"],
    },
    entry_points={"console_scripts": ["actvar-export=actvar_export.cli:main"]},
)
